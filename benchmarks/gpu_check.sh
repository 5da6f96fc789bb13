#!/usr/bin/env bash
# Everything a GPU can tell us about modweights, in ONE command of at most 8 minutes on a bare
# H100/H200 machine, install and CUDA build included (benchmarks/README.md has the stages, their
# budgets, and what to do with the results).
#
#   bash benchmarks/gpu_check.sh            the check (a CUDA device; results to $OUT, else bench_out/gpu_check)
#   bash benchmarks/gpu_check.sh --dry-run  any machine: print the plan and run every stage's Python
#                                           entry point on the CPU on tiny shapes (CI runs this)
#
# Stages, in order of value, each under its own timeout with its own folder and log, so a hang or a
# crash loses only that stage (verify, sweep, tests, sanitizer and bench-warm share the GPU at once:
# none of them times anything; bench and auto-table then have the GPU to themselves):
#   env         nvidia-smi, nvcc, python/torch/triton versions, commit
#   install     pip install --no-build-isolation --no-deps -e . (builds csrc/), then every backend's
#               availability (the cuda backend's reason says whether the build worked)
#   verify      modweights verify --device cuda, float32 / float16 / bfloat16 (one process each),
#               every backend, autotuning off
#   sweep       every config of every autotuned Triton kernel, launched directly on two tile-crossing
#               shapes, against the float64 reference (python -m modweights.benchmarking.kernel_sweep)
#   tests       pytest -m gpu, autotuning off, MODWEIGHTS_REQUIRE=triton,cuda (unavailable = failure)
#   sanitizer   compute-sanitizer --tool memcheck on small cases of each kernel family (racecheck: cuda);
#               "unsupported" (not FAIL, exit 0) where the sanitizer refuses the GPU ("Device not supported")
#   bench-warm  the bench calls once each, concurrently with the above: fills Triton's and Inductor's
#               on-disk compile caches, so the timed stage mostly runs kernels
#   bench       modweights bench on W1-W7: fwd, bwd, fwd+bwd; dense op, peers, every backend, peak
#               memory; autotuning bounded (MODWEIGHTS_TRITON_AUTOTUNE_MAX)
#   auto-table  the auto-table entries for this GPU, from the bench stage's medians
# Files under $OUT (the device tool brings back at most 8): summary.txt (one screen), gpu_check.tar.gz
# (every stage's folder), auto_table.json, bench.csv.
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET (seconds in all, default 475), GPU_CHECK_JOBS,
# MODWEIGHTS_GIT_COMMIT (the commit to record when the copy of the tree has no .git).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  *) echo "gpu_check.sh: unknown argument '$1' (use --dry-run or nothing)" >&2; exit 2 ;;
esac

export PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 DRY ROOT
OUT_DIR="${OUT:-bench_out/gpu_check}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d)/gpu_check"
mkdir -p "$WORK"
export WORK
# the dry run checks the machinery, not the budgets: on a (shared, slow) CPU its timeouts are 4x
SCALE=$([ "$DRY" = 1 ] && echo 4 || echo 1)
export SCALE
TOTAL="${GPU_CHECK_BUDGET:-$(( 475 * SCALE ))}"
START=$(date +%s)
DEADLINE=$(( START + TOTAL ))
export JOBS="${GPU_CHECK_JOBS:-$([ "$DRY" = 1 ] && echo 1 || echo 8)}"

# stage name -> budget in seconds (env+install 165, the concurrent stages 140, bench 155,
# auto-table 15: 475 s in all, under 8 minutes with the summary and the tarball)
declare -A BUDGET=([env]=15 [install]=150 [verify]=140 [sweep]=140 [tests]=140 [sanitizer]=140
                   [bench-warm]=140 [bench]=155 [auto-table]=15)
# bench: per workload group (each its own `modweights bench` call and timeout)
export BENCH_LINEAR=70 BENCH_DECODE=20 BENCH_CONV=65
# autotuning in the bench stage: the first N candidates of each kernel's list
export AUTOTUNE_MAX=2

# ----------------------------------------------------------------------------- stages
# Each stage_X runs inside `timeout`, with STAGE_DIR set; its last output line becomes the note.

