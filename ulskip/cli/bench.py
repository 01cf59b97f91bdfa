"""`ulskip bench`: generated tokens/s of the ULS engine against Hugging Face baselines, with roofline.

One command a user can rerun for every speed claim:

    ulskip bench                                   # llama-2-7b shape on a GPU, tiny-llama on a CPU
    ulskip bench --model bloom-7b1 --json out.json --plot out.png

The systems and what is measured: ulskip/bench/sweep.py. Every input is checked here, before anything
is allocated.
"""
from __future__ import annotations

import argparse
import os
import sys

from ulskip.bench.models import CPU_DEFAULT_MODEL, GPU_DEFAULT_MODEL, SHAPES, num_layers, resolve_model
from ulskip.bench.report import SYSTEMS, derive, format_table, write_json, write_plot

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
GPU_DEFAULT_BATCHES, CPU_DEFAULT_BATCHES = "1,16,64", "1,4"


class BenchError(ValueError):
    """Bad input, reported before anything is allocated."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"named shape ({', '.join(SHAPES)}) with random weights, or a local checkpoint "
                        f"folder; default {GPU_DEFAULT_MODEL} with a GPU, {CPU_DEFAULT_MODEL} without")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--target-speedups", default="1,2,4", help="comma list of ULS target speedups")
    p.add_argument("--strategy", default="paper", choices=("paper", "even"), help="layer selection rule")
    p.add_argument("--batch-sizes", default=None,
                   help=f"comma list (default {GPU_DEFAULT_BATCHES} on GPU, {CPU_DEFAULT_BATCHES} on CPU)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=128, help="generated tokens per sequence")
    p.add_argument("--prefill", default="full", choices=("full", "skip"), help="ulskip prefill mode")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list from {', '.join(SYSTEMS)}")
    p.add_argument("--warmup", type=int, default=1, help="warm-up generates per row (not timed)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed generates per row, median reported (default 2 on GPU, 1 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and prompts")
    p.add_argument("--json", metavar="PATH", help="write all rows and the run's metadata as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: tokens/s and %% of roofline vs batch size")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="do not run: combine earlier --json files into one table/--json/--plot")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU only: torch intra-op threads for the run (default 1 for the tiny-* shapes, "
                        "which gain nothing from more and slow down badly on a busy machine; torch's "
                        "setting otherwise)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


# ----------------------------------------------------------------------------------------------------
# Input checks (before anything is allocated)
# ----------------------------------------------------------------------------------------------------


def _int_list(text: str, what: str) -> list[int]:
    out = []
    for tok in str(text).split(","):
        try:
            v = int(tok)
        except ValueError:
            raise BenchError(f"{what}: {tok.strip()!r} is not an integer (expected a comma list like 1,16,64)")
        if v <= 0:
            raise BenchError(f"{what}: batch size must be a positive integer, got {v}")
        out.append(v)
    return list(dict.fromkeys(out))


def _float_list(text: str, what: str) -> list[float]:
    out = []
    for tok in str(text).split(","):
        try:
            v = float(tok)
        except ValueError:
            raise BenchError(f"{what}: {tok.strip()!r} is not a number (expected a comma list like 1,2,4)")
        out.append(v)
    return list(dict.fromkeys(out))


def resolve_args(args) -> dict:
    """Check every input and fill the device-dependent defaults. Raises BenchError; allocates nothing."""
    import torch
    from ulskip.schedule import uls_schedule

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(dev)
    except RuntimeError as e:
        raise BenchError(f"--device {dev!r}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {dev!r}: CUDA is not available on this machine (use --device cpu)")
    if device.type not in ("cuda", "cpu"):
        raise BenchError(f"--device {dev!r}: only cuda and cpu are supported")
    gpu = device.type == "cuda"
    model = args.model or (GPU_DEFAULT_MODEL if gpu else CPU_DEFAULT_MODEL)
    try:
        cfg, max_pos, desc = resolve_model(model)
    except ValueError as e:
        raise BenchError(str(e))
    L = num_layers(cfg)

    speedups = _float_list(args.target_speedups, "--target-speedups")
    kept = {}
    for s in speedups:
        try:
            kept[s] = uls_schedule(L, s, args.strategy)
        except ValueError as e:
            raise BenchError(f"--target-speedups {s:g} for {model} ({L} layers): {e}")
    batches = _int_list(args.batch_sizes or (GPU_DEFAULT_BATCHES if gpu else CPU_DEFAULT_BATCHES),
                        "--batch-sizes")
    if args.prompt_len < 1:
        raise BenchError(f"--prompt-len must be >= 1, got {args.prompt_len}")
    if args.new_tokens < 1:
        raise BenchError(f"--new-tokens must be >= 1, got {args.new_tokens}")
    if max_pos is not None and args.prompt_len + args.new_tokens > max_pos:
        raise BenchError(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} = "
                         f"{args.prompt_len + args.new_tokens} exceeds {model}'s maximum of {max_pos} positions")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems:
        raise BenchError(f"--systems: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(SYSTEMS)}")
    repeats = args.repeats if args.repeats is not None else (2 if gpu else 1)
    if repeats < 1 or args.warmup < 0:
        raise BenchError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {args.warmup}")
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if gpu else "fp32")])
    if args.threads is not None and args.threads < 1:
        raise BenchError(f"--threads must be >= 1, got {args.threads}")
    for opt in ("json", "plot"):
        path = getattr(args, opt)
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise BenchError(f"--{opt} {path!r}: folder {os.path.dirname(os.path.abspath(path))!r} does not exist")
    return dict(device=device, model=model, config=cfg, max_positions=max_pos, description=desc,
                num_layers=L, speedups=speedups, kept=kept, batches=batches, systems=systems,
                repeats=repeats, dtype=dtype, gpu=gpu)


def _command(args, r) -> str:
    parts = ["ulskip bench", f"--model {r['model']}", f"--device {r['device']}",
             f"--dtype {[k for k, v in DTYPES.items() if v == str(r['dtype']).split('.')[-1]][0]}",
             f"--target-speedups {','.join(f'{s:g}' for s in r['speedups'])}",
             f"--batch-sizes {','.join(map(str, r['batches']))}",
             f"--prompt-len {args.prompt_len}", f"--new-tokens {args.new_tokens}",
             f"--prefill {args.prefill}", f"--systems {','.join(r['systems'])}",
             f"--warmup {args.warmup}", f"--repeats {r['repeats']}", f"--seed {args.seed}"]
    if args.strategy != "paper":
        parts.append(f"--strategy {args.strategy}")
    return " ".join(parts)


def _emit(args, rows, meta) -> None:
    print(format_table(rows, meta))
    if args.json:
        write_json(args.json, rows, meta)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(args.plot, rows, meta)
        print(f"wrote {args.plot}")


def _merge(args) -> int:
    for opt in ("json", "plot"):
        path = getattr(args, opt)
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            print(f"ulskip bench: error: --{opt} {path!r}: folder does not exist", file=sys.stderr)
            return 2
    from ulskip.bench.report import merge
    try:
        rows, meta = merge(args.merge, note=lambda m: print(f"ulskip bench: note: {m}", file=sys.stderr))
    except ValueError as e:
        print(f"ulskip bench: error: {e}", file=sys.stderr)
        return 2
    _emit(args, rows, meta)
    return 0


def run(args) -> int:
    if args.merge:
        return _merge(args)
    try:
        r = resolve_args(args)
    except BenchError as e:
        print(f"ulskip bench: error: {e}", file=sys.stderr)
        return 2
    threads = torch_threads = None
    want = args.threads or (1 if r["model"].startswith("tiny-") else None)
    if want and not r["gpu"]:
        import torch
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(want)
        threads = want

    def save_partial(rows, meta):   # a run killed by a time limit still leaves its finished rows
        if args.json:
            derive(rows)
            write_json(args.json, rows, dict(meta, complete=False))
    from ulskip.bench.sweep import sweep
    r["command"] = _command(args, r)
    try:
        rows, meta = sweep(args, r, progress=not args.no_progress, on_row=save_partial)
        meta["complete"] = True
    finally:
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
    meta["cpu_threads"] = threads
    _emit(args, rows, meta)
    return 0 if any(row["status"] == "ok" for row in rows) else 1
