"""The backend registry: names, availability with reasons, selection order, no silent fallback."""
import pytest
import torch

import modweights
from modweights import backends
from modweights import functional as MF


def test_available_backends_reports_every_name_with_a_reason():
    st = modweights.available_backends("cpu")
    assert set(st) == {"reference", "torch", "triton", "cuda"}
    assert st["reference"].available and st["torch"].available
    for name, s in st.items():
        assert isinstance(s.reason, str) and s.reason


def test_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match="choose one of reference, torch, triton, cuda, auto"):
        with modweights.use_backend("fast"):
            pass


def test_unavailable_backend_is_an_error_with_the_reason():
    st = modweights.available_backends("cpu")
    missing = [n for n, s in st.items() if not s.available]
    if not missing:
        pytest.skip("every backend is available here")
    name = missing[0]
    with pytest.raises(RuntimeError, match=f"backend '{name}' is not available for cpu tensors"):
        MF.mixture_linear(torch.randn(2, 3), torch.randn(2, 4, 3), torch.rand(2, 2), backend=name)


def test_selection_order(monkeypatch):
    seen = []
    real = backends.load

    def spy(name):
        mod = real(name)
        seen.append(mod.NAME)
        return mod

    x, w, a = torch.randn(2, 3), torch.randn(2, 4, 3), torch.rand(2, 2)
    monkeypatch.setattr(backends, "load", spy)
    monkeypatch.setenv("MODWEIGHTS_BACKEND", "reference")
    MF.mixture_linear(x, w, a)
    assert seen[-1] == "reference"  # environment
    with modweights.use_backend("torch"):
        MF.mixture_linear(x, w, a)
        assert seen[-1] == "torch"  # context beats environment
        MF.mixture_linear(x, w, a, backend="reference")
        assert seen[-1] == "reference"  # argument beats context
    monkeypatch.setenv("MODWEIGHTS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MODWEIGHTS_BACKEND"):
        MF.mixture_linear(x, w, a)


def test_auto_on_cpu_is_torch():
    assert backends.resolve("auto", "mod_linear", torch.device("cpu")).NAME == "torch"


@pytest.mark.parametrize("op", ["linear", "conv2d", "mod_linear2", None])
def test_an_op_key_that_is_not_a_stem_is_refused(op):
    # the op key is the op's stem; the old spellings "linear" / "conv2d" must not resolve quietly
    # (auto_choice on a CPU, or on a GPU with no table entry, would otherwise answer "torch")
    with pytest.raises(ValueError, match="unknown modweights op .*; choose one of mod_linear, mod_conv2d"):
        backends.auto_choice(op, "cpu", {})
    with pytest.raises(ValueError, match="choose one of mod_linear, mod_conv2d"):
        backends.resolve("torch", op, torch.device("cpu"))
    assert backends.OPS == ("mod_linear", "mod_conv2d")
