"""Decode projections: y[M, N] = epilogue(x[M, K] @ W[N, K]^T) for M <= 16 rows, one kernel each.

Why our own GEMV instead of cuBLAS (torch's F.linear): at batch 1-16 a decode step is ~90% weight
streaming, and on the H200 cuBLAS reaches ~89% of the copy bandwidth on Llama-7B's projections plus
split-K reduce kernels, while this kernel reaches ~95% (bench/gemv_probe.py, RESULTS.md). Owning the
kernel also lets the small ops around a projection ride in its epilogue, so a Llama layer is 6 kernels
(qkv, rotary + cache write, attention, o, gate_up, down) instead of ~11:
  norm_in    RMSNorm of x: y = rstd * (x @ W^T); rstd from per-row partial sums of squares of x that
             the kernel which produced x wrote (`parts_out` below), or from one torch op at the start.
             The norm's weight is folded into W at load time (LlamaLM.fold_norms), so the operand
             stays a plain load and no kernel runs the norm on its own.
  glu        SwiGLU: W is [gate; up] ([2N, K]); y = silu(x @ Wg^T) * (x @ Wu^T), two accumulators.
  gelu       y = gelu_tanh(x @ W^T + b) (Bloom's MLP).
  add        y = add + (x @ W^T + b): the residual add after o and down.
  parts_out  also write sum(y^2) over this program's BLOCK_N columns, [M, programs] fp32: the next
             norm's statistics, without a separate reduction kernel or atomics (deterministic).
Rounding follows the PyTorch references below (*_ref): each projection is rounded to the activation
dtype before the activation or the add, which then round once more.

Roofline: bytes = N * K * elt (W, read once) + M * K * elt (x, from L2 per program); flops 2 M N K, so
at M <= 16 ~16 flops per weight byte: memory-bound. Each program owns BLOCK_N output features for all
M rows and streams its [BLOCK_N, K] slice of W along K (cp.async-pipelined over num_stages); x is padded
to 16 rows so each tile is one tensor-core `tl.dot`. A prologue (norm or activation on x inside the K
loop) was measured 5-11x slower on the H200: the elementwise work lands on the padded 16-row operand in
every warp and makes the kernel compute-bound. Hence epilogues only. fp32 dots are IEEE (no TF32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .activation import gelu_tanh_f32, gelu_tanh_ref, silu_f32, silu_mul_ref
from .backend import tl, triton
from .common import check_out, check_tensor, rows2d
from .norm import rms_norm_ref

# ----------------------------------------------------------------------------- references
def rms_norm_linear_ref(h, eps, weight, bias=None, glu=False):
    """rms_norm(h) @ weight^T + bias, the norm without a weight (folded into `weight` at load time);
    glu: weight is [gate; up] and the result is silu(gate) * up."""
    y = F.linear(rms_norm_ref(h, None, eps), weight, bias)
    return silu_mul_ref(y) if glu else y


def linear_add_ref(x, weight, bias, add):
    """add + x @ weight^T + bias: a projection into the residual stream."""
    return add + F.linear(x, weight, bias)


def linear_gelu_ref(x, weight, bias=None):
    return gelu_tanh_ref(F.linear(x, weight, bias))



MAX_ROWS = 16  # x rows padded to one 16-row MMA tile; more rows -> cuBLAS (compute starts to matter)


@triton.jit
def _gemv_kernel(
    X, W, BIAS, ADD, Y, PARTS_IN, PARTS_OUT,
    M, N, K, P_IN, eps,
    stride_xm, stride_wn, stride_am, stride_ym, stride_pim, stride_pom,
    NORM_IN: tl.constexpr, GLU: tl.constexpr, GELU: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ADD: tl.constexpr, PARTS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < M
    n_ok = rn < N
    dt = Y.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_rows = W + rn[:, None].to(tl.int64) * stride_wn
    up_rows = W + (rn[:, None] + N).to(tl.int64) * stride_wn
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(X + rm[:, None] * stride_xm + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wmask = n_ok[:, None] & k_ok[None, :]
        w = tl.load(w_rows + kk[None, :], mask=wmask, other=0.0)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
        if GLU:
            wu = tl.load(up_rows + kk[None, :], mask=wmask, other=0.0)
            if IEEE:
                acc_up += tl.dot(x, tl.trans(wu), input_precision="ieee")
            else:
                acc_up += tl.dot(x, tl.trans(wu))
    if NORM_IN:  # rms_norm(x) @ W^T = rstd * (x @ W^T), rstd per row from the producer's partial sums
        rp = tl.arange(0, BLOCK_P)
        parts = tl.load(PARTS_IN + rm[:, None] * stride_pim + rp[None, :],
                        mask=row_ok[:, None] & (rp[None, :] < P_IN), other=0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(parts, axis=1) / K + eps)
        acc = acc * rstd[:, None]
        acc_up = acc_up * rstd[:, None]
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GLU:
            acc_up += tl.load(BIAS + N + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GLU:  # gate and up rounded as two projections would be, then silu(gate) * up in fp32
        acc = silu_f32(acc.to(dt).to(tl.float32)) * acc_up.to(dt).to(tl.float32)
    if GELU:
        acc = gelu_tanh_f32(acc.to(dt).to(tl.float32))
    ymask = row_ok[:, None] & n_ok[None, :]
    if HAS_ADD:
        z = tl.load(ADD + rm[:, None] * stride_am + rn[None, :], mask=ymask, other=0.0).to(tl.float32)
        acc = z + acc.to(dt).to(tl.float32)
    y = acc.to(dt)
    tl.store(Y + rm[:, None] * stride_ym + rn[None, :], y, mask=ymask)
    if PARTS:
        yf = tl.where(ymask, y.to(tl.float32), 0.0)
        tl.store(PARTS_OUT + rm * stride_pom + pid, tl.sum(yf * yf, axis=1), mask=row_ok)


def default_config(N: int, K: int, fp32: bool, glu: bool):
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) from the H200 sweep of bench/gemv_probe.py (Llama-7B:
    qkv 32/128/4/4, o and down 32/256/4/4, gate_up 64/128/4/3). glu streams two W tiles per step, so it
    takes gate_up's shape (N = I, two 32-row tiles). fp32 (tests) halves the K tile."""
    if glu:
        bn, bk, warps, stages = 32, 128, 4, 3
    elif N >= 16384:
        bn, bk, warps, stages = 64, 128, 4, 3
    elif K >= 8192 or N <= 4096:
        bn, bk, warps, stages = 32, 256, 4, 4
    else:
        bn, bk, warps, stages = 32, 128, 4, 4
    if fp32:
        bk, stages = bk // 2, 2
    return bn, max(16, min(bk, triton.next_power_of_2(K))), warps, stages


