"""`ulskip generate PATH --target-speedup 2 --prompt "..."`: generation with layer skipping."""
import json
import sys
import time

from ulskip.schedule import STRATEGIES


def add_arguments(p):
    p.add_argument("model", help="local Hugging Face checkpoint folder")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable); needs a tokenizer in the folder")
    p.add_argument("--prompt-ids", action="append", help="comma-separated token ids (repeatable)")
    p.add_argument("--target-speedup", type=float, default=None,
                   help="target speedup s (default: the checkpoint's ulskip section, else all layers)")
    p.add_argument("--strategy", default="paper", choices=STRATEGIES,
                   help="layer policy for --target-speedup (default paper: the ULS rule)")
    p.add_argument("--calibration", default=None, help="--strategy shortgpt: the scores file of `ulskip calibrate`")
    p.add_argument("--layer-seed", type=int, default=0, help="--strategy random: seed of the drawn layers (default 0)")
    p.add_argument("--prefill", default=None, choices=("full", "skip"))
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: checkpoint dtype on GPU, fp32 on CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-eos", action="store_true", help="ignore the tokenizer's EOS token")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args) -> int:
    from ulskip import Engine
    prompts = list(args.prompt or [])
    try:
        prompts += [[int(t) for t in s.split(",")] for s in (args.prompt_ids or [])]
    except ValueError:
        raise SystemExit(f"ulskip generate: --prompt-ids must be comma-separated integers, got {args.prompt_ids!r}")
    if not prompts:
        raise SystemExit("ulskip generate: give at least one --prompt or --prompt-ids")
    try:
        bi = None
        if args.calibration:
            from ulskip.calibration import read_block_influence
            bi = read_block_influence(args.calibration)
        eng = Engine.from_pretrained(args.model, target_speedup=args.target_speedup, prefill=args.prefill,
                                     dtype=args.dtype, device=args.device, strategy=args.strategy,
                                     max_batch_size=len(prompts) * args.num_beams, layer_seed=args.layer_seed,
                                     block_influence=bi)
        eos = None
        if eng.tokenizer is not None and not args.no_eos:
            eos = eng.tokenizer.eos_token_id
        t0 = time.perf_counter()
        out = eng.generate(prompts, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           num_beams=args.num_beams, eos_token_id=eos, seed=args.seed)
        secs = time.perf_counter() - t0
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"ulskip generate: {e}")
    n = sum(len(s) for s in out.sequences)
    if args.json:
        json.dump({"kept_layers": eng.kept_layers, "prefill": eng.prefill_mode, "sequences": out.sequences,
                   "texts": out.texts, "new_tokens": n, "seconds": secs}, sys.stdout)
        print()
        return 0
    print(f"kept layers ({len(eng.kept_layers)} of {eng.num_layers}, prefill={eng.prefill_mode}): "
          f"{','.join(map(str, eng.kept_layers))}")
    for i, seq in enumerate(out.sequences):
        print(f"--- [{i}] {out.texts[i] if out.texts else seq}")
    print(f"{n} new tokens in {secs:.2f} s ({n / secs:.1f} tokens/s, {eng.device}, {str(eng.dtype)[6:]})")
    return 0
