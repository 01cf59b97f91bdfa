"""`ulskip bench`: generated tokens/s of the ULS engine against Hugging Face baselines, with roofline.

One command a user can rerun for every speed claim (issue 3, DESIGN.md §4 and §6):

    ulskip bench                                   # llama-2-7b shape on a GPU, tiny-llama on a CPU
    ulskip bench --model bloom-7b1 --json out.json --plot out.png

Sweeps target speedups x batch sizes. Systems (same weights, same random prompts):
  ulskip           our Engine (ulskip.Engine.from_hf_model), honours --prefill
  hf-eager-full    transformers generate, all layers, eager, dynamic cache (run once per batch size)
  hf-eager-skip    transformers generate on a copy with the skipped layers removed (prompt runs through
                   the kept layers only, i.e. prefill "skip")
  hf-compile-skip  the same copy with a static cache + transformers' automatic torch.compile
                   (mode="reduce-overhead") of the decode step; transformers compiles on GPUs only
Every system generates exactly --new-tokens tokens (greedy; HF with min_new_tokens=max_new_tokens).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time

from ulskip.bench_models import (CPU_DEFAULT_MODEL, GPU_DEFAULT_MODEL, SHAPES, num_layers,
                                 resolve_model)
from ulskip.bench_report import SYSTEMS, derive, format_table, write_json, write_plot

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


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device, nbytes: int | None = None, iters: int = 10) -> dict:
    """Copy bandwidth: (read + write bytes) / time of a large same-device copy, median of `iters`."""
    import torch
    gpu = device.type == "cuda"
    nbytes = nbytes or (1 << 30 if gpu else 1 << 28)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    times = []
    for i in range(iters + 2):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    del src, dst
    if gpu:
        torch.cuda.empty_cache()
    t = statistics.median(times)
    return {"GBps": 2 * nbytes / t / 1e9, "bytes": nbytes, "iters": iters,
            "method": ("device-to-device copy (torch copy_), read+write bytes / time, median"
                       if gpu else "CPU memcpy (torch copy_ of host memory), read+write bytes / time, "
                       "median; a CPU roofline is only indicative")}


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    r = fn()
    _sync(device)
    return time.perf_counter() - t0, r


# ----------------------------------------------------------------------------------------------------
# Systems: each builds a `generate(n_new) -> (list of new-token counts, kv cache bytes or None)`
# ----------------------------------------------------------------------------------------------------


def _cache_nbytes(cache) -> int | None:
    if cache is None:
        return None
    cache = getattr(cache, "self_attention_cache", cache)
    total, found = 0, False
    for layer in getattr(cache, "layers", None) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
                found = True
    return total if found else None


class HFSystem:
    """transformers generate (greedy, exactly n new tokens) on `model`."""

    def __init__(self, model, static: bool, device):
        from transformers import GenerationConfig
        self.model, self.device, self.static = model, device, static
        gc_ = GenerationConfig(do_sample=False, num_beams=1, bos_token_id=model.config.bos_token_id,
                               eos_token_id=model.config.eos_token_id,
                               pad_token_id=model.config.pad_token_id or 0)
        if static:
            # transformers' documented path: a static cache makes generate() compile the decode step
            # itself (CompileConfig default mode="reduce-overhead"); it does so on GPUs only.
            gc_.cache_implementation = "static"
            if device.type == "cuda":   # elsewhere a compile_config only warns that it cannot be met
                from transformers import CompileConfig
                gc_.compile_config = CompileConfig(mode="reduce-overhead")
        model.generation_config = gc_
        self.note = ""
        if static and device.type != "cuda":
            self.note = "static cache; transformers compiles on GPUs only, so not compiled here"

    def bind(self, input_ids):
        import torch
        mask = torch.ones_like(input_ids)

        def generate(n):   # generate() runs under no_grad itself; as documented, nothing else wrapped
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n,
                                      min_new_tokens=n, return_dict_in_generate=True)
            new = out.sequences.shape[1] - input_ids.shape[1]
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            return [new] * input_ids.shape[0], _cache_nbytes(cache)
        return generate


class ULSystem:
    """Our engine, built from the same Hugging Face weights for one schedule and batch size."""

    def __init__(self, hf, kept, prefill, batch, max_seq_len):
        import ulskip
        Engine = ulskip.Engine
        if not hasattr(Engine, "from_hf_model"):
            raise RuntimeError("ulskip.Engine.from_hf_model is not available in this build")
        self.engine = Engine.from_hf_model(hf, schedule=list(kept), prefill=prefill,
                                           max_batch_size=batch, max_seq_len=max_seq_len)
        self.note = ""

    def bind(self, prompts):
        def generate(n):
            out = self.engine.generate(prompts, max_new_tokens=n, eos_token_id=None)
            return [len(s) for s in out.sequences], getattr(self.engine, "kv_cache_nbytes", None)
        return generate


# ----------------------------------------------------------------------------------------------------
# One row
# ----------------------------------------------------------------------------------------------------


def _free(device, collect: bool = False):
    """Release cached device memory; `collect` also runs the (slow, ~0.3 s) cyclic garbage collector,
    needed after failures (an exception's traceback holds tensors) and at block ends."""
    import torch
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}".rstrip(": ")


