"""Self-speculative decoding measured: acceptance on a real checkpoint and real prompts, and the cost of a
round on a named shape (random weights), from which the speedup at the real acceptance is projected.

    python -m ulskip.bench.speculative real --model CKPT --data test.jsonl --json spec.json
    python -m ulskip.bench.speculative cost --model llama-2-7b --json cost.json [--acceptance spec.json]
    python -m ulskip.bench.speculative project --cost cost.json --acceptance spec.json   # offline, markdown

real: the checkpoint's all-layers greedy decoding (the baseline) and speculative decoding for every
(batch size, draft speedup, k) over the same records (prompts = the records' prefixes as `ulskip eval`
builds them, EOS on): tokens/s, acceptance, tokens per verify pass, and how many sequences are identical
to the baseline's (bf16 rounding may flip near ties; fp32 is exact, tests/runtime/test_speculative.py).
cost: random weights accept next to nothing, but a round costs the same whatever is accepted (k draft
steps + one verify pass + the acceptance ops), so ms per round is measured there, and the speedup at the
tokens per verify pass of a real run is projected: batch * tokens_per_verify / ms_per_round against the
all-layers decode step. Labelled as a projection wherever it is printed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import warnings

import torch

from ulskip.bench.report import write_json
from ulskip.bench.timing import timed


def _ints(s):
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s):
    return [float(x) for x in s.split(",") if x.strip()]


def _meta(args, device, dtype):
    import transformers
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "argv": sys.argv,
            "dtype": str(dtype).removeprefix("torch.")}  # what ran, not the flag (None = the checkpoint's)


def _save(path, meta, rows, complete):
    """Rewritten after every row ("complete": false until the end): a run its time limit stops keeps
    the rows it finished."""
    if path:
        write_json(path, rows, {**meta, "complete": complete})


def _generate(eng, prompts, batch, spec, max_new, eos):
    """All prompts in batches of `batch` -> (seconds, sequences, summed stats)."""
    seqs, secs, acc, rr, rounds = [], 0.0, 0, 0, 0
    for i in range(0, len(prompts), batch):
        t, out = timed(lambda: eng.generate(prompts[i:i + batch], max_new_tokens=max_new, eos_token_id=eos,
                                            speculative=spec), eng.device)
        secs += t
        seqs += out.sequences
        if out.speculative:
            acc += out.speculative["accepted_drafts"]
            rr += out.speculative["row_rounds"]
            rounds += out.speculative["rounds"]
    return secs, seqs, {"accepted_drafts": acc, "row_rounds": rr, "rounds": rounds}


def cmd_real(args):
    from ulskip import Engine
    from ulskip.eval.evaluate import read_records, tokenize

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    eng = Engine.from_pretrained(args.model, target_speedup=1, dtype=args.dtype, device=device,
                                 max_batch_size=max(_ints(args.batch_sizes)), max_seq_len=args.max_seq_len)
    recs = read_records([args.data], limit=args.records)
    prompts = [ex["prompt"] for ex in tokenize(eng.tokenizer, recs)]
    eos = eng.eos_token_ids or None
    meta = {**_meta(args, device, eng.dtype), "model": args.model, "data": args.data, "records": len(prompts),
            "max_new_tokens": args.max_new_tokens, "repeats": args.repeats}
    rows, first = [], None
    for b in _ints(args.batch_sizes):
        _generate(eng, prompts[:b], b, None, args.max_new_tokens, eos)  # warm-up: graphs captured
        # the fastest of --repeats passes over all records (the first pass also lets the clocks ramp up)
        t0, base, _ = min((_generate(eng, prompts, b, None, args.max_new_tokens, eos) for _ in range(args.repeats)),
                          key=lambda r: r[0])
        n0 = sum(len(s) for s in base)
        row = {"batch_size": b, "system": "all layers", "tokens": n0, "seconds": t0, "tokens_per_s": n0 / t0}
        # the identity column's noise floor: in bf16, all-layers greedy decoding itself can differ between
        # batch sizes (other kernels, other rounding), and speculation cannot be more exact than that
        first = first or (b, base)
        row["identical_to_first_batch"] = sum(a == c for a, c in zip(base, first[1]))
        rows.append(row)
        _save(args.json, meta, rows, False)
        print(f"bs {b:3d}  all layers               {n0 / t0:9.1f} tok/s  identical to batch {first[0]}: "
              f"{row['identical_to_first_batch']}/{len(base)}", flush=True)
        for s in _floats(args.draft_speedups):
            for k in _ints(args.num_draft_tokens):
                spec = {"draft_speedup": s, "num_draft_tokens": k}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore" if args.quiet_warnings else "default")
                    _generate(eng, prompts[:b], b, spec, args.max_new_tokens, eos)
                    t, seqs, st = min((_generate(eng, prompts, b, spec, args.max_new_tokens, eos)
                                       for _ in range(args.repeats)), key=lambda r: r[0])
                n = sum(len(q) for q in seqs)
                same = sum(a == c for a, c in zip(seqs, base))
                rr = st["row_rounds"]
                row = {"batch_size": b, "system": "speculative", "draft_speedup": s, "num_draft_tokens": k,
                       "tokens": n, "seconds": t, "tokens_per_s": n / t, "speedup": (n / t) / (n0 / t0),
                       "acceptance_rate": st["accepted_drafts"] / (k * rr) if rr else None,
                       "tokens_per_verify": (st["accepted_drafts"] + rr) / rr if rr else None,
                       "rounds": st["rounds"], "identical_sequences": same, "sequences": len(seqs)}
                rows.append(row)
                _save(args.json, meta, rows, False)
                print(f"bs {b:3d}  draft {s:g}x k={k}  {row['tokens_per_s']:9.1f} tok/s  {row['speedup']:.2f}x  "
                      f"accept {row['acceptance_rate']:.3f}  tok/verify {row['tokens_per_verify']:.2f}  "
                      f"identical {same}/{len(seqs)}", flush=True)
    _save(args.json, meta, rows, True)
    return 0


def cmd_cost(args):
    from ulskip import Engine
    from ulskip.bench.models import build_hf_model

    device = torch.device(args.device or "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype or "bf16"]
    hf = build_hf_model(args.model, device, dtype)
    real = _tokens_per_verify(args.acceptance) if args.acceptance else {}
    P, N = args.prompt_len, args.new_tokens
    g = torch.Generator().manual_seed(0)
    meta = {**_meta(args, device, dtype), "model": args.model, "prompt_len": P, "new_tokens": N,
            "acceptance_from": args.acceptance,
            "note": "random weights: round costs measured; speedups projected at the acceptance of --acceptance"}
    rows = []
    for b in _ints(args.batch_sizes):
        eng = Engine.from_hf_model(hf, target_speedup=1, max_batch_size=b, max_seq_len=P + N + 16)
        prompts = torch.randint(10, hf.config.vocab_size, (b, P), generator=g).tolist()

        def run(spec, n):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # random weights: the low-acceptance warning is expected
                return eng.generate(prompts, max_new_tokens=n, eos_token_id=None, speculative=spec)
        run(None, 8)
        t1, _ = timed(lambda: run(None, 1), device)
        tn, _ = timed(lambda: run(None, N), device)
        step = (tn - t1) / (N - 1)
        rows.append({"batch_size": b, "system": "all layers", "ms_per_step": step * 1e3})
        _save(args.json, meta, rows, False)
        print(f"bs {b:3d}  all layers: {step * 1e3:.3f} ms per step", flush=True)
        for s in _floats(args.draft_speedups):
            for k in _ints(args.num_draft_tokens):
                spec = {"draft_speedup": s, "num_draft_tokens": k}
                run(spec, 2 * (k + 1))
                ts, out = timed(lambda: run(spec, N), device)
                rounds = out.speculative["rounds"]
                per_round = (ts - t1) / max(rounds, 1)
                tpv = real.get((b, s, k))
                row = {"batch_size": b, "system": "speculative", "draft_speedup": s, "num_draft_tokens": k,
                       "ms_per_round": per_round * 1e3, "rounds": rounds,
                       "round_over_step": per_round / step,
                       "measured_tokens_per_verify": out.speculative["tokens_per_verify"],
                       "real_tokens_per_verify": tpv,
                       "projected_speedup": tpv * step / per_round if tpv else None}
                rows.append(row)
                _save(args.json, meta, rows, False)
                proj = f"projected {row['projected_speedup']:.2f}x at {tpv:.2f} tok/verify" if tpv else ""
                print(f"bs {b:3d}  draft {s:g}x k={k}: {per_round * 1e3:.3f} ms per round = "
                      f"{per_round / step:.2f} steps  {proj}", flush=True)
        eng = run = None  # free this batch size's engine (its cache and graphs) before the next
        torch.cuda.empty_cache()
    _save(args.json, meta, rows, True)
    return 0


def _read_rows(path):
    """A result file's rows, with a warning when the run that wrote it stopped before its end."""
    with open(path) as f:
        out = json.load(f)
    if out.get("meta", {}).get("complete") is False:
        warnings.warn(f"{path} is from a run that stopped before its end ('complete': false): its missing rows "
                      "have no numbers here", stacklevel=3)
    return out["rows"]


