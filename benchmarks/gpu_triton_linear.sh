#!/usr/bin/env bash
# On a GPU machine with this repo: install, run the triton backend's GPU tests, time the
# issue-4 workloads. Everything goes to one folder: $1, else $OUT, else benchmarks/results/<stamp>.
#
#   bash benchmarks/gpu_triton_linear.sh [OUT_DIR]
#
# The GPU tests run with MODWEIGHTS_TRITON_AUTOTUNE=0 (one default tile config per kernel: many
# shapes, no tuning runs); the timings autotune. Set SKIP_TESTS=1 or SKIP_BENCH=1 to skip a part,
# BENCH_ARGS to pass options to the timing script (e.g. "--only W1,W3").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu_triton_linear_$(date -u +%Y%m%dT%H%M%SZ)}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

"$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT_DIR/install.log" 2>&1 \
  || { echo "install failed, see $OUT_DIR/install.log"; tail -20 "$OUT_DIR/install.log"; exit 1; }

status=0
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  MODWEIGHTS_TRITON_AUTOTUNE=0 "$PY" -m pytest -m gpu tests/test_triton_linear.py -q -ra \
    --junitxml="$OUT_DIR/pytest_gpu.xml" 2>&1 | tee "$OUT_DIR/pytest_gpu.txt"
  status=${PIPESTATUS[0]}
fi
if [ "${SKIP_BENCH:-0}" != "1" ]; then
  # shellcheck disable=SC2086
  "$PY" benchmarks/gpu_triton_linear.py --out "$OUT_DIR" ${BENCH_ARGS:-} 2>&1 | tee "$OUT_DIR/bench.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
echo "results in $OUT_DIR (exit $status)"
exit $status
