"""Decode projections: y[M, N] = prologue(x)[M, K] @ W[N, K]^T (+ bias) (+ add) for M <= 16 rows.

Why our own GEMV instead of cuBLAS (torch's F.linear): at batch 1-16 a decode step is ~90% weight
streaming, and on the H200 cuBLAS reaches ~89% of the copy bandwidth on Llama-7B's projections plus
split-K reduce kernels, while a Triton GEMV reaches ~95% (bench/gemv_probe.py, RESULTS.md). Owning the
kernel also lets the op before a projection run inside it at batch 1, so a layer is 6 kernels, not ~11:
  PROLOGUE 0  plain                  y = x @ W^T
  PROLOGUE 1  add + RMSNorm          h = x (+ residual); y = rms_norm(h, g) @ W^T; h is returned too
  PROLOGUE 2  SwiGLU                 x = [gate | up] ([M, 2K]); y = (silu(gate) * up) @ W^T
  PROLOGUE 3  GeLU (tanh, Bloom)     y = gelu(x) @ W^T
and optionally `add` + y after the bias (Bloom's residual add after its MLP).

Roofline: bytes = N * K * elt (W, read once) + M * K * elt (x, from L2 per program); flops 2 M N K, so
at M <= 16 ~16 flops per weight byte: memory-bound. Each program owns BLOCK_N output features and streams
its [BLOCK_N, K] slice of W along K (loads pipelined over num_stages). Two kernels:
  * M == 1, `_gemv_row_kernel`: fp32 FMAs on a [BLOCK_N, BLOCK_K] tile, reduced over K once at the end.
    The prologue runs on the [BLOCK_K] slice of x, which costs little next to the weight tile.
  * 2 <= M <= 16, `_gemv_dot_kernel`: x padded to 16 rows, one tensor-core `tl.dot` per tile. A prologue
    inside it was measured 5-11x slower on the H200 (the elementwise work is done on the padded 16-row
    operand by every warp, which makes the kernel compute-bound), so at M > 1 the prologue runs first as
    its own kernel (kernels/norm.py, kernels/activation.py).

RMSNorm in one pass (M == 1): rms_norm(h) @ W^T = rstd * ((h * g) @ W^T), so the sum of squares is
accumulated in the same K loop and rstd scales the result. The reference rounds h * rstd to the activation
dtype before the weight; here h * g is rounded instead: the same one rounding of a 16-bit operand, so the
error is that of the reference (tests: ulskip.ops.*_linear_ref). fp32 dots are IEEE (no TF32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import activation, norm
from ._common import check_out, check_tensor
from .activation import gelu_tanh_f32, silu_f32

MAX_ROWS = 16  # x rows padded to one 16-row MMA tile; more rows -> cuBLAS (compute starts to matter)

PLAIN, ADD_RMS_NORM, SILU_MUL, GELU = 0, 1, 2, 3


@triton.jit
def _epilogue(acc, BIAS, ADD, Y, rows, rn, row_ok, n_ok, stride_am, stride_ym, HAS_BIAS: tl.constexpr,
              HAS_ADD: tl.constexpr):
    """acc [R, BLOCK_N] fp32 -> Y (+ bias, then add + the projection rounded, as torch's add + F.linear)."""
    mask = row_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_ADD:
        z = tl.load(ADD + rows[:, None] * stride_am + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        acc = z + acc.to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + rows[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_row_kernel(
    X, R, G, W, BIAS, ADD, Y, HOUT,
    N, K, eps, stride_wn,
    PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    dt = X.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    sumsq = tl.zeros((BLOCK_K,), dtype=tl.float32)
    w_rows = W + rn[:, None].to(tl.int64) * stride_wn
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(X + kk, mask=k_ok, other=0.0)
        if PROLOGUE == 1:
            if HAS_RES:  # h = x + residual, one rounding as torch's add; program 0 keeps it
                x = (x.to(tl.float32) + tl.load(R + kk, mask=k_ok, other=0.0).to(tl.float32)).to(dt)
                if pid == 0:
                    tl.store(HOUT + kk, x, mask=k_ok)
            xf = x.to(tl.float32)
            sumsq += xf * xf
            a = (xf * tl.load(G + kk, mask=k_ok, other=0.0).to(tl.float32)).to(dt)
        elif PROLOGUE == 2:  # as kernels/activation.py's silu_mul: fp32 math, one rounding
            up = tl.load(X + K + kk, mask=k_ok, other=0.0)
            a = (silu_f32(x.to(tl.float32)) * up.to(tl.float32)).to(dt)
        elif PROLOGUE == 3:
            a = gelu_tanh_f32(x.to(tl.float32)).to(dt)
        else:
            a = x
        w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * a.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if PROLOGUE == 1:
        y = y / tl.sqrt(tl.sum(sumsq, axis=0) / K + eps)
    row = tl.zeros((1,), dtype=tl.int32)
    _epilogue(y[None, :], BIAS, ADD, Y, row, rn, row == 0, n_ok, 0, 0, HAS_BIAS, HAS_ADD)


@triton.jit
def _gemv_dot_kernel(
    X, W, BIAS, ADD, Y,
    M, N, K,
    stride_xm, stride_wn, stride_am, stride_ym,
    HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_rows = W + rn[:, None].to(tl.int64) * stride_wn
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(X + rm[:, None] * stride_xm + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    _epilogue(acc, BIAS, ADD, Y, rm, rn, row_ok, n_ok, stride_am, stride_ym, HAS_BIAS, HAS_ADD)


# (BLOCK_N, BLOCK_K, num_warps, num_stages) by (N, K), from H200 sweeps of bench/gemv_probe.py.
def _dot_config(N: int, K: int, fp32: bool):
    """Llama-7B sweep: qkv 32/128/4/4, o and down 32/256/4/4, gate_up 64/128/4/3; fp32 (tests) halves K."""
    if N >= 16384:
        bn, bk, warps, stages = 64, 128, 4, 3
    elif K >= 8192 or N <= 4096:
        bn, bk, warps, stages = 32, 256, 4, 4
    else:
        bn, bk, warps, stages = 32, 128, 4, 4
    if fp32:
        bk, stages = bk // 2, 2
    return bn, max(16, min(bk, triton.next_power_of_2(K))), warps, stages


def _row_config(N: int, K: int):
    bn, bk, warps, stages = 16, 256, 4, 3
    return bn, max(16, min(bk, triton.next_power_of_2(K))), warps, stages


def _rows2d(name: str, t: torch.Tensor, width: int) -> torch.Tensor:
    if t.shape[-1] != width:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected last dim {width}")
    t2 = t.reshape(-1, width)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def fused_gemv(x, weight, bias=None, prologue=PLAIN, residual=None, norm_weight=None, eps=1e-6,
               add=None, out=None, residual_out=None, config=None):
    """add + prologue(x) @ weight^T (+ bias) for x [..., K] (SwiGLU: [..., 2K]) with at most 16 rows;
    `add` (optional) is [..., N] in x's dtype. config: (BLOCK_N, BLOCK_K, warps, stages) override (sweeps).

    Returns y [..., N] in x's dtype, and for ADD_RMS_NORM also h = x + residual (x when residual is
    None), the residual stream the caller carries on: (y, h)."""
    check_tensor("weight", weight, ndim=2)
    N, K = weight.shape
    check_tensor("x", x, device=weight.device)
    if x.dtype != weight.dtype:
        raise ValueError(f"x has dtype {x.dtype}, expected the weight's dtype {weight.dtype}")
    if prologue not in (PLAIN, ADD_RMS_NORM, SILU_MUL, GELU):
        raise ValueError(f"prologue {prologue!r} is not one of PLAIN, ADD_RMS_NORM, SILU_MUL, GELU (0-3)")
    if weight.stride(-1) != 1:
        raise ValueError(f"weight must have a unit stride in its last dim, got strides {weight.stride()}")
    x2 = _rows2d("x", x, 2 * K if prologue == SILU_MUL else K)
    M = x2.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"x has {M} rows; fused_gemv takes at most {MAX_ROWS} (use F.linear beyond)")
    lead = tuple(x.shape[:-1])
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=weight.device)
        if bias.shape[0] != N:
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({N},)")
    r2 = x2
    h = None
    if prologue == ADD_RMS_NORM:
        if not isinstance(eps, (int, float)) or eps < 0:
            raise ValueError(f"eps must be a non-negative float, got {eps!r}")
        check_tensor("norm_weight", norm_weight, ndim=1, device=weight.device)
        if tuple(norm_weight.shape) != (K,) or norm_weight.dtype != x.dtype:
            raise ValueError(f"norm_weight is {tuple(norm_weight.shape)} {norm_weight.dtype}, expected ({K},) "
                             f"{x.dtype}")
        if residual is not None:
            check_tensor("residual", residual, device=weight.device)
            if tuple(residual.shape) != tuple(x.shape) or residual.dtype != x.dtype:
                raise ValueError(f"residual is {tuple(residual.shape)} {residual.dtype}, expected x's "
                                 f"{tuple(x.shape)} {x.dtype}")
            r2 = _rows2d("residual", residual, K)
            if residual_out is None:
                residual_out = torch.empty(lead + (K,), dtype=x.dtype, device=x.device)
            else:  # other programs still read x and residual while h is written
                check_out("residual_out", residual_out, lead + (K,), x.dtype, x.device)
                if not residual_out.is_contiguous():
                    raise ValueError(f"residual_out must be contiguous, got strides {residual_out.stride()}")
                if residual_out.data_ptr() in (x.data_ptr(), residual.data_ptr()):
                    raise ValueError("residual_out must not alias x or residual")
            h = residual_out
        else:
            h = x
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
    if M == 0 or N == 0:
        return (out, h) if prologue == ADD_RMS_NORM else out
    y2 = out.view(-1, N)
    add2 = a2 if add is not None else y2
    if M == 1:
        h2 = h.view(-1, K) if (h is not None and residual is not None) else y2
        bn, bk, warps, stages = config or _row_config(N, K)
        _gemv_row_kernel[(triton.cdiv(N, bn),)](
            x2, r2, norm_weight if norm_weight is not None else x2, weight,
            bias if bias is not None else weight, add2, y2, h2,
            N, K, float(eps), weight.stride(0),
            PROLOGUE=prologue, HAS_RES=residual is not None, HAS_BIAS=bias is not None,
            HAS_ADD=add is not None, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
        )
        return (out, h) if prologue == ADD_RMS_NORM else out
    # M > 1: the prologue as its own kernel first (see the module docstring)
    if prologue == ADD_RMS_NORM:
        if residual is None:
            a = norm.rms_norm(x2, norm_weight, eps)
        else:
            a = norm.add_rms_norm(x2, r2, norm_weight, eps, residual_out=h.view(-1, K))[0]
    elif prologue == SILU_MUL:
        a = activation.silu_mul(x2)
    elif prologue == GELU:
        a = activation.gelu_tanh(x2)
    else:
        a = x2
    bn, bk, warps, stages = config or _dot_config(N, K, x.dtype == torch.float32)
    _gemv_dot_kernel[(triton.cdiv(N, bn),)](
        a, weight, bias if bias is not None else weight, add2, y2,
        M, N, K, a.stride(0), weight.stride(0), add2.stride(0), y2.stride(0),
        HAS_BIAS=bias is not None, HAS_ADD=add is not None, IEEE=x.dtype == torch.float32,
        BLOCK_M=MAX_ROWS, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )
    return (out, h) if prologue == ADD_RMS_NORM else out
