"""`ulskip bench`: generated tokens/s of the ULS engine against Hugging Face baselines, with roofline.

One command a user can rerun for every speed claim:

    ulskip bench                                   # llama-2-7b shape on a GPU, tiny-llama on a CPU
    ulskip bench --model bloom-7b1 --json out.json --plot out.png

The systems and what is measured: ulskip/bench/sweep.py. Every input is checked here, before anything
is allocated.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from ulskip.bench.models import CPU_DEFAULT_MODEL, GPU_DEFAULT_MODEL, SHAPES, num_layers, resolve_model
from ulskip.bench.report import DEFAULT_SYSTEMS, SYSTEMS, derive, format_table, write_json, write_plot
from ulskip.cli import SEED_MAX, check_device, check_output_file, describe

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
GPU_DEFAULT_BATCHES, CPU_DEFAULT_BATCHES = "1,16,64", "1,4"


class BenchError(ValueError):
    """Bad input, reported before anything is allocated."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"named shape ({', '.join(SHAPES)}) with random weights, or a local checkpoint "
                        f"folder (default: {GPU_DEFAULT_MODEL} with a GPU, {CPU_DEFAULT_MODEL} without)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--target-speedups", default="1,2,4",
                   help="comma list of ULS target speedups (default: %(default)s)")
    p.add_argument("--strategy", default="paper", choices=("paper", "even"),
                   help="layer selection rule (default: %(default)s)")
    p.add_argument("--batch-sizes", default=None,
                   help=f"comma list of integers >= 1 (default: {GPU_DEFAULT_BATCHES} on GPU, "
                        f"{CPU_DEFAULT_BATCHES} on CPU)")
    p.add_argument("--prompt-len", type=int, default=128,
                   help="prompt tokens per sequence, >= 1 (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=128,
                   help="generated tokens per sequence, >= 1 (default: %(default)s)")
    p.add_argument("--prefill", default="full", choices=("full", "skip"),
                   help="ulskip prefill mode (default: %(default)s)")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help=f"comma list from {', '.join(SYSTEMS)} (default: %(default)s). speculative: the engine "
                        "with all layers, drafting with the ULS schedule of each target speedup > 1 "
                        "(self-speculative decoding; random weights give next to no acceptance, so its tokens/s "
                        "there is the cost of a round per token)")
    p.add_argument("--num-draft-tokens", type=int, default=None,
                   help="speculative: drafts per round, in [1, 15] (default 4)")
    p.add_argument("--warmup", type=int, default=1,
                   help="warm-up generates per row (not timed), >= 0 (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed generates per row, median reported, >= 1 (default: 2 on GPU, 1 on CPU)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for weights and prompts, in [0, 2**63-1] (default: %(default)s)")
    p.add_argument("--json", metavar="PATH",
                   help="file to write all rows and the run's metadata to as JSON, rewritten after each row "
                        "(default: none)")
    p.add_argument("--plot", metavar="PATH",
                   help="file to write the plot to, tokens/s and %% of roofline vs batch size: PNG (.pdf or .svg "
                        "by its extension) (default: none)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="do not run: combine earlier --json files into one table/--json/--plot (default: run)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU only: torch intra-op threads for the run, >= 1 (default: 1 for the tiny-* shapes, "
                        "which gain nothing from more and slow down badly on a busy machine; torch's "
                        "setting otherwise)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar (default: off, show it)")


# ----------------------------------------------------------------------------------------------------
# Input checks (before anything is allocated)
# ----------------------------------------------------------------------------------------------------

PLOT_EXTENSIONS = ("", ".png", ".pdf", ".svg")


def _int_list(text: str, what: str) -> list[int]:
    out = []
    for tok in str(text).split(","):
        try:
            v = int(tok)
        except ValueError:
            raise BenchError(f"{what} must be a comma list of integers like 1,16,64, got {tok.strip()!r}")
        if v <= 0:
            raise BenchError(f"{what} must be integers >= 1, got {v}")
        out.append(v)
    return list(dict.fromkeys(out))


def _float_list(text: str, what: str) -> list[float]:
    out = []
    for tok in str(text).split(","):
        try:
            v = float(tok)
        except ValueError:
            raise BenchError(f"{what} must be a comma list of numbers like 1,2,4, got {tok.strip()!r}")
        out.append(v)
    return list(dict.fromkeys(out))


def _check_outputs(args) -> None:
    """--json / --plot: file paths in existing, writable folders, not folders themselves, not the same file;
    the plot's format known up front (what is printed is what is written)."""
    try:
        check_output_file("--json", args.json)
        check_output_file("--plot", args.plot)
    except (ValueError, OSError) as e:
        raise BenchError(str(e))
    if args.json and args.plot and os.path.abspath(args.json) == os.path.abspath(args.plot):
        raise BenchError(f"--json and --plot name the same file {args.json!r}; give two paths")
    if args.plot:
        ext = os.path.splitext(args.plot)[1].lower()
        if ext not in PLOT_EXTENSIONS:
            raise BenchError(f"--plot must end in .png, .pdf or .svg (or have no extension: PNG), got {args.plot!r}")
        if importlib.util.find_spec("matplotlib") is None:
            raise BenchError("--plot needs matplotlib: pip install matplotlib")


def resolve_args(args) -> dict:
    """Check every input and fill the device-dependent defaults. Raises BenchError; allocates nothing."""
    import torch
    from ulskip.schedule import uls_schedule

    try:
        dev = check_device(args.device) or ("cuda" if torch.cuda.is_available() else "cpu")
    except ValueError as e:
        raise BenchError(str(e))
    device = torch.device(dev)
    gpu = device.type == "cuda"
    model = args.model or (GPU_DEFAULT_MODEL if gpu else CPU_DEFAULT_MODEL)
    try:
        cfg, max_pos, desc = resolve_model(model)
    except (ValueError, OSError) as e:   # a folder's config.json that transformers cannot read: OSError
        msg = describe(e)
        raise BenchError(msg if msg.startswith("--model") else f"--model {model!r}: {msg}")
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
        raise BenchError(f"--systems must be a comma list from {', '.join(SYSTEMS)}, got unknown "
                         f"{', '.join(bad) or '(empty)'}")
    if args.num_draft_tokens is not None and "speculative" not in systems:
        raise BenchError("--num-draft-tokens is for --systems speculative, which is not in --systems")
    if args.num_draft_tokens is None:
        args.num_draft_tokens = 4
    if "speculative" in systems:
        from ulskip.runtime.speculative import MAX_DRAFT_TOKENS
        if args.strategy != "paper":
            raise BenchError(f"--systems speculative drafts with the paper's schedule; --strategy {args.strategy} "
                             "is for the other systems (run them separately)")
        if not any(s > 1 for s in speedups):
            raise BenchError("--systems speculative needs a --target-speedups value > 1 (the draft's speedup)")
        if not 1 <= args.num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise BenchError(f"--num-draft-tokens must be in [1, {MAX_DRAFT_TOKENS}], got {args.num_draft_tokens}")
        if max_pos is not None and args.prompt_len + args.new_tokens + args.num_draft_tokens > max_pos:
            raise BenchError(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} + --num-draft-tokens "
                             f"{args.num_draft_tokens} exceeds {model}'s maximum of {max_pos} positions")
    repeats = args.repeats if args.repeats is not None else (2 if gpu else 1)
    if repeats < 1:
        raise BenchError(f"--repeats must be >= 1, got {repeats}")
    if args.warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {args.warmup}")
    if not 0 <= args.seed <= SEED_MAX:
        raise BenchError(f"--seed must be in [0, 2**63 - 1], got {args.seed}")
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if gpu else "fp32")])
    if args.threads is not None and args.threads < 1:
        raise BenchError(f"--threads must be >= 1, got {args.threads}")
    _check_outputs(args)
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
    if "speculative" in r["systems"]:
        parts.append(f"--num-draft-tokens {args.num_draft_tokens}")
    if args.strategy != "paper":
        parts.append(f"--strategy {args.strategy}")
    return " ".join(parts)


