"""The floors the performance targets are measured against (issue 12): the launch and synchronisation floor
of the machine, the bf16 GEMM rate on the model's own prompt-pass shapes, and the engine's prompt pass as a
share of that rate.

    python -m ulskip.bench.floors --model llama-2-7b --batch 64 --prompt-len 128 --json out.json

- launch: one tiny kernel launched eagerly from Python (what an un-graphed step pays per kernel);
- graph node: the same kernel as one node of a replayed CUDA graph (the floor of a graphed step per kernel);
- sync: a host round trip (a tiny kernel, then a device-to-host read of its result);
- GEMM rate: the prompt pass's four layer GEMMs (qkv, o, gate_up, down at batch x prompt-len rows), each
  replayed in a CUDA graph; the aggregate is their FLOPs over their summed time;
- prompt pass: Engine.prefill of batch x prompt-len tokens through every layer (prefill "full"), its layer
  GEMM FLOPs over its time, and that as % of the aggregate GEMM rate.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch


def _median_s(fn, device, iters):
    from ulskip.bench.timing import timed
    fn()
    return statistics.median(timed(fn, device)[0] for _ in range(iters))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama", help="bench shape (ulskip bench --model)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.batch < 1 or args.prompt_len < 1 or args.iters < 1:
        raise SystemExit("floors: --batch, --prompt-len and --iters must be >= 1")
    from ulskip import Engine
    from ulskip.bench.models import build_hf_model
    from ulskip.bench.timing import events_us, graph_us
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    out = {"model": args.model, "batch": args.batch, "prompt_len": args.prompt_len,
           "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype)[6:],
           "torch": torch.__version__}

    if cuda:  # the launch / sync floors need CUDA events and graphs
        x = torch.zeros(1, device=device)
        out["launch_us"] = events_us(lambda: x.add_(1), iters=1000)
        out["graph_node_us"] = graph_us(lambda: x.add_(1), reps=200, iters=20)
        out["sync_us"] = 1e6 * _median_s(lambda: x.add_(1).item(), device, 200)

    hf = build_hf_model(args.model, device, dtype, seed=0)
    c = hf.config
    H, I, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    hd = H // c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", c.num_attention_heads) * hd
    M = args.batch * args.prompt_len
    shapes = {"qkv": (H, H + 2 * kv), "o": (H, H), "gate_up": (H, 2 * I), "down": (I, H)}
    gemms, total_flop, total_s = {}, 0.0, 0.0

    def gemm_s(k, n):
        a = torch.randn(M, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype)
        if cuda:
            return graph_us(lambda: torch.nn.functional.linear(a, w), reps=5, iters=10) * 1e-6
        return _median_s(lambda: torch.nn.functional.linear(a, w), device, args.iters)

    for name, (k, n) in shapes.items():
        s = gemm_s(k, n)
        flop = 2.0 * M * k * n
        gemms[name] = {"shape": [M, k, n], "ms": 1e3 * s, "TFLOPs": flop / s / 1e12}
        total_flop, total_s = total_flop + flop, total_s + s
    out["gemms"] = gemms
    out["gemm_TFLOPs"] = total_flop / total_s / 1e12

    eng = Engine.from_hf_model(hf, target_speedup=1, max_batch_size=args.batch, max_seq_len=args.prompt_len)
    del hf
    tokens = torch.randint(4, c.vocab_size, (args.batch, args.prompt_len), device=device)
    lengths = torch.full((args.batch,), args.prompt_len, device=device)
    s = _median_s(lambda: eng.prefill(tokens, lengths), device, args.iters)
    layer_flop = total_flop * L
    out["prompt_pass_ms"] = 1e3 * s
    out["prompt_pass_TFLOPs"] = layer_flop / s / 1e12
    out["prompt_pass_pct_of_gemm"] = 100 * out["prompt_pass_TFLOPs"] / out["gemm_TFLOPs"]

    print(f"{args.model} | {out['device']} | {out['dtype']} | {args.batch} x {args.prompt_len} tokens, {L} layers")
    if cuda:
        print(f"launch {out['launch_us']:.2f} us | graph node {out['graph_node_us']:.2f} us | "
              f"sync round trip {out['sync_us']:.1f} us")
    for name, g in gemms.items():
        print(f"GEMM {name:8s} {g['shape']}: {g['ms']:.3f} ms, {g['TFLOPs']:.0f} TFLOP/s")
    print(f"GEMM rate (the four together): {out['gemm_TFLOPs']:.0f} TFLOP/s")
    print(f"prompt pass: {out['prompt_pass_ms']:.1f} ms, {out['prompt_pass_TFLOPs']:.0f} TFLOP/s of layer GEMMs "
          f"= {out['prompt_pass_pct_of_gemm']:.0f}% of the GEMM rate (target 70%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
