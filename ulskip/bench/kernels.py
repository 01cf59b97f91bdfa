"""Time the Triton kernels at Llama-7B decode shapes and report achieved bandwidth.

    python -m ulskip.bench.kernels [--dtype bf16] [--sweep] [--out bench/kernel_bench.md]

Each kernel is timed with triton.testing.do_bench (median, L2 flushed between runs) next to the op's
PyTorch reference (its *_ref in ulskip.kernels) on the same tensors (for the fused GEMVs: the Triton norm / activation kernel
followed by cuBLAS's F.linear, i.e. what the engine ran before them). GB/s = bytes the kernel must move (each input read once,
each output written once) / time; "% copy" compares with a large device-to-device copy measured here
(read + write bytes over its time), the bandwidth the decode roofline uses (docs/design.md). Decode is
memory-bound, so % copy is the figure of merit; at batch 1 the small kernels are launch-bound (a few us)
and their % is low by nature. --sweep also tries decode-attention block configs and prints the best.
`--device cpu --tiny` (with TRITON_INTERPRET=1) only smoke-tests this script: wall-clock timings of the
interpreter, meaningless as speed.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

from ulskip.bench.timing import measure_bandwidth
from ulskip.kernels import activation, cache_write, decode_attention, gemv, norm, rotary
from ulskip.runtime.sampling import sample

# Llama-2-7B
HIDDEN, INTER, HQ, HKV_MHA, HKV_GQA, D, VOCAB = 4096, 11008, 32, 32, 8, 128, 32000
BLOOM_4H = 16384


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--seq-lens", default="256,1024,4096")
    ap.add_argument("--sweep", action="store_true", help="try decode-attention block configs")
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu only smoke-tests the script")
    ap.add_argument("--tiny", action="store_true", help="tiny model dims (smoke test)")
    args = ap.parse_args(argv)
    global HIDDEN, INTER, HQ, HKV_MHA, HKV_GQA, D, VOCAB, BLOOM_4H
    if args.tiny:
        HIDDEN, INTER, HQ, HKV_MHA, HKV_GQA, D, VOCAB, BLOOM_4H = 256, 512, 4, 4, 2, 64, 1000, 1024
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("kernel_bench needs a CUDA device")
    import triton
    if dev.type == "cuda":
        from triton.testing import do_bench
    else:
        def do_bench(fn, return_mode="median"):  # wall clock, ms (smoke test only)
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(ts)

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    el = torch.finfo(dt).bits // 8
    batches = [int(b) for b in args.batches.split(",")]
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    bw = measure_bandwidth(dev, (1 << 30) if dev.type == "cuda" else (1 << 24))["GBps"]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke test)"
    lines = [f"# kernel_bench: {name}, torch {torch.__version__}, triton {triton.__version__}, {args.dtype}",
             f"device-to-device copy: {bw:.0f} GB/s (read+write)", "",
             "| kernel | shape | MB moved | triton us | GB/s | % copy | torch ref us | speedup |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)

    def row(kname, shape, nbytes, fn, ref_fn):
        t = do_bench(fn, return_mode="median")
        tr = do_bench(ref_fn, return_mode="median") if ref_fn is not None else float("nan")
        gbs = nbytes / (t * 1e-3) / 1e9
        line = (f"| {kname} | {shape} | {nbytes / 1e6:.2f} | {t * 1e3:.1f} | {gbs:.0f} | {100 * gbs / bw:.0f}% | "
                f"{tr * 1e3:.1f} | {tr / t:.2f}x |")
        print(line, flush=True)
        lines.append(line)

    def rnd(*shape, dtype=dt):
        return torch.randn(*shape, device=dev, dtype=torch.float32).to(dtype)

    for B in batches:
        x, r, w, b = rnd(B, HIDDEN), rnd(B, HIDDEN), rnd(HIDDEN), rnd(HIDDEN)
        row("rms_norm", f"[{B},{HIDDEN}]", 2 * B * HIDDEN * el, lambda: norm.rms_norm(x, w, 1e-6),
            lambda: norm.rms_norm_ref(x, w, 1e-6))
        row("add_rms_norm", f"[{B},{HIDDEN}]", 4 * B * HIDDEN * el, lambda: norm.add_rms_norm(x, r, w, 1e-6),
            lambda: norm.rms_norm_ref(x + r, w, 1e-6))
        row("add_layer_norm", f"[{B},{HIDDEN}]", 4 * B * HIDDEN * el,
            lambda: norm.add_layer_norm(x, r, w, b, 1e-5), lambda: norm.layer_norm_ref(x + r, w, b, 1e-5))
        gu = rnd(B, 2 * INTER)
        row("silu_mul", f"[{B},{2 * INTER}]", 3 * B * INTER * el, lambda: activation.silu_mul(gu),
            lambda: activation.silu_mul_ref(gu))
        g4 = rnd(B, BLOOM_4H)
        row("gelu_tanh", f"[{B},{BLOOM_4H}]", 2 * B * BLOOM_4H * el, lambda: activation.gelu_tanh(g4),
            lambda: activation.gelu_tanh_ref(g4))
        if B <= gemv.MAX_ROWS:  # projections with their epilogues fused (decode sizes) vs cuBLAS + kernels
            F = torch.nn.functional
            for pname, N, K, kw in (("rms+qkv", (HQ + 2 * HKV_MHA) * D, HIDDEN, dict(norm=True)),
                                    ("o+add", HIDDEN, HQ * D, dict(add=True)),
                                    ("rms+gate_up+silu", INTER, HIDDEN, dict(norm=True, glu=True)),
                                    ("down+add", HIDDEN, INTER, dict(add=True)),
                                    ("rms+lm_head", VOCAB, HIDDEN, dict(norm=True))):
                W = rnd(2 * N if kw.get("glu") else N, K) * K ** -0.5
                xk, zk = rnd(B, K), rnd(B, N)
                st = xk.float().pow(2).sum(-1, keepdim=True)
                ones = torch.ones(K, device=dev, dtype=dt)
                if kw.get("norm"):
                    fn = lambda W=W, xk=xk, st=st, glu=kw.get("glu", False): gemv.fused_gemv(
                        xk, W, norm_parts=st, eps=1e-6, glu=glu)
                    ref = lambda W=W, xk=xk, glu=kw.get("glu", False), ones=ones: (
                        activation.silu_mul if glu else (lambda t: t))(F.linear(norm.rms_norm(xk, ones, 1e-6), W))
                    nbytes = (W.numel() + B * K + B * N) * el
                else:
                    fn = lambda W=W, xk=xk, zk=zk: gemv.fused_gemv(xk, W, add=zk, parts_out=True)
                    ref = lambda W=W, xk=xk, zk=zk: zk + F.linear(xk, W)
                    nbytes = (W.numel() + B * K + 2 * B * N) * el
                row(f"gemv {pname}", f"[{B},{K}]x[{W.shape[0]},{K}]", nbytes, fn, ref)
                del W
        S = 4096
        for Hkv in (HKV_MHA, HKV_GQA):
            qkv = rnd(B, 1, (HQ + 2 * Hkv) * D)
            q = qkv[..., : HQ * D].view(B, 1, HQ, D)
            k = qkv[..., HQ * D:(HQ + Hkv) * D].view(B, 1, Hkv, D)
            v = qkv[..., (HQ + Hkv) * D:].view(B, 1, Hkv, D)
            cos, sin = rnd(B, 1, D), rnd(B, 1, D)
            kc, vc = rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
            pos = torch.randint(0, S, (B, 1), device=dev)
            nbytes = (2 * HQ + 4 * Hkv) * D * B * el + 2 * B * D * el
            row("rotary_cache_write", f"B={B} Hq={HQ} Hkv={Hkv}", nbytes,
                lambda: rotary.rotary_cache_write(q, k, v, cos, sin, kc, vc, pos),
                lambda: cache_write.cache_write_ref(kc, vc, rotary.rotary_ref(k, cos, sin), v, pos) or
                rotary.rotary_ref(q, cos, sin))
        logits = torch.randn(B, VOCAB, device=dev)
        gen = torch.Generator(device=dev).manual_seed(0)
        row("sample top_k=50 top_p=0.9", f"[{B},{VOCAB}] fp32", B * VOCAB * 4,
            lambda: sample(logits, 0.8, 50, 0.9, gen), None)
        row("sample greedy", f"[{B},{VOCAB}] fp32", B * VOCAB * 4, lambda: sample(logits, 0.0, 0, 1.0),
            None)

    lines += ["", "| decode_attention | B | Hkv | S=len | splits | MB moved | triton us | GB/s | % copy | "
              "torch ref us | speedup |" + (" best config (sweep) |" if args.sweep else ""),
              "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.sweep else "")]
    print("\n".join(lines[-2:]), flush=True)
    scale = 1 / math.sqrt(D)
    for Hkv in (HKV_MHA, HKV_GQA):
        for B in batches:
            for S in seq_lens:
                q, kc, vc = rnd(B, HQ, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
                lens = torch.full((B,), S, dtype=torch.int32, device=dev)
                nbytes = 2 * B * Hkv * S * D * el + 2 * B * HQ * D * el
                splits = decode_attention.choose_num_splits(B, Hkv, S, dev)
                t = do_bench(lambda: decode_attention.decode_attention(q, kc, vc, lens, scale),
                             return_mode="median")
                try:
                    tr = do_bench(lambda: decode_attention.decode_attention_ref(q, kc, vc, lens, scale), return_mode="median")
                except torch.cuda.OutOfMemoryError:
                    tr = float("nan")
                gbs = nbytes / (t * 1e-3) / 1e9
                line = (f"| | {B} | {Hkv} | {S} | {splits} | {nbytes / 1e6:.1f} | {t * 1e3:.1f} | {gbs:.0f} | "
                        f"{100 * gbs / bw:.0f}% | {tr * 1e3:.1f} | {tr / t:.1f}x |")
                if args.sweep:
                    best = None
                    for bn in (32, 64, 128):
                        for nw in (4, 8):
                            for ns in (2, 3, 4):
                                for sp in sorted({max(1, splits // 2), splits, splits * 2}):
                                    try:
                                        tt = do_bench(lambda: decode_attention.decode_attention(
                                            q, kc, vc, lens, scale, num_splits=sp, block_n=bn, num_warps=nw,
                                            num_stages=ns), return_mode="median")
                                    except Exception as e:  # out of shared memory etc.
                                        print(f"  skip block_n={bn} warps={nw} stages={ns}: {type(e).__name__}")
                                        continue
                                    if best is None or tt < best[0]:
                                        best = (tt, bn, nw, ns, sp)
                    tt, bn, nw, ns, sp = best
                    line += (f" best: block_n={bn} warps={nw} stages={ns} splits={sp} {tt * 1e3:.1f} us "
                             f"{100 * nbytes / (tt * 1e-3) / 1e9 / bw:.0f}% |")
                print(line, flush=True)
                lines.append(line)
                del q, kc, vc
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
