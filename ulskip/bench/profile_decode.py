"""Where one decode step's time goes (GPU): per-kernel breakdown, the split-KV choice at batch 1, and the
prompt pass eager against its CUDA graph.

    python -m ulskip.bench.profile_decode [--model llama-2-7b] [--batch 1] [--speedup 1]
    python -m ulskip.bench.profile_decode --checkpoint PATH [--dtype fp32]   # a real folder, any dtype

1. One eager decode step of the engine under torch.profiler: GPU time per kernel family, their sum,
   and the step time of the CUDA-graph replay (so launch gaps = replay time - kernel sum).
2. Decode attention alone at the bench's shape (S = 256, 192 visible keys) for several split counts,
   each captured in a CUDA graph and replayed, so launch overhead is not counted.
3. The prompt pass of the same batch (128 tokens each, all layers with prefill="full"): launched from
   Python (eager) against the replay of its CUDA graph (ulskip/runtime/graphs.py), and its kernel time sum.
4. Whole generate() calls of 24 new tokens: their wall time against prompt pass + 23 graph steps, so that
   per-call costs outside the step (captures, allocations, syncs) show. With --checkpoint, sections 1, 3
   and 4 run on that model (the fp32 SmolLM2 fine-tune decoded ~6x slower than bf16 on the H200).
"""
import argparse
import collections

import torch

from ulskip.bench.models import build_hf_model
from ulskip.bench.timing import events_us, graph_us
from ulskip.kernels.decode_attention import decode_attention
from ulskip.runtime.engine import Engine


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--speedup", type=float, default=None,
                    help="target speedup (default: 1 for --model; a --checkpoint's own trained schedule)")
    ap.add_argument("--checkpoint", default=None, help="a local checkpoint folder instead of --model's shape")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = ap.parse_args()
    dev = torch.device("cuda")
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.checkpoint:
        eng = Engine.from_pretrained(args.checkpoint, target_speedup=args.speedup, dtype=dt, device=dev,
                                     max_batch_size=args.batch, max_seq_len=256)
        args.model = args.checkpoint
    else:
        args.speedup = 1 if args.speedup is None else args.speedup
        hf = build_hf_model(args.model, dev, dt)
        eng = Engine.from_hf_model(hf, target_speedup=args.speedup, max_batch_size=args.batch, max_seq_len=256)
        del hf
    torch.cuda.empty_cache()
    B = args.batch
    prompts = [list(range(3, 131))] * B
    eng.generate(prompts, max_new_tokens=4)  # capture the graph, fill the cache up to ~132
    tok = torch.full((B,), 5, device=dev, dtype=torch.long)
    pos = torch.full((B,), 192, device=dev, dtype=torch.long)
    replay_us = events_us(lambda: eng.decode(tok, pos))
    eng.decode(tok, pos, graphs=False)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        eng.decode(tok, pos, graphs=False)
        torch.cuda.synchronize()
    kernels = collections.Counter()
    counts = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name if len(e.name) < 60 else e.name[:57] + "..."
            kernels[name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            counts[name] += 1
    total = sum(kernels.values())
    print(f"{args.model} {args.dtype} bs{B} {len(eng.kept_layers)} kept layers: CUDA-graph step {replay_us:.0f} us, "
          f"kernel time sum {total:.0f} us over {sum(counts.values())} kernels "
          f"(gaps ~{replay_us - total:.0f} us)")
    print("| kernel | calls | us | % |\n|---|---|---|---|")
    for name, us in kernels.most_common(15):
        print(f"| {name} | {counts[name]} | {us:.0f} | {100 * us / total:.1f} |")

    pass_us = prefill_report(eng, prompts, dev)
    generate_report(eng, prompts, pass_us, replay_us)
    if args.checkpoint:
        return

    print("\ndecode attention alone, B=%d Hq=Hkv=32 D=128 S=256, 192 visible keys (graph replay)" % B)
    print("| splits | us |\n|---|---|")
    q = torch.randn(B, 32, 128, device=dev, dtype=dt)
    kc, vc = (torch.randn(B, 32, 256, 128, device=dev, dtype=dt) for _ in range(2))
    lens = torch.full((B,), 192, device=dev, dtype=torch.int32)
    for splits in (1, 2, 4, 8):
        us = graph_us(lambda: decode_attention(q, kc, vc, lens, 128 ** -0.5, num_splits=splits), iters=200)
        print(f"| {splits} | {us:.1f} |")


def prefill_report(eng, prompts, dev):
    """-> microseconds of the prompt pass as generate() runs it (its graph where one fits, else eager)."""
    tokens = torch.tensor(prompts, device=dev)
    lengths = torch.full((len(prompts),), tokens.shape[1], device=dev)
    fits = eng.prefill_graphs is not None and eng.prefill_graphs.fits(*tokens.shape)
    with torch.inference_mode():
        eager_us = events_us(lambda: eng.prefill(tokens, lengths, graphs=False), iters=20)
        graph_us_ = events_us(lambda: eng.prefill(tokens, lengths), iters=20) if fits else float("nan")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            eng.prefill(tokens, lengths, graphs=False)
            torch.cuda.synchronize()
    cuda = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ksum = sum(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total for e in cuda)
    print(f"\nprompt pass, {tokens.shape[0]} x {tokens.shape[1]} tokens through {len(eng.prefill_layers)} layers: "
          f"eager {eager_us / 1e3:.2f} ms, CUDA graph {graph_us_ / 1e3:.2f} ms, "
          f"kernel time sum {ksum / 1e3:.2f} ms over {len(cuda)} kernels")
    return graph_us_ if fits else eager_us


def generate_report(eng, prompts, pass_us, step_us):
    """Whole generate() calls against the sum of their parts (the prompt pass and graph steps timed above):
    what a call costs beyond them."""
    n = 24
    eng.generate(prompts, max_new_tokens=n, eos_token_id=[])
    call_us = events_us(lambda: eng.generate(prompts, max_new_tokens=n, eos_token_id=[]), iters=10)
    parts = pass_us + (n - 1) * step_us
    print(f"\ngenerate({len(prompts)} x {len(prompts[0])} tokens, {n} new): {call_us / 1e3:.2f} ms per call; "
          f"prompt pass {pass_us / 1e3:.2f} ms + {n - 1} steps x {step_us:.0f} us = {parts / 1e3:.2f} ms; "
          f"outside them {(call_us - parts) / 1e3:.2f} ms")


if __name__ == "__main__":
    main()
