#!/usr/bin/env bash
# CI leg "main": Python 3.11 (python3), torch 2.14.1, Triton 3.8: install from nothing into a fresh
# venv, then run the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
# Everything this leg writes (venv, torch.compile cache, pytest's tmp_path) lives in one temp folder
# removed on exit: the legs run one after another on one disk, and three leftover venvs (~6 GB each)
# plus caches filled a CI machine's disk once.
T="$(mktemp -d)"
trap 'rm -rf "$T"' EXIT
export TMPDIR="$T" TORCHINDUCTOR_CACHE_DIR="$T/inductor" TRITON_CACHE_DIR="$T/triton" PIP_NO_CACHE_DIR=1
VENV="${CI_VENV:-$T/venv}"
python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# The test command lives in the README between the test-command markers: CI runs exactly it.
cmd=$(awk '/<!-- test-command -->/{f=1;next} /<!-- \/test-command -->/{f=0} f' README.md | grep -v '^```')
echo "+ $cmd"
eval "$cmd"
# Every .cu file must compile for sm_80 and sm_90a (nvcc, no GPU needed).
if [ -f csrc/check_build.sh ] && command -v nvcc >/dev/null 2>&1; then
  bash csrc/check_build.sh
fi