def measure_row(generate, device, batch, new_tokens, warmup, repeats, warmup_tokens) -> dict:
    """Warm up, then time prefill (generate 1 token) and the full generate; medians."""
    for _ in range(warmup):
        generate(warmup_tokens)
    ttft = statistics.median(_timed(lambda: generate(1), device)[0] for _ in range(repeats))
    totals, kv = [], None
    for _ in range(repeats):
        t, (counts, kv) = _timed(lambda: generate(new_tokens), device)
        if len(counts) != batch or any(c != new_tokens for c in counts):
            raise RuntimeError(f"generated {sorted(set(counts))} tokens per sequence for {len(counts)} "
                               f"sequences, expected {new_tokens} for {batch}")
        totals.append(t)
    total = statistics.median(totals)
    decode = (total - ttft) / (new_tokens - 1) if new_tokens > 1 else None
    if decode is not None and decode <= 0:
        decode = None                    # timing noise at tiny sizes; no meaningful decode time
    return {"total_s": total, "tokens_per_s": batch * new_tokens / total, "prefill_ms": ttft * 1e3,
            "decode_ms_per_step": decode * 1e3 if decode else None, "kv_cache_bytes": kv,
            "all_total_s": totals}


# ----------------------------------------------------------------------------------------------------
# Sweep
# ----------------------------------------------------------------------------------------------------


def _versions() -> dict:
    import torch
    import transformers
    import ulskip
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": tv,
            "transformers": transformers.__version__, "ulskip": ulskip.__version__,
            "python": platform.python_version()}


def _device_name(device) -> str:
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


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