def _rows2d(name: str, t: torch.Tensor, width: int) -> torch.Tensor:
    if t.shape[-1] != width:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected last dim {width}")
    return rows2d(t, width)


def fused_gemv(x, weight, bias=None, *, norm_parts=None, eps=1e-6, glu=False, gelu=False, add=None,
               parts_out=False, out=None, config=None):
    """epilogue(x @ weight^T) for x [..., K] with at most 16 rows (see the module docstring).

    norm_parts: [..., P] fp32 partial sums of x**2 (they add up to sum(x**2) per row): y is computed
    from rms_norm(x) (no weight: fold it into `weight`). glu: weight is [2N, K] (gate rows, then up).
    Returns y [..., N] in x's dtype, and (y, parts [..., programs] fp32) when parts_out.
    config: (BLOCK_N, BLOCK_K, warps, stages) override (sweeps)."""
    check_tensor("weight", weight, ndim=2)
    NW, K = weight.shape
    check_tensor("x", x, device=weight.device)
    if x.dtype != weight.dtype:
        raise ValueError(f"x has dtype {x.dtype}, expected the weight's dtype {weight.dtype}")
    if weight.stride(-1) != 1:
        raise ValueError(f"weight must have a unit stride in its last dim, got strides {weight.stride()}")
    if glu and gelu:
        raise ValueError("glu and gelu are exclusive epilogues; pick one")
    if glu and NW % 2:
        raise ValueError(f"glu needs a [gate; up] weight with an even number of rows, got {NW}")
    N = NW // 2 if glu else NW
    x2 = _rows2d("x", x, K)
    M = x2.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"x has {M} rows; fused_gemv takes at most {MAX_ROWS} (use F.linear beyond)")
    lead = tuple(x.shape[:-1])
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=weight.device)
        if bias.shape[0] != NW:
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({NW},)")
    if norm_parts is not None:
        check_tensor("norm_parts", norm_parts, dtypes=(torch.float32,), device=weight.device)
        if tuple(norm_parts.shape[:-1]) != lead:
            raise ValueError(f"norm_parts has shape {tuple(norm_parts.shape)}, expected {lead} + (P,)")
        if not isinstance(eps, (int, float)) or eps < 0:
            raise ValueError(f"eps must be a non-negative float, got {eps!r}")
        p2 = norm_parts.reshape(-1, norm_parts.shape[-1])
        if p2.stride(-1) != 1:
            p2 = p2.contiguous()
        if norm_parts.shape[-1] == 0:
            raise ValueError("norm_parts has no partial sums (last dim 0)")
    if add is not None:
        check_tensor("add", add, device=weight.device)
        if tuple(add.shape) != lead + (N,) or add.dtype != x.dtype:
            raise ValueError(f"add is {tuple(add.shape)} {add.dtype}, expected {lead + (N,)} {x.dtype}")
        a2 = _rows2d("add", add, N)
    if out is None:
        out = torch.empty(lead + (N,), dtype=x.dtype, device=x.device)
    else:
        check_out("out", out, lead + (N,), x.dtype, x.device)
        if not out.is_contiguous():
            raise ValueError(f"out must be contiguous, got strides {out.stride()}")
    bn, bk, warps, stages = config or default_config(N, K, x.dtype == torch.float32, glu)
    programs = triton.cdiv(N, bn)
    parts = torch.empty(lead + (programs,), dtype=torch.float32, device=x.device) if parts_out else None
    if M and N:
        y2 = out.view(-1, N)
        pin = p2 if norm_parts is not None else y2
        pout = parts.view(-1, programs) if parts_out else y2
        _gemv_kernel[(programs,)](
            x2, weight, bias if bias is not None else weight, a2 if add is not None else y2, y2, pin, pout,
            M, N, K, pin.shape[-1] if norm_parts is not None else 1, float(eps),
            x2.stride(0), weight.stride(0), a2.stride(0) if add is not None else 0, y2.stride(0),
            pin.stride(0), pout.stride(0),
            NORM_IN=norm_parts is not None, GLU=glu, GELU=gelu, HAS_BIAS=bias is not None,
            HAS_ADD=add is not None, PARTS=parts_out, IEEE=x.dtype == torch.float32,
            BLOCK_M=MAX_ROWS, BLOCK_N=bn, BLOCK_K=bk,
            BLOCK_P=max(2, triton.next_power_of_2(pin.shape[-1])) if norm_parts is not None else 2,
            num_warps=warps, num_stages=stages,
        )
    return (out, parts) if parts_out else out
