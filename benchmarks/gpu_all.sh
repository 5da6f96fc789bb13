#!/usr/bin/env bash
# Everything that needs a GPU, for whichever session is lent one (see benchmarks/README.md).
#
#   bash benchmarks/gpu_all.sh STAGE [STAGE ...]      (output: $OUT, else bench_out/gpu)
#
# Stages (each fits one 10-minute device call; run them in this order across calls):
#   verify          install, `modweights verify` on cuda (fp32/fp16/bf16, every backend), all
#                   gpu-marked tests of the foundation, convert/compile/state and compat files
#   triton-linear   benchmarks/gpu_triton_linear.sh: triton linear GPU tests + W1, W2a, W2b, W3, W6
#   cuda-linear     benchmarks/gpu_cuda_linear.sh: build, cuda tests, compute-sanitizer, W1, W2a
#   triton-conv2d   benchmarks/gpu_triton_conv2d.sh: triton conv2d GPU tests + W4, W5, W7
#   bench           `modweights bench` on the GPU workloads W1-W7 (bf16; W6 fp16)
#   auto-table      `python -m modweights.benchmarking.auto_table`: auto's backend per linear
#                   shape class on this GPU -> $OUT/auto-table/auto_table.json
# Each stage writes its files to $OUT/<stage>/ and packs them as $OUT/<stage>.tar.gz (the
# device tool brings back at most 8 files), plus one line per stage in $OUT/stages.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_ROOT="${OUT:-bench_out/gpu}"
mkdir -p "$OUT_ROOT"
OUT_ROOT="$(cd "$OUT_ROOT" && pwd)"
PY="${PYTHON:-python}"
export PYTHONUNBUFFERED=1

installed=0
install() {
  [ "$installed" = 1 ] && return 0
  "$PY" -m pip install --no-build-isolation --no-deps -e . > "$1/install.log" 2>&1 || {
    echo "install failed"; tail -20 "$1/install.log"; return 1; }
  installed=1
}

run_stage() {
  local stage="$1" dir="$OUT_ROOT/$1" t0 rc
  mkdir -p "$dir"
  t0=$(date +%s)
  case "$stage" in
    verify)
      install "$dir" || return 1
      { git rev-parse HEAD; nvidia-smi; "$PY" -c "import torch, triton; print(torch.__version__, triton.__version__)"; } \
        > "$dir/env.txt" 2>&1
      "$PY" -m modweights verify --device cuda --quiet > "$dir/verify.txt" 2>&1; rc=$?
      "$PY" -m pytest -m gpu -q -ra tests/test_mod_linear.py tests/test_mod_conv2d.py tests/test_nn.py \
        tests/test_bad_input.py tests/test_state.py tests/test_compile.py tests/test_convert.py \
        tests/test_compat_stylegan2.py tests/test_compat_timm.py > "$dir/pytest_gpu.txt" 2>&1 || rc=$?
      ;;
    triton-linear) bash benchmarks/gpu_triton_linear.sh "$dir"; rc=$? ;;
    cuda-linear)   bash benchmarks/gpu_cuda_linear.sh "$dir"; rc=$? ;;
    triton-conv2d) bash benchmarks/gpu_triton_conv2d.sh "$dir"; rc=$? ;;
    bench)
      install "$dir" || return 1
      "$PY" -m modweights bench --device cuda --out "$dir" --no-progress \
        > "$dir/bench.txt" 2>&1; rc=$?
      ;;
    auto-table)
      install "$dir" || return 1
      "$PY" -m modweights.benchmarking.auto_table --device cuda --out "$dir/auto_table.json" \
        > "$dir/auto_table.txt" 2>&1; rc=$?
      ;;
    *) echo "unknown stage $stage"; return 2 ;;
  esac
  tar czf "$OUT_ROOT/$stage.tar.gz" -C "$OUT_ROOT" "$stage"
  echo "$stage: exit $rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUT_ROOT/stages.txt"
  return $rc
}

[ $# -ge 1 ] || { sed -n 2,16p "$0"; exit 2; }
status=0
for s in "$@"; do run_stage "$s" || status=1; done
exit $status
