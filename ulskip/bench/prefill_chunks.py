"""Where a chunked prompt pass spends its time, against the whole pass (continuous batching, issue 14).

    python -m ulskip.bench.prefill_chunks --model llama-2-7b --target-speedup 2 --length 2048 --chunk 512

Times, on one engine: the whole prompt pass into a row (Engine.prefill_rows), the same prompt in chunks
(Engine.prefill_chunk, each chunk timed; CUDA graphs on a GPU), and a profile of one chunked pass's
kernels (top 12 by GPU time).
"""
from __future__ import annotations

import argparse
import json
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--target-speedup", type=float, default=2.0)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.length < 1 or args.chunk < 1:
        raise SystemExit(f"prefill_chunks: --length and --chunk must be >= 1, got {args.length} and {args.chunk}")
    import torch

    from ulskip import Engine
    from ulskip.bench.models import build_hf_model
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    hf = build_hf_model(args.model, device, torch.bfloat16 if cuda else torch.float32, seed=0)
    eng = Engine.from_hf_model(hf, target_speedup=args.target_speedup, max_batch_size=2,
                               max_seq_len=args.length + 16)
    del hf
    prompt = [5 + i % 1000 for i in range(args.length)]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def whole():
        eng.prefill_rows([prompt], [1])

    def chunked(times=None):
        for s in range(0, args.length, args.chunk):
            t0 = time.perf_counter()
            eng.prefill_chunk(prompt, 1, s, min(args.chunk, args.length - s))
            sync()
            if times is not None:
                times.append(1e3 * (time.perf_counter() - t0))

    for fn in (whole, chunked, whole, chunked):  # warm-up: kernels compiled, cuBLAS heuristics cached
        fn()
    sync()
    t0 = time.perf_counter()
    whole()
    sync()
    t_whole = 1e3 * (time.perf_counter() - t0)
    per_chunk = []
    chunked(per_chunk)
    flop = 2 * args.length * sum(p.numel() for n, p in eng.model.named_parameters()
                                 if "layers" in n) * len(eng.prefill_layers) / eng.num_layers
    print(f"{args.model}: {len(eng.prefill_layers)} prompt-pass layers, prompt {args.length}, chunk {args.chunk}")
    print(f"whole pass {t_whole:.1f} ms ({flop / t_whole / 1e9:.0f} TFLOP/s of layer GEMMs)")
    print(f"chunks     {sum(per_chunk):.1f} ms: " + " ".join(f"{t:.1f}" for t in per_chunk))
    rows = []
    if cuda:
        from torch.profiler import ProfilerActivity, profile
        s = (args.length - 1) // args.chunk * args.chunk
        chunked()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for s0 in range(0, args.length, args.chunk):
                eng.prefill_chunk(prompt, 1, s0, min(args.chunk, args.length - s0))
            sync()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
        print(f"kernels of one chunked pass (chunks from 0 to {s}):")
        print(table)
        rows = table.splitlines()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "length": args.length, "chunk": args.chunk, "whole_ms": t_whole,
                       "chunk_ms": per_chunk, "profile": rows}, f, indent=1)


if __name__ == "__main__":
    main()
