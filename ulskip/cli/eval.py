"""`ulskip eval CKPT --data test.jsonl`: decode with the engine under a schedule; BLEU, chrF, perplexity.

    ulskip eval out/uls-2x --data data/de/test.jsonl                       # the checkpoint's own schedule
    ulskip eval ckpt --data test.jsonl --target-speedup 2 --strategy early-exit
    ulskip eval ckpt --data test.jsonl --paper-decode --json result.json   # 4 beams, no_repeat_ngram_size 3
"""
import json
import os
import sys

from ulskip.cli import (add_schedule_arguments, check_checkpoint, check_choice, check_device, check_finite, check_min,
                        check_output_file, check_schedule_arguments, data_files, require, schedule_kwargs)


def add_arguments(p):
    p.add_argument("model", help="local Hugging Face checkpoint folder, with its tokenizer (required)")
    p.add_argument("--data", required=True, help="json/jsonl file(s) of {prefix, text[, reference]} records "
                                                 "(glob, comma-separated) (required, no default)")
    add_schedule_arguments(p)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N >= 1 records only (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call, >= 1 (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="longest hypothesis in tokens, >= 1 (default %(default)s)")
    p.add_argument("--num-beams", type=int, default=1,
                   help="beam search with N >= 1 beams (default %(default)s: greedy)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0,
                   help="ban repeated n-grams of this size, >= 0 (default %(default)s: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="CTRL repetition penalty, a finite number > 0 (default %(default)s: off)")
    p.add_argument("--paper-decode", action="store_true",
                   help="the paper's decode settings: --num-beams 4 --no-repeat-ngram-size 3 (default: off)")
    p.add_argument("--no-perplexity", action="store_true",
                   help="skip the teacher-forced perplexity (default: off, compute it)")
    p.add_argument("--dtype", default=None,
                   help="fp32, fp16 or bf16 (also float32, float16, half, bfloat16) (default: on a GPU the "
                        "checkpoint's fp16/bf16, bf16 for an fp32 one; fp32 on the CPU)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="write metrics, settings and hypotheses as JSON (default: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: off, show it)")


def _check(args):
    for name in ("batch_size", "max_new_tokens", "num_beams"):
        check_min(f"--{name.replace('_', '-')}", getattr(args, name), 1)
    check_min("--limit", args.limit, 1)
    check_min("--no-repeat-ngram-size", args.no_repeat_ngram_size, 0, ">= 0 (0 = off)")
    check_finite("--repetition-penalty", args.repetition_penalty, "a finite number > 0 (1 = off)")
    require(args.repetition_penalty > 0, "--repetition-penalty", "a finite number > 0 (1 = off)",
            args.repetition_penalty)
    check_schedule_arguments(args)
    from ulskip.runtime.engine import DTYPES
    check_choice("--dtype", args.dtype, list(DTYPES))
    check_device(args.device)
    check_output_file("--json", args.json)
    check_checkpoint(args.model, needs_tokenizer="evaluation")
    if args.paper_decode:
        args.num_beams, args.no_repeat_ngram_size = 4, 3


def run(args) -> int:
    from ulskip import Engine
    from ulskip.eval.evaluate import evaluate, read_records, tokenize
    from ulskip.loading.tokenizer import load_tokenizer

    _check(args)
    records = read_records(data_files(args.data), args.limit)
    tok = load_tokenizer(args.model)
    exs = tokenize(tok, records)
    longest = max(len(e["prompt"]) + max(len(e["response"]), args.max_new_tokens) for e in exs)
    eng = Engine.from_pretrained(args.model, dtype=args.dtype, device=args.device,
                                 max_batch_size=args.batch_size * args.num_beams, max_seq_len=longest,
                                 **schedule_kwargs(args))
    result = evaluate(eng, records, args.batch_size, args.max_new_tokens, args.num_beams,
                      args.no_repeat_ngram_size, args.repetition_penalty, not args.no_perplexity,
                      progress=not args.no_progress)
    settings = {"model": os.path.abspath(args.model), "data": args.data, "kept_layers": eng.kept_layers,
                "num_layers": eng.num_layers, "prefill": eng.prefill_mode, "strategy": args.strategy,
                "target_speedup": args.target_speedup, "num_beams": args.num_beams,
                "no_repeat_ngram_size": args.no_repeat_ngram_size, "repetition_penalty": args.repetition_penalty,
                "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "device": str(eng.device),
                "dtype": str(eng.dtype).replace("torch.", ""),
                "skipdecode": eng.skipdecode.as_dict() if eng.skipdecode is not None else None}
    ppl = f"{result['perplexity']:.3f}" if result["perplexity"] is not None else "-"
    tps = f"{result['tokens_per_s']:.1f}" if result["tokens_per_s"] else "-"
    print(f"{'records':>7}  {'kept':>7}  prefill  {'BLEU':>6}  {'chrF':>6}  {'ppl':>8}  {'tok/s':>8}")
    print(f"{result['records']:>7}  {len(eng.kept_layers):>3}/{eng.num_layers:<3}  {eng.prefill_mode:>7}  "
          f"{result['bleu']:6.2f}  {result['chrf']:6.2f}  {ppl:>8}  {tps:>8}")
    print(f"kept layers: {','.join(map(str, eng.kept_layers))}; {result['bleu_signature']}", file=sys.stderr)
    if args.json:
        tmp = f"{args.json}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump({"settings": settings, **result}, f, indent=1)
            os.replace(tmp, args.json)  # a complete file or none
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        print(f"wrote {args.json}")
    return 0
