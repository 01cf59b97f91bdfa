#!/usr/bin/env bash
# The one command every GPU run uses: build, GPU tests, kernel and engine benchmarks, logs under $OUT.
#   bash bench/gpu_check.sh STAGE...   stages: build test kbench quick llama llamac bloom bloomc train
# trainshort = `ulskip train` on SmolLM2 + the French data, packed rows of 512, batch 8 and 64, 60 steps each
# (issue 12 item 5: the Trainer's train_steps_per_second in the log; TS_MODEL, TS_DATA); trainvs = the same data through
# plain transformers' Trainer and three `ulskip train` set-ups, timed in one run (ulskip/bench/train_vs_trainer.py;
# TVT_ARGS=--random-init with TS_MODEL = a folder of config + tokenizer alone); smol1 = ulskip bench on the
# real SmolLM2 (PROF_CKPT; the engine's default dtype) at 1x/2x/4x, batch 1 and 16 (issue 12 item 3's floor); train2 = DDP on 2 GPUs, prof = per-kernel decode-step profile (dtprof: of a real checkpoint, PROF_CKPT,
# in fp32 and bf16, with whole generate() calls against their steps: why fp32 SmolLM2 decodes ~6x slower), recheck = short ulskip vs HF eager re-run,
# gemv = Triton GEMV vs cuBLAS probe, gemvf = the fused batch-1 GEMV of kernels/gemv.py with a config sweep
# (gemvs: on SmolLM2-135M's projections, issue 12 item 3)
# (default: all; llama/bloom = ulskip + eager baselines, llamac/bloomc = HF static cache + compile,
# quick/bloomu = ulskip rows only, to merge with earlier baseline rows: ulskip bench --merge;
# quick1/bloomu1 = the same at batch 1 only; floors = launch / graph-node / sync floors, the bf16 GEMM rate on the prompt-pass shapes and the prompt pass's share of it (issue 12 items 3-4); pchunk = a chunked prompt pass against the whole one, timed and profiled; servelong = the load test with 1024-3000-token prompts, 512-token chunks vs whole passes; serve = continuous batching on the GPU + the serving load test (the H200 lacks fastapi/uvicorn/httpx: `pip download fastapi uvicorn httpx --dest .whl2 --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64` here, carry .whl2, there `pip install --no-index --find-links .whl2 --target /tmp/site2 fastapi uvicorn httpx; export PYTHONPATH=/tmp/site2`); old1 = build + quick1 of an older checkout unpacked in .old/
# (git archive REV | tar -x -C .old, carried), to compare speed before and after a change in one sitting);
# tcomp / tcomp1 = ulskip against the torch-compile peer (issue 12; its compiles take most of the stage);
# spec7b = the cost of a self-speculative round on llama-2-7b (random weights; SPEC_ACCEPT=a specreal json
# projects speedups at its acceptance), specreal = acceptance and speed on a real checkpoint (SPEC_CKPT,
# SPEC_DATA = its test.jsonl; SPEC_KS = the draft lengths), study = quality-study steps (STUDY_MODEL, STUDY_DATA, STUDY_OUT, STUDY_STEPS,
# STUDY_ARGS: see ulskip/bench/quality.py; bench/quality_plan.sh runs a whole study detached, across several calls); deepspeed = the same `ulskip train` fine-tune plain, ZeRO-2 and
# ZeRO-3 on one GPU (ulskip/bench/deepspeed_compare.py; ZERO_MODEL, ZERO_DATA = a train.jsonl, ZERO_ARGS; the
# H200 lacks deepspeed: carry .whl3 (its wheels, built here) and .whl2 (pydantic), installed with --no-deps);
# deepspeed2 = the same three runs on 2 GPUs (plain = DDP; nvidia-h200-x2, issue 15) after `deepspeed` in the
# same call, whose folder is the scaling baseline, or ZERO_BASELINE = a copy of it kept in /root)
# Every stage logs to $OUT/<stage>.log; the summary table comes last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}  # one GPU unless asked  # (the full compiler log stays in build/gpu_build.log)
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build test kbench quick llama llamac bloom bloomc train)
BENCH="python3 -m ulskip.cli bench --no-progress"
# DeepSpeed from the carried wheels (.whl3; pydantic from .whl2), then the plain / ZeRO-2 / ZeRO-3 comparison
DS_INSTALL="python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/dsite .whl3/*.whl .whl2/pydantic-*.whl .whl2/pydantic_core-*.whl .whl2/annotated_types-*.whl .whl2/typing_inspection-*.whl .whl2/typing_extensions-*.whl"
DS_RUN="PYTHONPATH=/tmp/dsite${PYTHONPATH:+:$PYTHONPATH} python3 -m ulskip.bench.deepspeed_compare run --model ${ZERO_MODEL:-/root/smollm2} --train-file ${ZERO_DATA:-/root/data-fr/train.jsonl}"
declare -A RC SECS

