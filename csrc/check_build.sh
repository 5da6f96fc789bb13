#!/usr/bin/env bash
# CI: every csrc/*.cu must compile, for sm_80 and sm_90a (or $MODWEIGHTS_CUDA_ARCH), with
# 0 spill bytes in every kernel, the GEMM kernels' SASS must hold cp.async (LDGSTS), and
# everything must link into the pybind11 module modweights._cuda, which must import (no
# GPU) and report its ABI. nvcc, pybind11 and Python.h only: no GPU, no torch headers.
# Exits non-zero on any failure. About 1-2 min on 2 cores.
#   bash csrc/check_build.sh [--verbose]     (--verbose: the ptxas lines of the build)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export MODWEIGHTS_CUDA_ARCH="${MODWEIGHTS_CUDA_ARCH:-80;90a}"
start=$(date +%s)
"$PY" csrc/build.py --check-python
"$PY" csrc/build.py --report --check "$@"
echo "csrc/check_build.sh: OK ($MODWEIGHTS_CUDA_ARCH) in $(( $(date +%s) - start )) s"
