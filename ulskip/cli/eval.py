"""`ulskip eval CKPT --data test.jsonl`: decode with the engine under a schedule; BLEU, chrF, perplexity.

    ulskip eval out/uls-2x --data data/de/test.jsonl                       # the checkpoint's own schedule
    ulskip eval ckpt --data test.jsonl --target-speedup 2 --strategy early-exit
    ulskip eval ckpt --data test.jsonl --paper-decode --json result.json   # 4 beams, no_repeat_ngram_size 3
"""
import json
import os
import sys

from ulskip.schedule import PREFILL_MODES, STRATEGIES


def add_arguments(p):
    p.add_argument("model", help="local Hugging Face checkpoint folder (with its tokenizer)")
    p.add_argument("--data", required=True, help="json/jsonl file(s) of {prefix, text[, reference]} records "
                                                 "(glob, comma-separated)")
    p.add_argument("--target-speedup", type=float, default=None,
                   help="target speedup s (default: the checkpoint's ulskip section, else all layers)")
    p.add_argument("--strategy", default="paper", choices=STRATEGIES, help="layer policy for --target-speedup "
                                                                          "(default paper: the ULS rule)")
    p.add_argument("--calibration", default=None, help="--strategy shortgpt: the scores file of `ulskip calibrate`")
    p.add_argument("--layer-seed", type=int, default=0, help="--strategy random: seed of the drawn layers (default 0)")
    p.add_argument("--prefill", default=None, choices=PREFILL_MODES,
                   help="prompt pass through all layers (full) or the kept ones (skip); default: the checkpoint's, "
                        "else full")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N records only (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest hypothesis in tokens (default 64)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with N beams (default 1: greedy)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0, help="ban repeated n-grams (default 0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL repetition penalty (default 1: off)")
    p.add_argument("--paper-decode", action="store_true",
                   help="the paper's decode settings: --num-beams 4 --no-repeat-ngram-size 3")
    p.add_argument("--no-perplexity", action="store_true", help="skip the teacher-forced perplexity")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: checkpoint dtype on GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--json", metavar="PATH", default=None, help="write metrics, settings and hypotheses as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check(args):
    for name in ("batch_size", "max_new_tokens", "num_beams"):
        v = getattr(args, name)
        if v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise ValueError(f"--json {args.json!r}: folder {os.path.dirname(os.path.abspath(args.json))!r} does not exist")
    if args.paper_decode:
        args.num_beams, args.no_repeat_ngram_size = 4, 3


def run(args) -> int:
    from ulskip import Engine
    from ulskip.eval.evaluate import evaluate, read_records, tokenize
    from ulskip.loading.tokenizer import load_tokenizer
    from ulskip.train.data import DataError, resolve_files

    try:
        _check(args)
        records = read_records(resolve_files(args.data), args.limit)
        tok = load_tokenizer(args.model) if os.path.isdir(args.model) else None
        if tok is None:
            raise ValueError(f"{args.model!r} holds no tokenizer; evaluation needs one (folder missing or no "
                             "tokenizer files)")
        exs = tokenize(tok, records)
        longest = max(len(e["prompt"]) + max(len(e["response"]), args.max_new_tokens) for e in exs)
        bi = None
        if args.calibration:
            from ulskip.calibration import read_block_influence
            bi = read_block_influence(args.calibration)
        eng = Engine.from_pretrained(args.model, target_speedup=args.target_speedup, strategy=args.strategy,
                                     prefill=args.prefill, dtype=args.dtype, device=args.device,
                                     max_batch_size=args.batch_size * args.num_beams, max_seq_len=longest,
                                     layer_seed=args.layer_seed, block_influence=bi)
        result = evaluate(eng, records, args.batch_size, args.max_new_tokens, args.num_beams,
                          args.no_repeat_ngram_size, args.repetition_penalty, not args.no_perplexity,
                          progress=not args.no_progress)
    except (DataError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"ulskip eval: {e}")
    settings = {"model": os.path.abspath(args.model), "data": args.data, "kept_layers": eng.kept_layers,
                "num_layers": eng.num_layers, "prefill": eng.prefill_mode, "strategy": args.strategy,
                "target_speedup": args.target_speedup, "num_beams": args.num_beams,
                "no_repeat_ngram_size": args.no_repeat_ngram_size, "repetition_penalty": args.repetition_penalty,
                "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "device": str(eng.device),
                "dtype": str(eng.dtype).replace("torch.", "")}
    ppl = f"{result['perplexity']:.3f}" if result["perplexity"] is not None else "-"
    tps = f"{result['tokens_per_s']:.1f}" if result["tokens_per_s"] else "-"
    print(f"{'records':>7}  {'kept':>7}  prefill  {'BLEU':>6}  {'chrF':>6}  {'ppl':>8}  {'tok/s':>8}")
    print(f"{result['records']:>7}  {len(eng.kept_layers):>3}/{eng.num_layers:<3}  {eng.prefill_mode:>7}  "
          f"{result['bleu']:6.2f}  {result['chrf']:6.2f}  {ppl:>8}  {tps:>8}")
    print(f"kept layers: {','.join(map(str, eng.kept_layers))}; {result['bleu_signature']}", file=sys.stderr)
    if args.json:
        tmp = f"{args.json}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"settings": settings, **result}, f, indent=1)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    return 0
