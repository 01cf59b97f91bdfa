#!/usr/bin/env bash
# The one command every GPU run uses: build, GPU tests, kernel and engine benchmarks, logs under $OUT.
#   bash bench/gpu_check.sh STAGE...   stages: build test kbench quick llama bloom train (default: all)
# Every stage logs to $OUT/<stage>.log; the summary table comes last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ULSKIP_BUILD_LOG="$OUT/build.log"
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build test kbench quick llama bloom train)
BENCH="python3 -m ulskip.cli bench --no-progress"
declare -A RC SECS

stage() {  # stage NAME COMMAND...
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name: $*"
  bash -c "$*" > "$OUT/$name.log" 2>&1
  RC[$name]=$?
  SECS[$name]=$((SECONDS - t0))
  tail -25 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
for s in "${STAGES[@]}"; do
  case $s in
    build)  stage build "bash bench/gpu_build.sh" ;;
    test)   stage test "python3 -m pytest -q -x -m gpu tests/test_csrc_ops.py tests/test_kernels.py tests/test_engine_gpu.py" ;;
    kbench) stage kbench "python3 bench/kernel_bench.py --out $OUT/kernel_bench.md" ;;
    quick)  stage quick "$BENCH --model llama-2-7b --systems ulskip --json $OUT/quick.json" ;;
    llama)  stage llama "$BENCH --model llama-2-7b --json $OUT/llama-2-7b.json --plot $OUT/llama-2-7b.png" ;;
    bloom)  stage bloom "$BENCH --model bloom-7b1 --json $OUT/bloom-7b1.json --plot $OUT/bloom-7b1.png" ;;
    train)  stage train "python3 bench/train_bench.py" ;;
    *) echo "unknown stage $s (build test kbench quick llama bloom train)"; exit 2 ;;
  esac
done

echo; echo "== summary ($(head -2 "$OUT/gpu.txt" | tail -1))"
printf "%-8s %4s %6s\n" stage rc secs
for s in "${STAGES[@]}"; do printf "%-8s %4s %6s\n" "$s" "${RC[$s]}" "${SECS[$s]}"; done
