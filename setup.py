"""Build script.

Metadata lives in pyproject.toml. This file only maps the source layout onto the
installed one: ``triton_kernels/`` installs as ``modweights.triton_kernels`` (the
top-level name ``triton_kernels`` belongs to other packages). The CUDA extension
(``csrc/`` -> ``modweights._cuda``) is added here by the CUDA issue.
"""
from setuptools import setup

setup(
    packages=[
        "modweights",
        "modweights.backends",
        "modweights.nn",
        "modweights.triton_kernels",
    ],
    package_dir={
        "modweights": "modweights",
        "modweights.triton_kernels": "triton_kernels",
    },
)
