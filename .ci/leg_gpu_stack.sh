#!/usr/bin/env bash
# CI leg "gpu-stack": the GPU machine's stack (benchmarks/gpu_check.sh runs there), on the CPU:
# Python 3.12, torch 2.11.0, Triton 3.6.0, NumPy >= 2.4 (2.5 on that image), timm, in a fresh venv;
# the project installed as gpu_check.sh installs it (--no-build-isolation, CUDA extension built for
# this Python), then the whole test suite (the Triton kernels under the interpreter, torch.compile,
# export, the GPU check's dry run). These are the minimums pyproject.toml claims (docs/versions.md).
# Environment: CI_PYTHON312 (default: pyenv's 3.12.1, else python3.12 on PATH), CI_VENV312,
# CI_PYTEST_ARGS (default: the whole suite).
set -euo pipefail
cd "$(dirname "$0")/.."
PY312="${CI_PYTHON312:-}"
if [ -z "$PY312" ]; then  # (a pyenv shim named python3.12 may exist and still refuse to run)
  for c in "$HOME/.pyenv/versions/3.12.1/bin/python3.12" python3.12; do
    if "$c" -c "import sys; assert sys.version_info[:2] == (3, 12)" >/dev/null 2>&1; then PY312=$c; break; fi
  done
fi
[ -n "$PY312" ] || { echo "gpu-stack leg: no Python 3.12 found (set CI_PYTHON312)" >&2; exit 1; }
# one temp folder for the venv and every cache, removed on exit (see .ci/leg_main.sh)
T="$(mktemp -d)"
trap 'rm -rf "$T"' EXIT
export TMPDIR="$T" TORCHINDUCTOR_CACHE_DIR="$T/inductor" TRITON_CACHE_DIR="$T/triton" PIP_NO_CACHE_DIR=1
VENV="${CI_VENV312:-$T/venv}"
"$PY312" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
set -x
# torchvision 0.26 is torch 2.11's (timm imports it); numpy: the newest >= 2.4, as the GPU image
python -m pip install -q torch==2.11.0 torchvision==0.26.0 triton==3.6.0 "numpy>=2.4"
python -m pip install -q setuptools wheel pybind11 ninja
python -m pip install -q --no-build-isolation -e ".[test,triton]"
set +x
# the versions this leg claims to test are the ones it runs
python - <<'PY'
import sys, numpy, torch, triton
v = (sys.version_info[:2], torch.__version__.split("+")[0], triton.__version__, tuple(map(int, numpy.__version__.split(".")[:2])))
print(f"gpu-stack leg: python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}")
assert v[0] == (3, 12) and v[1] == "2.11.0" and v[2] == "3.6.0" and v[3] >= (2, 4), v
PY
# shellcheck disable=SC2086
python -m pytest ${CI_PYTEST_ARGS:-}