def _write_plot(path, rows, meta) -> None:
    """The plot at exactly `path`: matplotlib picks the format by the extension and would append .png to a
    name without one, so draw into a temporary sibling with an explicit extension, then rename."""
    ext = os.path.splitext(path)[1].lower() or ".png"
    tmp = f"{path}.tmp-{os.getpid()}{ext}"
    try:
        write_plot(tmp, rows, meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _emit(args, rows, meta) -> None:
    print(format_table(rows, meta))
    if args.json:
        write_json(args.json, rows, meta)
        print(f"wrote {args.json}")
    if args.plot:
        _write_plot(args.plot, rows, meta)
        print(f"wrote {args.plot}")


def _fail(e) -> int:
    print(f"ulskip bench: {describe(e)}", file=sys.stderr)
    return 2


def _merge(args) -> int:
    try:
        _check_outputs(args)
    except BenchError as e:
        return _fail(e)
    from ulskip.bench.report import merge
    try:
        rows, meta = merge(args.merge, note=lambda m: print(f"ulskip bench: note: {m}", file=sys.stderr))
    except ValueError as e:
        return _fail(e)
    _emit(args, rows, meta)
    return 0


def run(args) -> int:
    if args.merge:
        return _merge(args)
    try:
        r = resolve_args(args)
    except BenchError as e:
        return _fail(e)
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
