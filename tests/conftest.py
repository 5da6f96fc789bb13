"""Shared pytest setup.

Without a GPU, Triton kernels run under its interpreter on CPU tensors. The variable
must be set before triton is first imported (its decorators read it), so it is set here,
at collection time, before any test module imports modweights' Triton backend.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_and_precision():
    """A fixed seed per test, and no TF32 in references (exact fp32 matmuls)."""
    torch.manual_seed(0)
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
