#!/usr/bin/env bash
# CI "wheel": build the wheel from a clean copy of the tree (tracked and not-ignored files only, so no
# build leftovers or caches), without (MODWEIGHTS_NO_CUDA=1) and with the CUDA extension; check each
# one's contents (.ci/wheel_contents.py: every package, nothing else; its size); install each in a
# fresh venv outside the source tree (torch 2.14.1, the main leg's) and there import every
# subpackage, run `modweights verify` and `python -m modweights.aot --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
W="$(mktemp -d)"
# venvs, wheels, source copies and caches all under $W, removed on exit (see .ci/leg_main.sh)
trap 'rm -rf "$W"' EXIT
export TMPDIR="$W" TORCHINDUCTOR_CACHE_DIR="$W/inductor" TRITON_CACHE_DIR="$W/triton" PIP_NO_CACHE_DIR=1
copy() {  # dest: the files a clone of this commit has
  mkdir -p "$1"
  if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard | (cd "$ROOT" && xargs -0 cp --parents -t "$1")
  else
    tar -C "$ROOT" --exclude=.git --exclude=build --exclude=dist --exclude='*.egg-info' --exclude=__pycache__ \
      --exclude='*.so' --exclude=bench_out --exclude=modweights/_cuda_build.json --exclude=modweights/triton_kernels \
      -cf - . | tar -C "$1" -xf -
  fi
}
python3 -m venv "$W/build-venv"
"$W/build-venv/bin/python" -m pip install -q --upgrade pip
"$W/build-venv/bin/python" -m pip install -q setuptools wheel pybind11 ninja
kinds=(nocuda)
command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ] && kinds+=(cuda)
for k in "${kinds[@]}"; do
  copy "$W/src-$k"  # one fresh copy per build: the first build's build/ must not reach the second wheel
  echo "+ building the $k wheel"
  ( [ "$k" = nocuda ] && export MODWEIGHTS_NO_CUDA=1; \
    "$W/build-venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$W/$k" "$W/src-$k" )
  "$W/build-venv/bin/python" "$ROOT/.ci/wheel_contents.py" "$W/$k"/modweights-*.whl "$W/src-$k" \
    $([ "$k" = cuda ] && echo --cuda)
done
[ "${#kinds[@]}" = 2 ] || echo "nvcc not found: the CUDA wheel was not built here"

python3 -m venv "$W/venv"
# shellcheck disable=SC1091
. "$W/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.14.1
cd "$W"  # outside the source tree: only the installed wheel can be imported
for k in "${kinds[@]}"; do
  echo "+ installing the $k wheel"
  python -m pip install -q --force-reinstall --no-deps "$W/$k"/modweights-*.whl
  python -m pip install -q "$W/$k"/modweights-*.whl  # its dependencies
  python "$ROOT/.ci/wheel_imports.py" "$k"
  modweights verify --device cpu --quiet
  python -m modweights.aot --help > /dev/null
  echo "$k wheel: installed, every subpackage imported, verify and python -m modweights.aot --help ran"
done