stage() {  # stage NAME LIMIT_S COMMAND...: a stage past its limit is killed, the next one runs
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name: $*"
  timeout "$limit" bash -c "$*" > "$OUT/$name.log" 2>&1
  RC[$name]=$?
  SECS[$name]=$((SECONDS - t0))
  tail -25 "$OUT/$name.log"
}

GPU=$(nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader 2>&1)
echo "gpu: $GPU"
for s in "${STAGES[@]}"; do
  case $s in
    build)  stage build 90 "bash bench/gpu_build.sh"
            [ "${RC[build]}" = 0 ] || { echo "build failed: stopping"; break; } ;;
    test)   stage test 240 "python3 -m pytest -q -m gpu tests" ;;
    kbench) stage kbench 120 "python3 -m ulskip.bench.kernels --out $OUT/kernel_bench.md" ;;
    quick)  stage quick 200 "$BENCH --model llama-2-7b --systems ulskip --json $OUT/quick.json" ;;
    quick1) stage quick1 120 "$BENCH --model llama-2-7b --systems ulskip --batch-sizes 1 --json $OUT/quick1.json" ;;
    bloomu1) stage bloomu1 90 "$BENCH --model bloom-7b1 --systems ulskip --batch-sizes 1 --json $OUT/bloom1.json" ;;
    recheck) stage recheck 120 "$BENCH --model llama-2-7b --systems ulskip,hf-eager-skip --target-speedups 1,2 --batch-sizes 1,16 --json $OUT/recheck.json" ;;
    llama)  stage llama 200 "$BENCH --model llama-2-7b --systems ulskip,hf-eager-full,hf-eager-skip --json $OUT/llama-2-7b.a.json" ;;
    llamac) stage llamac 280 "$BENCH --model llama-2-7b --systems hf-compile-skip --batch-sizes 1,16 --json $OUT/llama-2-7b.b.json" ;;
    bloomu) stage bloomu 120 "$BENCH --model bloom-7b1 --systems ulskip --json $OUT/bloom-7b1.u.json" ;;
    bloom)  stage bloom 170 "$BENCH --model bloom-7b1 --systems ulskip,hf-eager-full,hf-eager-skip --json $OUT/bloom-7b1.a.json" ;;
    bloomc) stage bloomc 230 "$BENCH --model bloom-7b1 --systems hf-compile-skip --batch-sizes 1,16 --json $OUT/bloom-7b1.b.json" ;;
    train)  stage train 60 "python3 -m ulskip.bench.train --out $OUT/train_bench.json" ;;
    trainshort) stage trainshort 300 "for b in 8 64; do python3 -m ulskip.cli train --model-name-or-path ${TS_MODEL:-/root/smollm2} --train-file ${TS_DATA:-/root/data-fr/train.jsonl} --output-dir /tmp/trainshort\$b --overwrite-output-dir --packing --block-size 512 --per-device-train-batch-size \$b --max-steps 60 --learning-rate 2e-4 --bf16 --use-fused-kernels --target-speedup 2 --save-steps 100000 --logging-steps 20 || exit 1; done" ;;
    trainvs) stage trainvs 300 "python3 -m ulskip.bench.train_vs_trainer --model ${TS_MODEL:-/root/smollm2} --train-file ${TS_DATA:-/root/data-fr/train.jsonl} ${TVT_ARGS:-} --json $OUT/train_vs_trainer.json" ;;
    train2) stage train2 150 "CUDA_VISIBLE_DEVICES=0,1 torchrun --nproc_per_node 2 -m ulskip.bench.train --out $OUT/train_bench_x2.json" ;;
    old1)   stage old1 300 "cd .old && OUT=$OUT/old bash bench/gpu_check.sh build quick1" ;;
    serve)  stage serve 200 "python3 -m pytest -q -m gpu tests/runtime/test_engine_gpu.py -k 'continuous or chunked' && python3 -m ulskip.bench.serve_load --model llama-2-7b --target-speedup 2 --max-batch-size 16 --concurrency 1,4,16 --json $OUT/serve_load.json" ;;
    servelong) stage servelong 400 "for c in 512 3096; do python3 -m ulskip.bench.serve_load --model llama-2-7b --target-speedup 2 --max-batch-size 16 --concurrency 4,16 --prompt-len 1024:3000 --output-len 32:96 --prefill-chunk \$c --json $OUT/serve_long_chunk\$c.json || exit 1; done" ;;
    floors) stage floors 200 "python3 -m ulskip.bench.floors --model llama-2-7b --batch 64 --prompt-len 128 --json $OUT/floors_7b.json" ;;
    pchunk) stage pchunk 200 "python3 -m ulskip.bench.prefill_chunks --model llama-2-7b --target-speedup 2 --length 2048 --chunk 512 --json $OUT/prefill_chunks.json" ;;
    tcomp)  stage tcomp 580 "$BENCH --model llama-2-7b --systems ulskip,torch-compile --json $OUT/tcomp.json" ;;
    tcomp1) stage tcomp1 300 "$BENCH --model llama-2-7b --systems ulskip,torch-compile --batch-sizes 1 --json $OUT/tcomp1.json" ;;
    spec7b) stage spec7b 330 "python3 -m ulskip.bench.speculative cost --model llama-2-7b --batch-sizes 1,8,32 --draft-speedups 2,3 --num-draft-tokens 2,3,4,6,8 ${SPEC_ACCEPT:+--acceptance $SPEC_ACCEPT} --json $OUT/spec_cost_7b.json" ;;
    specreal) stage specreal 300 "python3 -m ulskip.bench.speculative real --model $SPEC_CKPT --data $SPEC_DATA --batch-sizes 1,8,32 --draft-speedups ${SPEC_DRAFTS:-2,3} --num-draft-tokens ${SPEC_KS:-2,3,4,5,6,8} --json $OUT/spec_real.json" ;;
    study)  stage study 580 "python3 -m ulskip.bench.quality run --model $STUDY_MODEL --data $STUDY_DATA --out $STUDY_OUT --steps $STUDY_STEPS $STUDY_ARGS" ;;
    deepspeed) stage deepspeed 540 "$DS_INSTALL && $DS_RUN --out $OUT/deepspeed ${ZERO_ARGS:-}" ;;
    deepspeed2) stage deepspeed2 580 "$DS_INSTALL && CUDA_VISIBLE_DEVICES=0,1 $DS_RUN --gpus 2 --out $OUT/deepspeed2 --baseline ${ZERO_BASELINE:-$OUT/deepspeed} ${ZERO_ARGS:-}" ;;
    prof)   stage prof 120 "python3 -m ulskip.bench.profile_decode" ;;
    smol1)  stage smol1 150 "$BENCH --model ${PROF_CKPT:-/root/smollm2} --systems ulskip --target-speedups 1,2,4 --batch-sizes 1,16 --prompt-len 64 --new-tokens 64 --json $OUT/smol1.json" ;;
    dtprof) stage dtprof 200 "for d in fp32 bf16; do python3 -m ulskip.bench.profile_decode --checkpoint ${PROF_CKPT:-/root/smollm2} --dtype \$d || exit 1; done" ;;
    gemv)   stage gemv 150 "python3 -m ulskip.bench.gemv_probe" ;;
    gemvf)  stage gemvf 300 "python3 -m ulskip.bench.gemv_probe --fused" ;;
    gemvs)  stage gemvs 400 "python3 -m ulskip.bench.gemv_probe --fused --shapes smollm2" ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done

echo; echo "== summary ($GPU)"
printf "%-8s %4s %6s\n" stage rc secs
for s in "${STAGES[@]}"; do printf "%-8s %4s %6s\n" "$s" "${RC[$s]}" "${SECS[$s]}"; done