stage_env() {
  { nvidia-smi || echo "nvidia-smi: not available"; } > "$STAGE_DIR/nvidia-smi.txt" 2>&1
  { command -v nvcc && nvcc --version; } > "$STAGE_DIR/nvcc.txt" 2>&1 || echo "nvcc: not found" >> "$STAGE_DIR/nvcc.txt"
  command -v compute-sanitizer > "$STAGE_DIR/tools.txt" 2>&1 || echo "compute-sanitizer: not found" >> "$STAGE_DIR/tools.txt"
  git -C "$ROOT" log -1 --format='commit %H %cI %s' > "$STAGE_DIR/commit.txt" 2>&1 \
    || echo "commit: ${MODWEIGHTS_GIT_COMMIT:-unknown (no .git here and MODWEIGHTS_GIT_COMMIT unset)}" > "$STAGE_DIR/commit.txt"
  # the pybind11 module needs Python.h: record whether this Python has its headers (issue 17)
  "$PY" "$ROOT/csrc/build.py" --check-python > "$STAGE_DIR/python_headers.txt" 2>&1 \
    || echo "Python.h: missing (the cuda backend cannot build here)" >> "$STAGE_DIR/python_headers.txt"
  "$PY" -c "import sys, torch; import triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
}

stage_install() {
  if [ "$DRY" = 1 ]; then
    echo "dry run: would run $PY -m pip install --no-build-isolation --no-deps -e . (this environment's install is used)"
  else
    "$PY" -m pip install --no-build-isolation --no-deps -e . > "$STAGE_DIR/pip.log" 2>&1 || { tail -30 "$STAGE_DIR/pip.log"; echo "pip install failed"; return 1; }
  fi
  mkdir -p "$WORK/env"
  "$PY" -m modweights.benchmarking.gpu_check env "$WORK/env/env.json"
}

stage_verify() {
  if [ "$DRY" = 1 ]; then
    "$PY" -m modweights verify --device cpu --backends auto --dtypes float32 --quiet; return
  fi
  # six processes: per dtype, the triton backend (whose kernels compile: the long part) apart from
  # the others, so a slow Triton compile cannot take the other backends' results with it
  local pids=() rc=0 d part names=()
  for d in float32 float16 bfloat16; do
    for part in triton reference,torch,cuda,auto; do
      "$PY" -m modweights verify --device cuda --dtypes "$d" --backends "$part" --quiet \
        > "$STAGE_DIR/verify-$d-${part%%,*}.txt" 2>&1 & pids+=($!); names+=("$d-${part%%,*}")
    done
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  for d in "${names[@]}"; do echo "$d: $(tail -1 "$STAGE_DIR/verify-$d.txt" | cut -c1-150)"; done
  grep -h "auto picks" "$STAGE_DIR"/verify-*.txt | sort -u
  echo "verify $([ $rc = 0 ] && echo OK || echo FAILED) (float32, float16, bfloat16; every backend and auto)"
  return $rc
}

stage_sweep() {
  # (6 workers on the GPU machine: compilation is the cost)
  "$PY" -m modweights.benchmarking.kernel_sweep --out "$STAGE_DIR" --jobs "$([ "$DRY" = 1 ] && echo 1 || echo 6)" \
    $([ "$DRY" = 1 ] && echo --dry-run)
}

stage_tests() {
  if [ "$DRY" = 1 ]; then
    # the GPU tests must collect, and the switch must accept a backend this machine has
    MODWEIGHTS_REQUIRE=triton "$PY" -m pytest -m gpu --collect-only -q -p no:cacheprovider tests \
      > "$STAGE_DIR/collect.txt" 2>&1
    local rc=$?
    tail -3 "$STAGE_DIR/collect.txt"
    return $rc
  fi
  local xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n "$JOBS")
  # -v: one line per test as it finishes, so a stage cut short still says what passed
  MODWEIGHTS_REQUIRE=triton,cuda "$PY" -m pytest -m gpu -v -ra -p no:cacheprovider "${xdist[@]}" \
    --junitxml="$STAGE_DIR/junit.xml" tests
}

