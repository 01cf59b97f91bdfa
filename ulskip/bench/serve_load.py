"""Load test of `ulskip serve`: concurrent streaming clients at rising concurrency, against the same
engine's static-batch generate() at the same batch size.

    python -m ulskip.bench.serve_load --model llama-2-7b --target-speedup 2 --concurrency 1,8,16 --json out.json

The server runs in this process (uvicorn on a thread, as `ulskip serve` runs it) on 127.0.0.1; the clients
are asyncio tasks with httpx, each keeping one streaming /v1/completions request in flight (random
token-id prompt and output lengths, ignore_eos so every request must return exactly max_tokens tokens).
Per level: generated tokens/s, p50 / p99 time to first token and inter-token latency (gaps between a
request's streamed tokens), and the check that no request was lost, duplicated or cut. Client and
server share one Python process (the GIL): at high concurrency the client's own work is part of the
latency measured.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import threading
import time


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))] if xs else float("nan")


async def _one(client, url, prompt, n, rec):
    body = {"model": "bench", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, usage, reason = [], None, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            rec.append({"status": r.status_code, "error": (await r.aread()).decode()[:200]})
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("choices"):
                times.append(time.perf_counter())
                reason = obj["choices"][0]["finish_reason"] or reason
            if obj.get("usage"):
                usage = obj["usage"]
    rec.append({"status": 200, "want": n, "got": usage["completion_tokens"] if usage else None, "chunks": len(times),
                "reason": reason, "ttft": times[0] - t0 if times else None,
                "gaps": [b - a for a, b in zip(times, times[1:])], "end": times[-1] if times else None, "start": t0})


async def _level(url, concurrency, jobs):
    import httpx
    rec = []
    queue = list(jobs)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def worker():
            while queue:
                prompt, n = queue.pop()
                await _one(client, url, prompt, n, rec)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return rec, wall


def _static(engine, batch, prompt_len, new_tokens, vocab, rng):
    """generate() on one fixed batch: the static-batch number at the same batch size and mean lengths."""
    import torch
    prompts = [[rng.randrange(4, vocab) for _ in range(prompt_len)] for _ in range(batch)]
    engine.generate(prompts, max_new_tokens=4)  # warm-up: graphs captured, kernels compiled
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = engine.generate(prompts, max_new_tokens=new_tokens)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    return sum(len(s) for s in out.sequences) / secs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama", help="bench shape (ulskip bench --model) or checkpoint folder")
    ap.add_argument("--target-speedup", type=float, default=2.0)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--concurrency", default="1,4,16", help="comma list of concurrent clients per level")
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default: 4 x concurrency, >= 8)")
    ap.add_argument("--prompt-len", default="32:256", help="prompt tokens, uniform in LO:HI")
    ap.add_argument("--output-len", default="32:128", help="new tokens per request, uniform in LO:HI")
    ap.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per scheduler step (ulskip serve's)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch
    import uvicorn

    from ulskip import Engine
    from ulskip.bench.models import build_hf_model, resolve_model
    from ulskip.runtime.engine import _parse_device, _parse_dtype
    from ulskip.serve.app import build_app

    levels = [int(c) for c in args.concurrency.split(",")]
    plo, phi = (int(x) for x in args.prompt_len.split(":"))
    olo, ohi = (int(x) for x in args.output_len.split(":"))
    if min(levels) < 1 or not 1 <= plo <= phi or not 1 <= olo <= ohi:
        raise SystemExit("serve_load: concurrency >= 1 and LO <= HI lengths >= 1 are required")
    if args.prefill_chunk < 1:
        raise SystemExit(f"serve_load: --prefill-chunk must be >= 1, got {args.prefill_chunk}")
    device = _parse_device(args.device)
    dtype = _parse_dtype(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg, _, note = resolve_model(args.model)
    hf = build_hf_model(args.model, device, dtype, seed=args.seed)
    max_seq_len = phi + ohi
    eng = Engine.from_hf_model(hf, target_speedup=args.target_speedup, max_batch_size=args.max_batch_size,
                               max_seq_len=max_seq_len)
    del hf
    vocab = eng.cfg.vocab_size
    rng = random.Random(args.seed)
    mean_p, mean_o = (plo + phi) // 2, (olo + ohi) // 2
    static = {b: _static(eng, b, mean_p, mean_o, vocab, rng) for b in sorted({min(c, args.max_batch_size)
                                                                             for c in levels})}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(eng, "bench", max_queue=4096, prefill_chunk=args.prefill_chunk)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    sched = app.state.scheduler
    rows = []
    try:
        # warm-up: every batch bucket's decode graph captured before anything is timed
        asyncio.run(_level(url, args.max_batch_size, [([5] * 8, 4)] * args.max_batch_size))
        for c in levels:
            n = args.requests or max(8, 4 * c)
            jobs = [([rng.randrange(4, vocab) for _ in range(rng.randint(plo, phi))], rng.randint(olo, ohi))
                    for _ in range(n)]
            steps0 = sched.steps
            rec, wall = asyncio.run(_level(url, c, jobs))
            ok = [r for r in rec if r["status"] == 200]
            bad = [r for r in ok if r["got"] != r["want"] or r["chunks"] != r["want"] or r["reason"] != "length"]
            gen = sum(r["got"] or 0 for r in ok)
            gaps = [g for r in ok for g in r["gaps"]]
            row = {"concurrency": c, "requests": n, "answered": len(rec), "http_errors": len(rec) - len(ok),
                   "cut_or_duplicated": len(bad), "generated_tokens": gen, "wall_s": wall, "tokens_per_s": gen / wall,
                   "ttft_p50_ms": 1e3 * _pct([r["ttft"] for r in ok], 0.5),
                   "ttft_p99_ms": 1e3 * _pct([r["ttft"] for r in ok], 0.99),
                   "itl_p50_ms": 1e3 * _pct(gaps, 0.5), "itl_p99_ms": 1e3 * _pct(gaps, 0.99),
                   "decode_steps": sched.steps - steps0,
                   "tokens_per_decode_step": gen / max(1, sched.steps - steps0),
                   "static_batch": min(c, args.max_batch_size),
                   "static_tokens_per_s": static[min(c, args.max_batch_size)]}
            rows.append(row)
    finally:
        server.should_exit = True
        th.join(60)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    head = (f"{args.model} ({note}) | {dev} | {str(dtype)[6:]} | ULS {args.target_speedup:g}x: "
            f"{len(eng.kept_layers)}/{eng.num_layers} layers | prompt {plo}-{phi} + {olo}-{ohi} new | "
            f"{args.max_batch_size} rows | prefill chunk {args.prefill_chunk}")
    print(head)
    print("conc  reqs  lost  cut   tok/s  static tok/s (bs)  TTFT p50/p99 ms  ITL p50/p99 ms  tok/step")
    for r in rows:
        print(f"{r['concurrency']:4d}  {r['requests']:4d}  {r['requests'] - r['answered'] + r['http_errors']:4d}  "
              f"{r['cut_or_duplicated']:3d}  {r['tokens_per_s']:7.1f}  {r['static_tokens_per_s']:9.1f} "
              f"({r['static_batch']:2d})    {r['ttft_p50_ms']:6.1f} / {r['ttft_p99_ms']:6.1f}   "
              f"{r['itl_p50_ms']:5.2f} / {r['itl_p99_ms']:6.2f}   {r['tokens_per_decode_step']:5.2f}")
    if args.json:
        import importlib.metadata as md
        with open(args.json, "w") as f:
            json.dump({"header": head, "rows": rows, "versions": {p: md.version(p) for p in
                                                                 ("torch", "transformers", "fastapi", "uvicorn")},
                       "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d")}, f, indent=1)
    lost = sum(r["requests"] - r["answered"] + r["http_errors"] + r["cut_or_duplicated"] for r in rows)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
