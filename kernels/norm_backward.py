"""Backward of RMSNorm and LayerNorm (the forwards live in `norm.py`).

The statistics are recomputed from x (one extra row read, no saved rstd), so the autograd Functions in
`ulskip.train.patching` can reuse the forward launchers of `norm.py` unchanged.

Each program walks a contiguous block of rows: it writes dx row by row and keeps its share of dw (and
db) in fp32 registers, stored once as one row of a [programs, N] partial buffer that the launcher sums.

Math (xf = x in fp32, rstd = 1/sqrt(var + eps), all in fp32):
  RMSNorm   xn = xf * rstd;  y = w * xn
            dw = sum_rows(dy * xn);  g = dy * w;  dx = rstd * (g - xn * mean(g * xn))
  LayerNorm xh = (xf - mean) * rstd;  y = w * xh + b
            dw = sum_rows(dy * xh);  db = sum_rows(dy);  g = dy * w
            dx = rstd * (g - mean(g) - xh * mean(g * xh))
(The forward's rounding of xn to x.dtype before the weight, as transformers does, is not
differentiated: it is a straight-through cast, exact in fp32.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_shape, check_tensor, next_pow2, row_warps, rows2d
from .norm import MAX_HIDDEN


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, DX, DW,
    stride_dy, stride_x, stride_dx,
    M, N, rows_per_prog, eps,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    row0 = pid * rows_per_prog
    for i in range(0, rows_per_prog):
        row = (row0 + i).to(tl.int64)
        if row < M:
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
            xn = x * rstd
            g = dy * w
            dx = rstd * (g - xn * (tl.sum(g * xn, axis=0) / N))
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * xn
    tl.store(DW + pid * N + cols, dw, mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, X, W, DX, DW, DB,
    stride_dy, stride_x, stride_dx,
    M, N, rows_per_prog, eps,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row0 = pid * rows_per_prog
    for i in range(0, rows_per_prog):
        row = (row0 + i).to(tl.int64)
        if row < M:
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.sum(x, axis=0) / N
            xc = tl.where(mask, x - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
            xh = xc * rstd
            g = dy * w
            dx = rstd * (g - tl.sum(g, axis=0) / N - xh * (tl.sum(g * xh, axis=0) / N))
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * xh
            db += dy
    tl.store(DW + pid * N + cols, dw, mask=mask)
    tl.store(DB + pid * N + cols, db, mask=mask)


def _num_programs(M: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(M, 4 * sms))
    return max(1, min(M, 8))  # the CPU interpreter: few programs


def _check(dy, x, weight, bias, eps, kind):
    check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0 or x.shape[-1] > MAX_HIDDEN:
        raise ValueError(f"x must have a last (hidden) dim in [1, {MAX_HIDDEN}], got shape {tuple(x.shape)}")
    check_tensor("dy", dy, device=x.device)
    check_shape("dy", dy, x.shape)
    N = x.shape[-1]
    check_tensor("weight", weight, ndim=1, device=x.device)
    check_shape("weight", weight, (N,))
    if kind == "ln" and bias is not None:
        check_tensor("bias", bias, ndim=1, device=x.device)
        check_shape("bias", bias, (N,))
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    return N


def _bwd(kind, dy, x, weight, bias, eps):
    N = _check(dy, x, weight, bias, eps, kind)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        dw = torch.zeros_like(weight)
        return (dx, dw) if kind == "rms" else (dx, dw, torch.zeros(N, dtype=weight.dtype, device=x.device))
    x2, dy2, dx2 = rows2d(x, N), rows2d(dy, N), dx.view(-1, N)
    M = x2.shape[0]
    progs = _num_programs(M, x.device)
    rows_per_prog = triton.cdiv(M, progs)
    progs = triton.cdiv(M, rows_per_prog)
    dw_part = torch.empty((progs, N), dtype=torch.float32, device=x.device)
    BLOCK_N = next_pow2(N)
    common = dict(BLOCK_N=BLOCK_N, num_warps=row_warps(BLOCK_N))
    if kind == "rms":
        _rms_norm_bwd_kernel[(progs,)](dy2, x2, weight, dx2, dw_part, dy2.stride(0), x2.stride(0),
                                       dx2.stride(0), M, N, rows_per_prog, float(eps), **common)
        return dx, dw_part.sum(0).to(weight.dtype)
    db_part = torch.empty((progs, N), dtype=torch.float32, device=x.device)
    _layer_norm_bwd_kernel[(progs,)](dy2, x2, weight, dx2, dw_part, db_part, dy2.stride(0), x2.stride(0),
                                     dx2.stride(0), M, N, rows_per_prog, float(eps), **common)
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    return dx, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(bias_dtype)


def rms_norm_backward(dy, x, weight, eps):
    """Gradients of y = rms_norm(x, weight, eps): returns (dx in x.dtype, dweight in weight.dtype)."""
    return _bwd("rms", dy, x, weight, None, eps)


def layer_norm_backward(dy, x, weight, bias, eps):
    """Gradients of y = layer_norm(x, weight, bias, eps): (dx, dweight, dbias)."""
    return _bwd("ln", dy, x, weight, bias, eps)