stage_sanitizer() {
  local fams=(triton-linear triton-conv2d cuda-linear) pids=() rc=0 f
  if [ "$DRY" = 1 ]; then
    for f in "${fams[@]}"; do
      TRITON_INTERPRET=1 "$PY" -m modweights.benchmarking.gpu_check small-cases --family "$f" --device cpu --dry-run || rc=1
    done
    echo "dry run: compute-sanitizer not run; the small cases ran on the CPU"; return $rc
  fi
  local san
  san="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
  [ -n "$san" ] || { echo "compute-sanitizer not found"; return 1; }
  # memcheck on every family; racecheck on the hand-written CUDA kernels' shared memory (Triton
  # manages its own)
  local run tool runs=(memcheck:triton-linear memcheck:triton-conv2d memcheck:cuda-linear racecheck:cuda-linear)
  for run in "${runs[@]}"; do
    tool=${run%%:*} f=${run#*:}
    # no caching allocator: an access past a tensor's end inside a cached block would go unseen
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool "$tool" --error-exitcode 9 --print-limit 20 \
      "$PY" -m modweights.benchmarking.gpu_check small-cases --family "$f" > "$STAGE_DIR/$tool-$f.txt" 2>&1 &
    pids+=($!)
  done
  runs=("${runs[@]/:/-}")
  local i=0 p verdicts=()
  for p in "${pids[@]}"; do
    wait "$p"; verdicts+=("$STAGE_DIR/${runs[$i]}.txt:$?")
    i=$((i + 1))
  done
  for f in "${runs[@]}"; do echo "$f: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|small cases ran' "$STAGE_DIR/$f.txt" | tr '\n' ' ')"; done
  # clean / errors / unsupported per run: a sanitizer that refuses this GPU ("Device not supported",
  # then CUDA error 999) checked nothing; the driver records the stage as unsupported, not FAIL
  "$PY" -m modweights.benchmarking.gpu_check sanitizer-verdict --unsupported-file "$STAGE_DIR/unsupported.txt" \
    "${verdicts[@]}"
}

# the bench groups' `modweights bench` arguments (on the GPU)
bench_args() {  # group
  case "$1" in
    linear) echo "--workloads W1 W2a W2b W3 --compile on" ;;
    decode) echo "--workloads W6 --compile off" ;;
    conv)   echo "--workloads W4 W5 W7 --compile on" ;;
    *) echo "bench_args: unknown group $1" >&2; return 1 ;;
  esac
}

stage_bench_warm() {
  # the same bench calls, once each and all at once, while the GPU is shared anyway: Triton's and
  # Inductor's compile caches are on disk, so the timed bench stage then mostly runs kernels
  local rc=0 g pids=()
  if [ "$DRY" = 1 ]; then
    # --compile on as on the GPU: the compiled reference's passes (bwd included) must run here too
    # (Inductor on CPU cores shared with the other stages: minutes, hence 130 s x SCALE)
    bench_group warm-linear 130 --device cpu --tiny --reps 1 --warmup 1 --compile on --no-progress \
      --workloads W1 --impls torch,compiled-reference --passes fwd || rc=1
  else
    for g in linear decode conv; do
      # shellcheck disable=SC2046
      bench_group "$g" 135 --device cuda --reps 1 --warmup 1 --compile-timeout 15 --no-progress $(bench_args $g) & pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
  fi
  echo "compile caches warmed ($([ $rc = 0 ] && echo 'every group ran' || echo 'some group FAILED'))"
  return $rc
}

