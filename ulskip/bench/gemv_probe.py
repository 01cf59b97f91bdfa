"""Probe: can a Triton GEMV beat cuBLAS on the decode projections? (It did; kernels/gemv.py is the result.)

The batch-1 profile of the cuBLAS-projection engine (bench/RESULTS.md) put 3.6 ms of a 4.3 ms Llama-2-7B step in
cuBLAS GEMV-like kernels at ~89% of the copy bandwidth, plus split-K reduce kernels. A Triton GEMV would
also let the RMSNorm and the SwiGLU fuse into the projections (fewer kernels per layer). This script only
measures: y[M, N] = x[M, K] @ W[N, K]^T for the four Llama-2-7B projections at M = 1 and 16, a small
config sweep, each timed as CUDA-graph replays (10 calls per replay) next to torch's F.linear.

    python -m ulskip.bench.gemv_probe            # on a GPU; a table (us, GB/s, % of copy bandwidth)
    python -m ulskip.bench.gemv_probe --fused    # kernels/gemv.py with the engine's epilogues, config sweep
    python -m ulskip.bench.gemv_probe --fused --shapes smollm2   # the same on SmolLM2-135M's projections
"""
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ulskip.bench.timing import graph_us, measure_bandwidth
from ulskip.kernels import activation, gemv as g, norm


