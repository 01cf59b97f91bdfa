"""The sweep behind `ulskip bench` (flags and checks: ulskip/cli/bench.py): generated tokens/s of the
ULS engine against Hugging Face baselines, with the roofline of each row.

Sweeps target speedups x batch sizes. Systems (same weights, same random prompts):
  ulskip           our Engine (ulskip.Engine.from_hf_model), honours --prefill
  hf-eager-full    transformers generate, all layers, eager, dynamic cache (run once per batch size)
  hf-eager-skip    transformers generate on a copy with the skipped layers removed (prompt runs through
                   the kept layers only, i.e. prefill "skip")
  hf-compile-skip  the same copy with a static cache + transformers' automatic torch.compile
                   (mode="reduce-overhead") of the decode step; transformers compiles on GPUs only
  torch-compile    the project's own model in its PyTorch reference ops (no Triton kernels, no hand-made CUDA
                   graphs) with the static compact cache, its decode step under torch.compile(mode=
                   "reduce-overhead") -- gpt-fast's approach, on our model code; the prompt pass eager
  speculative      our Engine with all layers, self-speculative: the ULS schedule of the row's speedup drafts
                   --num-draft-tokens per round, all layers verify (greedy; the output is the full model's)
Every system generates exactly --new-tokens tokens (greedy; HF with min_new_tokens=max_new_tokens).
"""
from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import sys
import time

import torch

from ulskip.bench.models import build_hf_model, byte_counts, decode_step_bytes, roofline, skip_layers_copy
from ulskip.bench.report import derive
from ulskip.bench.timing import measure_bandwidth, timed


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
        from ulskip.runtime.engine import Engine
        self.engine = Engine.from_hf_model(hf, schedule=list(kept), prefill=prefill,
                                           max_batch_size=batch, max_seq_len=max_seq_len)
        self.note = ""

    def bind(self, prompts):
        def generate(n):
            out = self.engine.generate(prompts, max_new_tokens=n, eos_token_id=None)
            return [len(s) for s in out.sequences], self.engine.kv_cache_nbytes
        return generate


class TorchCompileSystem:
    """The compiled-PyTorch peer (issue 12): Engine with reference ops and cuda_graphs=False, its eager decode
    step wrapped in torch.compile; reduce-overhead (CUDA graphs by the compiler) on a GPU, inductor's default
    on a CPU. Every generate runs inside reference_ops(), so the compiled graph and the prompt pass see the
    same plain-torch ops."""

    def __init__(self, hf, kept, prefill, batch, max_seq_len, device):
        from ulskip.kernels.backend import reference_ops
        from ulskip.runtime.engine import Engine
        self.reference_ops = reference_ops
        torch._dynamo.reset()  # a fresh cache per engine: dynamo's recompile limit would fall back to eager
        with reference_ops():
            self.engine = Engine.from_hf_model(hf, schedule=list(kept), prefill=prefill, max_batch_size=batch,
                                               max_seq_len=max_seq_len, cuda_graphs=False)
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        # The cache is an input the step mutates; without a static address the compiler's CUDA graphs refuse
        # it ("skipping cudagraphs due to mutated inputs": 17 ms per 7B step, measured). gpt-fast keeps its
        # cache as module buffers, which the compiler treats as static; this says the same of ours.
        for t in (self.engine.cache.k, self.engine.cache.v):
            torch._dynamo.mark_static_address(t)
        self.engine._decode_eager = torch.compile(self.engine._decode_eager, mode=mode)
        self.note = f"torch.compile(mode={mode!r}) of the decode step, reference ops"

    def generate(self, prompts, n):
        import warnings
        with self.reference_ops(), warnings.catch_warnings():
            # dynamo notes that it traces through functools.lru_cache (the ops' dispatch switch): known, harmless
            warnings.filterwarnings("ignore", message=".*functools.lru_cache")
            return self.engine.generate(prompts, max_new_tokens=n, eos_token_id=None)

    def bind(self, prompts):
        def generate(n):
            out = self.generate(prompts, n)
            return [len(s) for s in out.sequences], self.engine.kv_cache_nbytes
        return generate