def _tokens_per_verify(path):
    return {(r["batch_size"], r["draft_speedup"], r["num_draft_tokens"]): r["tokens_per_verify"]
            for r in _read_rows(path) if r["system"] == "speculative"}


def cmd_project(args):
    """The projection of a cost run at the tokens per verify pass of real runs (later files win), as a
    markdown table: speedup = tokens_per_verify * ms_per_step / ms_per_round, same batch, speedup and k."""
    tpv = {}
    for path in args.acceptance:
        tpv.update(_tokens_per_verify(path))
    rows = _read_rows(args.cost)
    step = {r["batch_size"]: r["ms_per_step"] for r in rows if r["system"] == "all layers"}
    print("| batch | draft | k | ms / step (all layers) | ms / round | round / step | tokens per verify (real) "
          "| projected speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["system"] != "speculative":
            continue
        b, s, k = r["batch_size"], r["draft_speedup"], r["num_draft_tokens"]
        t = tpv.get((b, s, k))
        proj = f"{t * step[b] / r['ms_per_round']:.2f}x" if t else "-"
        print(f"| {b} | {s:g}x | {k} | {step[b]:.2f} | {r['ms_per_round']:.2f} | {r['ms_per_round'] / step[b]:.2f} | "
              f"{f'{t:.2f}' if t else '-'} | {proj} |")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("real", "cost"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True, help="real: a checkpoint folder; cost: a named shape or folder")
        p.add_argument("--batch-sizes", default="1,8,32")
        p.add_argument("--draft-speedups", default="2,3")
        p.add_argument("--num-draft-tokens", default="2,3,4,5,6,8")
        p.add_argument("--dtype", default=None, help="bf16 / fp16 / fp32 (default: real = the engine's "
                       "default, bf16 for an fp32 checkpoint on a GPU; cost = bf16)")
        p.add_argument("--device", default=None)
        p.add_argument("--json", default=None)
    r = sub.choices["real"]
    r.add_argument("--data", required=True, help="records (.jsonl with prefix/text), e.g. the study's test.jsonl")
    r.add_argument("--records", type=int, default=64)
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--max-seq-len", type=int, default=512)
    r.add_argument("--quiet-warnings", action="store_true")
    r.add_argument("--repeats", type=int, default=2, help="timed passes per row, the fastest reported (default 2)")
    c = sub.choices["cost"]
    c.add_argument("--prompt-len", type=int, default=128)
    c.add_argument("--new-tokens", type=int, default=128)
    c.add_argument("--acceptance", default=None, help="a `real` --json file: project speedups at its tokens/verify")
    j = sub.add_parser("project", help="a cost run's projected speedups at real runs' acceptance (markdown)")
    j.add_argument("--cost", required=True)
    j.add_argument("--acceptance", nargs="+", required=True, help="`real` --json files (later ones win)")
    args = ap.parse_args(argv)
    return {"real": cmd_real, "cost": cmd_cost, "project": cmd_project}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
