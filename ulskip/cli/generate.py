"""`ulskip generate PATH --target-speedup 2 --prompt "..."`: generation with layer skipping."""
import json
import os
import sys
import time

from ulskip.cli import (add_schedule_arguments, check_checkpoint, check_choice, check_device, check_finite, check_min,
                        check_schedule_arguments, check_seed, require, schedule_kwargs)


def add_arguments(p):
    p.add_argument("model", help="local Hugging Face checkpoint folder (required)")
    p.add_argument("--prompt", action="append",
                   help="prompt text (repeatable); needs a tokenizer in the folder (default: none; give at least "
                        "one --prompt or --prompt-ids)")
    p.add_argument("--prompt-ids", action="append",
                   help="comma-separated token ids >= 0, e.g. 1,450,7483 (repeatable; default: none)")
    add_schedule_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens to generate per prompt, >= 1 (default %(default)s)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding (default: off)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature, > 0 with --do-sample (default %(default)s)")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample from the k most likely tokens, >= 0 (default %(default)s: off)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: the smallest set of tokens of probability >= p, in (0, 1] "
                        "(default %(default)s: off)")
    p.add_argument("--num-beams", type=int, default=1,
                   help="beam search with N beams, >= 1 (default %(default)s: no beam search)")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed in [0, 2**63-1] (default: none, torch's global generator)")
    p.add_argument("--dtype", default=None,
                   help="fp32, fp16 or bf16 (also float32, float16, half, bfloat16) (default: on a GPU the "
                        "checkpoint's fp16/bf16, bf16 for an fp32 one; fp32 on the CPU)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--no-eos", action="store_true",
                   help="ignore the end tokens (default: off, stop at the tokenizer's EOS and the eos_token_id of "
                        "generation_config.json)")
    p.add_argument("--stop", action="append",
                   help="stop a sequence once its text contains this string (repeatable; needs the tokenizer; "
                        "default: none)")
    p.add_argument("--stream", action="store_true",
                   help="print the text as it is generated (one prompt, no beam search, not with --json; "
                        "default: off)")
    p.add_argument("--speculative-draft-speedup", type=float, default=None,
                   help="lossless mode: self-speculative decoding with all layers verifying what the ULS schedule "
                        "of this speedup (> 1) drafts; the output is the full model's (default: off)")
    p.add_argument("--num-draft-tokens", type=int, default=None,
                   help="with --speculative-draft-speedup: drafts per round, in [1, 15] (default 4)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text (default: off)")


def _prompt_ids(texts) -> list[list[int]]:
    out = []
    for s in texts or []:
        ids = []
        for tok in s.split(","):
            try:
                v = int(tok)
            except ValueError:
                v = None
            if v is None or v < 0:
                raise ValueError(f"--prompt-ids must be comma-separated integers >= 0, got {s!r}")
            ids.append(v)
        out.append(ids)
    return out


def check_args(args) -> list:
    """Every flag, before anything is loaded. Returns the prompts."""
    prompts = list(args.prompt or []) + _prompt_ids(args.prompt_ids)
    if not prompts:
        raise ValueError("give at least one --prompt or --prompt-ids")
    check_schedule_arguments(args)
    check_min("--max-new-tokens", args.max_new_tokens, 1)
    check_min("--num-beams", args.num_beams, 1)
    check_min("--top-k", args.top_k, 0, ">= 0 (0 = off)")
    require(0 < args.top_p <= 1, "--top-p", "in (0, 1]", args.top_p)
    if args.do_sample:
        check_finite("--temperature", args.temperature, "a finite number > 0 with --do-sample")
        require(args.temperature > 0, "--temperature", "> 0 with --do-sample", args.temperature)
        require(args.num_beams == 1, "--num-beams", "1 with --do-sample (beam search does not sample)",
                args.num_beams)
    check_seed("--seed", args.seed)
    if args.stop is not None:
        require(all(args.stop), "--stop", "a non-empty string", "")
        require(args.num_beams == 1, "--num-beams", "1 with --stop (beam search has no stop strings)", args.num_beams)
    if args.stream:
        require(len(prompts) == 1, "--stream", "used with one prompt", f"{len(prompts)} prompts")
        require(args.num_beams == 1, "--num-beams", "1 with --stream", args.num_beams)
        require(not args.json, "--stream", "used without --json", "--json")
    if args.num_draft_tokens is not None:
        require(args.speculative_draft_speedup is not None, "--num-draft-tokens", "used with "
                "--speculative-draft-speedup", args.num_draft_tokens)
    if args.speculative_draft_speedup is not None:
        from ulskip.runtime.speculative import MAX_DRAFT_TOKENS
        if args.num_draft_tokens is None:
            args.num_draft_tokens = 4
        for flag, v in (("--strategy", args.strategy), ("--prefill", args.prefill), ("--calibration", args.calibration)):
            require(v is None, flag, "left out with --speculative-draft-speedup (all layers verify; the draft is the "
                    "checkpoint's schedule for that speedup, else the paper's)", v)
        check_finite("--speculative-draft-speedup", args.speculative_draft_speedup, "a finite number > 1")
        require(args.speculative_draft_speedup > 1, "--speculative-draft-speedup", "> 1 (1 = no draft)",
                args.speculative_draft_speedup)
        require(1 <= args.num_draft_tokens <= MAX_DRAFT_TOKENS, "--num-draft-tokens", f"in [1, {MAX_DRAFT_TOKENS}]",
                args.num_draft_tokens)
        require(args.target_speedup is None, "--target-speedup", "left out with --speculative-draft-speedup (all "
                "layers verify; the draft's schedule is that speedup's)", args.target_speedup)
        require(args.num_beams == 1, "--num-beams", "1 with --speculative-draft-speedup", args.num_beams)
    from ulskip.runtime.engine import DTYPES
    check_choice("--dtype", args.dtype, list(DTYPES))
    check_device(args.device)
    check_checkpoint(args.model)
    if args.prompt or args.stop or args.stream:
        from ulskip.loading.tokenizer import TOKENIZER_FILES
        if not any(os.path.isfile(os.path.join(args.model, f)) for f in TOKENIZER_FILES):
            flag = "--prompt" if args.prompt else ("--stop" if args.stop else "--stream")
            raise ValueError(f"{flag}: string prompts, stop strings and streamed text need a tokenizer, and checkpoint folder {args.model!r} holds "
                             f"none ({', '.join(TOKENIZER_FILES)}); give --prompt-ids instead")
    return prompts


def run(args) -> int:
    prompts = check_args(args)
    from ulskip import Engine
    sched = schedule_kwargs(args)
    spec = None
    if args.speculative_draft_speedup is not None:
        sched["target_speedup"] = 1  # all layers verify
        spec = {"draft_speedup": args.speculative_draft_speedup, "num_draft_tokens": args.num_draft_tokens}
    eng = Engine.from_pretrained(args.model, dtype=args.dtype, device=args.device,
                                 max_batch_size=len(prompts) * args.num_beams, **sched)
    eos = None if args.no_eos else (eng.eos_token_ids or None)
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
              top_k=args.top_k, top_p=args.top_p, eos_token_id=eos, seed=args.seed, stop=args.stop)
    t0 = time.perf_counter()
    if args.stream:
        n = 0
        for ev in eng.stream(prompts, speculative=spec, **kw):
            print(ev.text, end="", flush=True)
            n += 1
        secs = time.perf_counter() - t0
        print(f"\n{n} new tokens in {secs:.2f} s ({n / secs:.1f} tokens/s, {eng.device}, {str(eng.dtype)[6:]})")
        return 0
    out = eng.generate(prompts, num_beams=args.num_beams, speculative=spec, **kw)
    secs = time.perf_counter() - t0
    n = sum(len(s) for s in out.sequences)
    if args.json:
        json.dump({"kept_layers": eng.kept_layers, "prefill": eng.prefill_mode, "sequences": out.sequences,
                   "texts": out.texts, "new_tokens": n, "seconds": secs, "speculative": out.speculative}, sys.stdout)
        print()
        return 0
    print(f"kept layers ({len(eng.kept_layers)} of {eng.num_layers}, prefill={eng.prefill_mode}): "
          f"{','.join(map(str, eng.kept_layers))}")
    if out.speculative:
        from ulskip.runtime.speculative import describe
        print(f"speculative: {describe(out.speculative)}")
    for i, seq in enumerate(out.sequences):
        print(f"--- [{i}] {out.texts[i] if out.texts else seq}")
    print(f"{n} new tokens in {secs:.2f} s ({n / secs:.1f} tokens/s, {eng.device}, {str(eng.dtype)[6:]})")
    return 0