class SpeculativeSystem:
    """Our engine with all layers, drafting with the ULS schedule `draft` (greedy self-speculation)."""

    def __init__(self, hf, draft_speedup, k, batch, max_seq_len):
        from ulskip.runtime.engine import Engine
        self.engine = Engine.from_hf_model(hf, target_speedup=1, max_batch_size=batch, max_seq_len=max_seq_len)
        self.spec = {"draft_speedup": draft_speedup, "num_draft_tokens": k}
        self.stats = None
        self.note = ""

    def bind(self, prompts):
        import warnings

        def generate(n):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # random weights are not fine-tuned for skipping: known
                out = self.engine.generate(prompts, max_new_tokens=n, eos_token_id=None, speculative=self.spec)
            self.stats = out.speculative
            return [len(s) for s in out.sequences], self.engine.kv_cache_nbytes
        return generate


# ----------------------------------------------------------------------------------------------------
# One row
# ----------------------------------------------------------------------------------------------------


def _free(device, collect: bool = False):
    """Release cached device memory; `collect` also runs the (slow, ~0.3 s) cyclic garbage collector,
    needed after failures (an exception's traceback holds tensors) and at block ends."""
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
    ttft = statistics.median(timed(lambda: generate(1), device)[0] for _ in range(repeats))
    totals, kv = [], None
    for _ in range(repeats):
        t, (counts, kv) = timed(lambda: generate(new_tokens), device)
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
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def sweep(args, r, progress=True, on_row=None) -> tuple[list[dict], dict]:
    """Run every (system, speedup, batch size) row; `on_row(rows, meta)` after each (partial saves)."""
    from tqdm import tqdm

    device, P, N = r["device"], args.prompt_len, args.new_tokens
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": _device_name(device), "device_type": device.type, "versions": _versions(),
            "command": r["command"], "argv": list(sys.argv), "model": r["model"],
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
            if system == "speculative" and s <= 1:
                continue  # no draft at 1x
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
                   "prefill": args.prefill if system in ("ulskip", "torch-compile") else
                   ("full" if system in ("hf-eager-full", "speculative") else "skip"),
                   "status": "ok", "error": None, "note": ""}
            step = decode_step_bytes(counts, kept, b, P, N)
            row.update({"bytes_per_step": step["bytes"], "weight_bytes_per_step": step["weight_bytes"],
                        "kv_bytes_per_step": step["kv_bytes"]})
            sysobj = None
            twin = eager_full_twin(rows, row) if system == "hf-eager-skip" and len(kept) == L else None
            if twin is not None:
                copy_twin(row, twin)  # all layers kept: the very model hf-eager-full just measured
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
                elif system == "torch-compile":
                    t1 = time.perf_counter()
                    sysobj = TorchCompileSystem(hf, kept, args.prefill, b, P + N, device)
                    row["build_s"] = time.perf_counter() - t1
                    gen = sysobj.bind(all_ids[:b].tolist())
                elif system == "speculative":
                    sysobj = SpeculativeSystem(hf, s, args.num_draft_tokens, b, P + N + args.num_draft_tokens)
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
                if system == "speculative":  # ms per generated token; its bytes depend on the acceptance
                    st = sysobj.stats
                    row.update(speculative=st, roofline_step_ms=None, roofline_tokens_per_s=None,
                               achieved_GBps=None, pct_roofline=None)
                    from ulskip.runtime.speculative import describe
                    row["note"] = describe(st)
                else:
                    row.update(roofline(step["bytes"], bw, b, dec / 1e3 if dec else None))
            except Exception as e:  # noqa: BLE001  (torch.cuda.OutOfMemoryError included)
                row["status"], row["error"] = "failed", _reason(e)
            finally:
                sysobj = gen = None
                _free(device, collect=row["status"] != "ok" or system in ("ulskip", "speculative", "torch-compile"))
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



TWIN_NOTE = "all layers kept: same model and measurement as hf-eager-full"


def copy_twin(row: dict, twin: dict) -> None:
    """hf-eager-skip keeping every layer is hf-eager-full's model: its row repeats that measurement."""
    row.update({k: v for k, v in twin.items() if k not in ("system", "prefill", "note")})
    row["note"] = TWIN_NOTE


def eager_full_twin(rows: list[dict], row: dict) -> dict | None:
    """The measured hf-eager-full row of row's batch size and lengths, if any."""
    return next((x for x in rows if x["system"] == "hf-eager-full" and x["status"] == "ok"
                 and (x["batch_size"], x.get("prompt_len"), x.get("new_tokens")) ==
                 (row["batch_size"], row.get("prompt_len"), row.get("new_tokens"))), None)