@triton.jit
def _gemv_kernel(X, W, Y, M, N, K, stride_xm, stride_wn, stride_ym,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # one program: BLOCK_N output features for all M rows; W streamed once, row-major along K
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(X + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(W + rn[:, None].to(tl.int64) * stride_wn + kk[None, :],
                    mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
        acc += tl.dot(x, tl.trans(w))
    tl.store(Y + rm[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def gemv(x, w, block_n, block_k, warps, stages, out=None):
    M, K = x.shape
    N = w.shape[0]
    y = out if out is not None else torch.empty(M, N, device=x.device, dtype=x.dtype)
    _gemv_kernel[(triton.cdiv(N, block_n),)](x, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0),
                                             BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k,
                                             num_warps=warps, num_stages=stages)
    return y


# the engine's decode projections, (N, K, epilogue): glu's N is the intermediate size (the weight is [2N, K])
FUSED_SHAPES = {
    "llama-2-7b": {"rms+qkv": (12288, 4096, dict(norm=True)), "o+add": (4096, 4096, dict(add=True)),
                   "rms+gate_up+silu": (11008, 4096, dict(norm=True, glu=True)),
                   "down+add": (4096, 11008, dict(add=True)), "rms+lm_head": (32000, 4096, dict(norm=True))},
    # SmolLM2-135M: hidden 576, 9 query / 3 KV heads of 64, intermediate 1536, vocabulary 49152. Its GEMVs run
    # ~4 us each on the H200 against 0.3-0.9 us of bytes (bench/RESULTS.md, sixth session): the default
    # BLOCK_N of 32 gives 18-48 programs on 132 SMs, so the sweep adds BLOCK_N 16 and BLOCK_K 64
    "smollm2": {"rms+qkv": (960, 576, dict(norm=True)), "o+add": (576, 576, dict(add=True)),
                "rms+gate_up+silu": (1536, 576, dict(norm=True, glu=True)),
                "down+add": (576, 1536, dict(add=True)), "rms+lm_head": (49152, 576, dict(norm=True))},
}


def fused_check(dev, dt, shape_set="llama-2-7b"):
    """kernels/gemv.py with each engine epilogue at M = 1 and 16 over a small config sweep, next to the
    plain probe kernel and cuBLAS (F.linear) with the same ops done by PyTorch / the Triton kernels."""
    F_ = F
    print(f"{shape_set} projections")
    print("| proj | M | cuBLAS + ops us | probe (plain) us | fused, default cfg us | best fused us | best cfg |\n"
          "|---|---|---|---|---|---|---|")
    shapes = FUSED_SHAPES[shape_set]
    bks = (64, 128, 256) if shape_set == "smollm2" else (128, 256)
    configs = [(bn, bk, w, st) for bn in (16, 32, 64) for bk in bks for w in (4, 8) for st in (3, 4)]
    for name, (N, K, kw) in shapes.items():
        NW = 2 * N if kw.get("glu") else N
        ws = [torch.randn(NW, K, device=dev, dtype=dt) * 0.02 for _ in range(max(2, 200_000_000 // (NW * K * 2)))]
        i = [0]

        def nxt():
            i[0] = (i[0] + 1) % len(ws)
            return ws[i[0]]
        for M in (1, 16):
            x, z = torch.randn(M, K, device=dev, dtype=dt), torch.randn(M, N, device=dev, dtype=dt)
            st = x.float().pow(2).sum(-1, keepdim=True)
            if kw.get("norm"):
                fused = lambda cfg=None: g.fused_gemv(x, nxt(), norm_parts=st, glu=kw.get("glu", False), config=cfg)
                base = lambda: (activation.silu_mul if kw.get("glu") else (lambda t: t))(
                    F_.linear(norm.rms_norm_ref(x, None, 1e-6), nxt()))
            else:
                fused = lambda cfg=None: g.fused_gemv(x, nxt(), add=z, parts_out=True, config=cfg)
                base = lambda: z + F_.linear(x, nxt())
            t_base = graph_us(base, warmup=2)
            t_probe = graph_us(lambda: gemv(x, nxt(), *g.default_config(N, K, False, False)), warmup=2) \
                if not kw.get("glu") else float("nan")
            t_def = graph_us(lambda: fused(), warmup=2)
            best = (t_def, "default")
            for cfg in configs:
                try:
                    t = graph_us(lambda: fused(cfg), warmup=2)
                except Exception as e:  # a config that does not compile (shared memory) is skipped
                    print(f"  skip {cfg}: {type(e).__name__}", flush=True)
                    continue
                if t < best[0]:
                    best = (t, cfg)
            print(f"| {name} {NW}x{K} | {M} | {t_base:.1f} | {t_probe:.1f} | {t_def:.1f} | {best[0]:.1f} | {best[1]} |",
                  flush=True)
        del ws


def main():
    dev, dt = torch.device("cuda"), torch.bfloat16
    if "--fused" in sys.argv:
        at = sys.argv.index("--shapes") + 1 if "--shapes" in sys.argv else None
        shape_set = "llama-2-7b" if at is None else (sys.argv[at] if at < len(sys.argv) else "")
        if shape_set not in FUSED_SHAPES:
            raise SystemExit(f"gemv_probe: --shapes {shape_set!r} is not one of {', '.join(FUSED_SHAPES)}")
        return fused_check(dev, dt, shape_set)
    bw = measure_bandwidth(dev)["GBps"]
    print(f"copy bandwidth {bw:.0f} GB/s")
    shapes = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
    configs = [(bn, bk, w, st) for bn in (16, 32, 64) for bk in (128, 256) for w in (4, 8) for st in (3, 4)]
    print("| proj | M | cuBLAS us | %copy | best Triton us | %copy | config (BLOCK_N, BLOCK_K, warps, stages) | max err |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (N, K) in shapes.items():
        # several weight copies so repeated calls do not hit L2 (60 MB)
        ws = [torch.randn(N, K, device=dev, dtype=dt) * 0.02 for _ in range(4)]
        for M in (1, 16):
            x = torch.randn(M, K, device=dev, dtype=dt)
            byts = N * K * 2
            i = [0]

            def nxt():
                i[0] = (i[0] + 1) % len(ws)
                return ws[i[0]]
            t_cublas = graph_us(lambda: F.linear(x, nxt()), warmup=2)
            best = None
            for cfg in configs:
                try:
                    err = (gemv(x, ws[0], *cfg).float() - F.linear(x, ws[0]).float()).abs().max().item()
                    t = graph_us(lambda: gemv(x, nxt(), *cfg), warmup=2)
                except Exception as e:  # a config that does not compile (shared memory) is skipped
                    print(f"  skip {cfg}: {type(e).__name__}")
                    continue
                if best is None or t < best[0]:
                    best = (t, cfg, err)
            pct = lambda t: 100 * byts / (t * 1e-6) / 1e9 / bw
            print(f"| {name} | {M} | {t_cublas:.1f} | {pct(t_cublas):.0f}% | {best[0]:.1f} | {pct(best[0]):.0f}% | "
                  f"{best[1]} | {best[2]:.3g} |")
        del ws


if __name__ == "__main__":
    main()
