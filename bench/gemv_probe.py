"""Probe for the GPU issue's next step: can a Triton GEMV beat cuBLAS on the decode projections?

The batch-1 profile (bench/results/profile_decode_h200.md) puts 3.6 ms of a 4.3 ms Llama-2-7B step in
cuBLAS GEMV-like kernels at ~89% of the copy bandwidth, plus split-K reduce kernels. A Triton GEMV would
also let the RMSNorm and the SwiGLU fuse into the projections (fewer kernels per layer). This script only
measures: y[M, N] = x[M, K] @ W[N, K]^T for the four Llama-2-7B projections at M = 1 and 16, a small
config sweep, each timed as CUDA-graph replays (10 calls per replay) next to torch's F.linear.

    python bench/gemv_probe.py            # on a GPU; prints a table (us, GB/s, % of copy bandwidth)
    python bench/gemv_probe.py --fused    # kernels/gemv.py at M = 1, prologues fused, config sweep
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from cuda_timing import graph_us


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


def fused_check(dev, dt):
    """M = 1: kernels/gemv.py's row kernel (prologue fused) over a config sweep, against the same op as
    two kernels (the prologue kernel, then the dot GEMV) and against cuBLAS after the prologue kernel."""
    from ulskip import ops
    from ulskip.kernels import activation, norm
    g = ops._kernel("gemv")
    print("| proj | prologue | cuBLAS+kernel us | dot GEMV+kernel us | fused row us (default cfg) | best fused us "
          "| best cfg (BLOCK_N, BLOCK_K, warps, stages) | %copy best |\n|---|---|---|---|---|---|---|---|")
    shapes = {"qkv": (12288, 4096, g.ADD_RMS_NORM), "o": (4096, 4096, g.PLAIN),
              "gate_up": (22016, 4096, g.ADD_RMS_NORM), "down": (4096, 11008, g.SILU_MUL),
              "lm_head": (32000, 4096, g.ADD_RMS_NORM), "bloom_up": (16384, 4096, g.PLAIN),
              "bloom_down": (4096, 16384, g.GELU)}
    configs = [(bn, bk, w, st) for bn in (8, 16, 32) for bk in (128, 256, 512) for w in (4, 8) for st in (1, 3)]
    bw = copy_bw(dev)
    for name, (N, K, pro) in shapes.items():
        ws = [torch.randn(N, K, device=dev, dtype=dt) * 0.02 for _ in range(max(2, 4 * 50_000_000 // (N * K * 2)))]
        i = [0]

        def nxt():
            i[0] = (i[0] + 1) % len(ws)
            return ws[i[0]]
        x, r = torch.randn(1, K, device=dev, dtype=dt), torch.randn(1, K, device=dev, dtype=dt)
        gu = torch.randn(1, 2 * K, device=dev, dtype=dt)
        nw = torch.ones(K, device=dev, dtype=dt)
        if pro == g.ADD_RMS_NORM:
            fused = lambda cfg=None: g.fused_gemv(x, nxt(), None, pro, r, nw, 1e-6, config=cfg)
            pre = lambda: norm.add_rms_norm(x, r, nw, 1e-6)[0]
        elif pro == g.SILU_MUL:
            fused = lambda cfg=None: g.fused_gemv(gu, nxt(), None, pro, config=cfg)
            pre = lambda: activation.silu_mul(gu)
        elif pro == g.GELU:
            fused = lambda cfg=None: g.fused_gemv(x, nxt(), None, pro, config=cfg)
            pre = lambda: activation.gelu_tanh(x)
        else:
            fused = lambda cfg=None: g.fused_gemv(x, nxt(), config=cfg)
            pre = lambda: x
        t_cublas = graph_us(lambda: F.linear(pre(), nxt()), warmup=2)
        t_dot = graph_us(lambda: g.fused_gemv(pre().expand(2, K), nxt()), warmup=2)
        t_def = graph_us(lambda: fused(), warmup=2)
        best = None
        for cfg in configs:
            try:
                t = graph_us(lambda: fused(cfg), warmup=2)
            except Exception as e:  # a config that does not compile (registers, shared memory) is skipped
                print(f"  skip {cfg}: {type(e).__name__}", flush=True)
                continue
            if best is None or t < best[0]:
                best = (t, cfg)
        pct = 100 * N * K * 2 / (best[0] * 1e-6) / 1e9 / bw
        print(f"| {name} {N}x{K} | {pro} | {t_cublas:.1f} | {t_dot:.1f} | {t_def:.1f} | {best[0]:.1f} | {best[1]} | "
              f"{pct:.0f}% |", flush=True)
        del ws


def copy_bw(dev):
    big = torch.randint(0, 255, (2**30,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(big)
    for _ in range(20):  # let the clocks ramp up before anything is timed
        dst.copy_(big)
    return 2 * big.numel() / (graph_us(lambda: dst.copy_(big), reps=2, iters=10, warmup=2) * 1e-6) / 1e9


def main():
    dev, dt = torch.device("cuda"), torch.bfloat16
    import sys
    if "--fused" in sys.argv:
        return fused_check(dev, dt)
    bw = copy_bw(dev)
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
