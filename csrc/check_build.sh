#!/usr/bin/env bash
# CI: every csrc/*.cu must compile, for sm_80 and sm_90a (or $MODWEIGHTS_CUDA_ARCH), and
# link into the library, which must load and export its entry points. nvcc only: no GPU,
# no torch. Exits non-zero on any compile or link error. About 20-40 s on 2 cores.
#   bash csrc/check_build.sh [--verbose]     (--verbose: ptxas registers / spills)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export MODWEIGHTS_CUDA_ARCH="${MODWEIGHTS_CUDA_ARCH:-80;90a}"
start=$(date +%s)
"$PY" csrc/build.py "$@"
echo "csrc/check_build.sh: OK ($MODWEIGHTS_CUDA_ARCH) in $(( $(date +%s) - start )) s"