stage_bench() {
  local rc=0 common
  if [ "$DRY" = 1 ]; then
    # --compile on as on the GPU: the linear group's compiled reference (fwd, bwd, fwd+bwd) runs on
    # each workload (~45 s of Inductor each on 2 free CPU cores); the conv group's is left to the
    # GPU (its Inductor build alone took minutes on a busy CPU)
    common=(--device cpu --tiny --reps 1 --warmup 1 --compile on --no-progress)
    bench_group linear 90 "${common[@]}" --workloads W1 W2a W3 || rc=1
    bench_group conv 60 "${common[@]}" --workloads W4 --impls torch,sg2-fused,sg2-nonfused || rc=1
  else
    common=(--device cuda --reps 20 --warmup 3 --compile-timeout 15 --no-progress)
    # shellcheck disable=SC2046
    bench_group linear "$BENCH_LINEAR" "${common[@]}" $(bench_args linear) || rc=1
    # shellcheck disable=SC2046
    bench_group decode "$BENCH_DECODE" "${common[@]}" $(bench_args decode) || rc=1
    # shellcheck disable=SC2046
    bench_group conv "$BENCH_CONV" "${common[@]}" $(bench_args conv) || rc=1
  fi
  local wrote want
  wrote=$(ls "$STAGE_DIR"/*/results.json 2>/dev/null | wc -l)
  want=$([ "$DRY" = 1 ] && echo 2 || echo 3)
  [ "$wrote" = "$want" ] || rc=1
  echo "bench: $wrote of $want groups wrote results$([ $rc = 0 ] || echo ', some FAILED')"
  return $rc
}

bench_group() {  # name seconds bench-args...   (autotuning on, bounded)
  local name=$1 secs=$(( $2 * SCALE )); shift 2
  env -u MODWEIGHTS_TRITON_AUTOTUNE MODWEIGHTS_TRITON_AUTOTUNE_MAX="$AUTOTUNE_MAX" \
    timeout -k 5 "$secs" "$PY" -m modweights bench "$@" --out "$STAGE_DIR/$name" > "$STAGE_DIR/$name.txt" 2>&1
  local rc=$?
  echo "bench $name: exit $rc$([ $rc = 124 ] && echo " (timeout after ${secs}s)")"
  return $rc
}

stage_auto_table() {
  "$PY" -m modweights.benchmarking.gpu_check auto-table "$STAGE_DIR/auto_table.json" "$WORK"/bench/*/results.json \
    $([ "$DRY" = 1 ] && echo --dry-run)
}

export -f stage_env stage_install stage_verify stage_sweep stage_tests stage_sanitizer stage_bench_warm \
  stage_bench bench_group bench_args stage_auto_table

# ----------------------------------------------------------------------------- driver

record() {  # name result seconds budget note
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$WORK/stages.tsv"
  echo "[$1] $2 in ${3}s (budget ${4}s): $5"
}

run_stage() {  # name
  local name=$1 budget=$(( ${BUDGET[$1]} * SCALE ))
  local dir="$WORK/$name"
  mkdir -p "$dir"
  local left=$(( DEADLINE - $(date +%s) - 5 )) t=$budget
  (( left < t )) && t=$left
  if (( t < 5 )); then
    record "$name" skipped 0 "$budget" "no time left of the ${TOTAL} s budget"
    return 1
  fi
  local t0
  t0=$(date +%s)
  STAGE_DIR="$dir" timeout -k 10 "$t" bash -c "stage_${name//-/_}" > "$dir/log.txt" 2>&1
  local rc=$? res=pass
  if [ $rc = 124 ] || [ $rc = 137 ]; then res=timeout; elif [ $rc != 0 ]; then res=FAIL; fi
  [ "$DRY" = 1 ] && [ $res = pass ] && res=dry-ok
  # a stage whose tool this machine refuses (the sanitizer) passes nothing: say so
  [ $res = pass ] && [ -f "$dir/unsupported.txt" ] && res=unsupported
  local note
  note="$(grep -v '^[[:space:]]*$' "$dir/log.txt" | tail -1 | tr '\t' ' ' | cut -c1-200)"
  [ $res = timeout ] && note="timed out after ${t}s; last: $note"
  record "$name" "$res" "$(( $(date +%s) - t0 ))" "$t" "$note"
  [ $res = pass ] || [ $res = dry-ok ] || [ $res = unsupported ]
}

finish() {
  local s
  s="$("$PY" -m modweights.benchmarking.gpu_check summary "$WORK" --out "$WORK/summary.txt" \
       $([ "$DRY" = 1 ] && echo --dry-run) 2>&1)" || echo "summary failed: $s"
  cp "$WORK/summary.txt" "$OUT_DIR/summary.txt" 2>/dev/null
  [ -f "$WORK/auto-table/auto_table.json" ] && cp "$WORK/auto-table/auto_table.json" "$OUT_DIR/"
  local first=1 f
  : > "$OUT_DIR/bench.csv"
  for f in "$WORK"/bench/*/results.csv; do
    [ -f "$f" ] || continue
    if [ $first = 1 ]; then cat "$f" >> "$OUT_DIR/bench.csv"; first=0; else tail -n +2 "$f" >> "$OUT_DIR/bench.csv"; fi
  done
  tar czf "$OUT_DIR/gpu_check.tar.gz" -C "$(dirname "$WORK")" gpu_check
  echo
  echo "$s"
  echo
  echo "files in $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
}

echo "modweights GPU check$([ "$DRY" = 1 ] && echo ' (DRY RUN: no GPU used)'): budget ${TOTAL} s, work folder $WORK, results to $OUT_DIR"
echo "plan: env ${BUDGET[env]}s, install ${BUDGET[install]}s | verify ${BUDGET[verify]}s + sweep ${BUDGET[sweep]}s + tests ${BUDGET[tests]}s + sanitizer ${BUDGET[sanitizer]}s + bench-warm ${BUDGET[bench-warm]}s (concurrently) | bench ${BUDGET[bench]}s (linear ${BENCH_LINEAR}s, decode ${BENCH_DECODE}s, conv ${BENCH_CONV}s; autotune over ${AUTOTUNE_MAX} candidates) | auto-table ${BUDGET[auto-table]}s"
if [ "$DRY" = 0 ]; then
  export MODWEIGHTS_TRITON_AUTOTUNE=0  # correctness stages: fixed tiles (the sweep covers every config)
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || {
    echo "gpu_check.sh: no CUDA device here; use --dry-run on a machine without a GPU" >&2; exit 2; }
else
  export MODWEIGHTS_TRITON_AUTOTUNE=0
fi

status=0
run_stage env || status=1
if run_stage install; then
  pids=()
  for s in verify sweep tests sanitizer bench-warm; do run_stage "$s" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" || status=1; done
  run_stage bench || status=1
  run_stage auto-table || status=1
else
  status=1
  for s in verify sweep tests sanitizer bench-warm bench auto-table; do record "$s" skipped 0 "${BUDGET[$s]}" "install failed"; done
fi
finish
exit $status