def sweep(args, r, progress=True, on_row=None) -> tuple[list[dict], dict]:
    """Run every (system, speedup, batch size) row; `on_row(rows, meta)` after each (partial saves)."""
    import torch
    from tqdm import tqdm
    from ulskip.bench_models import build_hf_model, byte_counts, decode_step_bytes, roofline, \
        skip_layers_copy

    device, P, N = r["device"], args.prompt_len, args.new_tokens
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": _device_name(device), "device_type": device.type, "versions": _versions(),
            "command": _command(args, r), "argv": list(sys.argv), "model": r["model"],
            "model_description": r["description"], "num_layers": r["num_layers"],
            "dtype": str(r["dtype"]).replace("torch.", ""), "prompt_len": P, "new_tokens": N,
            "prefill": args.prefill, "strategy": args.strategy, "repeats": r["repeats"],
            "warmup": args.warmup, "seed": args.seed}
    meta["bandwidth"] = measure_bandwidth(device)
    bw = meta["bandwidth"]["GBps"] * 1e9

    t0 = time.perf_counter()
    try:
        hf = build_hf_model(r["model"], device, r["dtype"], seed=args.seed)
    except Exception as e:  # noqa: BLE001  (e.g. out of memory for the weights themselves)
        raise SystemExit(f"ulskip bench: error: could not build {r['model']} on {device}: {_reason(e)}")
    meta["model_build_s"] = time.perf_counter() - t0
    meta["attn_implementation"] = getattr(hf.config, "_attn_implementation", None)
    meta["num_parameters"] = sum(p.numel() for p in hf.parameters())
    counts = byte_counts(hf, r["dtype"])
    L = r["num_layers"]
    vocab = hf.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(args.seed)
    max_b = max(r["batches"])
    all_ids = torch.randint(min(10, vocab - 1), vocab, (max_b, P), generator=g)

    plan = []   # (system, speedup, kept)
    if "hf-eager-full" in r["systems"]:
        plan.append(("hf-eager-full", 1.0, list(range(L))))
    for s in r["speedups"]:
        for system in r["systems"]:
            if system != "hf-eager-full":
                plan.append((system, s, r["kept"][s]))
    rows = []
    bar = tqdm(total=len(plan) * len(r["batches"]), desc="ulskip bench", unit="row",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for system, s, kept in plan:
        shared = None            # one HF copy per (system, speedup); engines are per batch size
        shared_err = None
        if system in ("hf-eager-skip", "hf-compile-skip", "hf-eager-full"):
            try:
                m = hf if system == "hf-eager-full" else skip_layers_copy(hf, kept)
                shared = HFSystem(m, static=system == "hf-compile-skip", device=device)
            except Exception as e:  # noqa: BLE001
                shared_err = _reason(e)
        if system == "hf-compile-skip":
            torch._dynamo.reset()
        for b in r["batches"]:
            bar.set_postfix_str(f"{system} s={s:g} bs={b}")
            row = {"system": system, "target_speedup": s, "kept_layers": list(kept), "num_kept": len(kept),
                   "num_layers": L, "batch_size": b, "prompt_len": P, "new_tokens": N,
                   "prefill": args.prefill if system == "ulskip" else
                   ("full" if system == "hf-eager-full" else "skip"),
                   "status": "ok", "error": None, "note": ""}
            step = decode_step_bytes(counts, kept, b, P, N)
            row.update({"bytes_per_step": step["bytes"], "weight_bytes_per_step": step["weight_bytes"],
                        "kv_bytes_per_step": step["kv_bytes"]})
            sysobj = None
            twin = _eager_full_twin(rows, row) if system == "hf-eager-skip" and len(kept) == L else None
            if twin is not None:
                _copy_twin(row, twin)  # all layers kept: the very model hf-eager-full just measured
                rows.append(row)
                bar.update(1)
                if on_row:
                    on_row(rows, meta)
                continue
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                if shared_err:
                    raise RuntimeError(shared_err)
                ids = all_ids[:b].to(device)
                if system == "ulskip":
                    t1 = time.perf_counter()
                    sysobj = ULSystem(hf, kept, args.prefill, b, P + N)
                    row["build_s"] = time.perf_counter() - t1
                    gen = sysobj.bind(all_ids[:b].tolist())
                else:
                    sysobj = shared
                    gen = shared.bind(ids)
                row["note"] = sysobj.note
                # a static cache must keep its length across calls (a new length recompiles)
                wt = N if system == "hf-compile-skip" else min(N, 8)
                row.update(measure_row(gen, device, b, N, args.warmup, r["repeats"], wt))
                if device.type == "cuda":
                    row["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
                    row["peak_mem_over_base_bytes"] = row["peak_mem_bytes"] - base
                dec = row["decode_ms_per_step"]
                row.update(roofline(step["bytes"], bw, b, dec / 1e3 if dec else None))
            except Exception as e:  # noqa: BLE001  (torch.cuda.OutOfMemoryError included)
                row["status"], row["error"] = "failed", _reason(e)
            finally:
                sysobj = gen = None
                _free(device, collect=row["status"] != "ok" or system == "ulskip")
            rows.append(row)
            bar.update(1)
            if on_row:
                on_row(rows, meta)
        shared = None
        if system == "hf-compile-skip":
            torch._dynamo.reset()
        _free(device, collect=True)
    bar.close()
    del hf
    _free(device, collect=True)
    derive(rows)
    return rows, meta


# ----------------------------------------------------------------------------------------------------
# Output (formatting lives in ulskip/bench_report.py)
# ----------------------------------------------------------------------------------------------------


def _emit(args, rows, meta) -> None:
    print(format_table(rows, meta))
    if args.json:
        write_json(args.json, rows, meta)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(args.plot, rows, meta)
        print(f"wrote {args.plot}")


TWIN_NOTE = "all layers kept: same model and measurement as hf-eager-full"


def _copy_twin(row: dict, twin: dict) -> None:
    """hf-eager-skip keeping every layer is hf-eager-full's model: its row repeats that measurement."""
    row.update({k: v for k, v in twin.items() if k not in ("system", "prefill", "note")})
    row["note"] = TWIN_NOTE


def _eager_full_twin(rows: list[dict], row: dict) -> dict | None:
    """The measured hf-eager-full row of row's batch size and lengths, if any."""
    return next((x for x in rows if x["system"] == "hf-eager-full" and x["status"] == "ok"
                 and (x["batch_size"], x.get("prompt_len"), x.get("new_tokens")) ==
                 (row["batch_size"], row.get("prompt_len"), row.get("new_tokens"))), None)


def _row_key(r: dict) -> tuple:
    return (r["system"], r["target_speedup"], r["batch_size"], r.get("prompt_len"), r.get("new_tokens"),
            r.get("prefill"))


def merge(args) -> int:
    """Combine earlier --json files (e.g. one run per system on a time-limited machine) into one report.
    A row of a later file replaces an earlier file's row of the same system, target speedup, batch size,
    lengths and prefill mode (a re-measurement), unless the later one failed and the earlier did not."""
    rows, metas = {}, []
    for opt in ("json", "plot"):
        path = getattr(args, opt)
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            print(f"ulskip bench: error: --{opt} {path!r}: folder does not exist", file=sys.stderr)
            return 2
    for path in args.merge:
        try:
            with open(path) as f:
                d = json.load(f)
            for r in d["rows"]:
                k, earlier = _row_key(r), rows.get(_row_key(r))
                if earlier is not None and earlier["status"] == "ok" and r["status"] != "ok":
                    print(f"ulskip bench: note: {path}: {r['system']} s={r['target_speedup']:g} "
                          f"bs={r['batch_size']} is {r['status']}; the earlier measurement stays", file=sys.stderr)
                    continue
                rows[k] = r
            metas.append(d["meta"])
        except (OSError, ValueError, KeyError) as e:
            print(f"ulskip bench: error: --merge {path!r}: {_reason(e)}", file=sys.stderr)
            return 2
    meta = dict(metas[0])
    meta["merged_from"] = [{"path": p, "command": m.get("command"), "date": m.get("date")}
                           for p, m in zip(args.merge, metas)]
    rows = list(rows.values())
    for r in rows:  # a re-measured hf-eager-full carries its hf-eager-skip 1x twin along
        twin = _eager_full_twin(rows, r) if r.get("note") == TWIN_NOTE else None
        if twin is not None:
            _copy_twin(r, twin)
    derive(rows)
    _emit(args, rows, meta)
    return 0


def run(args) -> int:
    if args.merge:
        return merge(args)
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
    try:
        rows, meta = sweep(args, r, progress=not args.no_progress, on_row=save_partial)
        meta["complete"] = True
    finally:
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
    meta["cpu_threads"] = threads
    _emit(args, rows, meta)
    return 0 if any(row["status"] == "ok" for row in rows) else 1
