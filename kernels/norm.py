"""RMSNorm and LayerNorm, plain and fused with the residual add.

One program per row: the row (hidden size up to 32768) is loaded once, statistics in fp32, written once.
The fused form reads x and residual, writes h = x + residual (the next layer's residual stream, rounded
to the input dtype exactly as PyTorch's `x + residual` is) and norm(h): 2 reads + 2 writes instead of the
3 reads + 2 writes of an add followed by a norm.

Numerics follow transformers:
  RMSNorm (LlamaRMSNorm): xf = h.float(); y = weight * (xf * rsqrt(mean(xf^2) + eps)).to(h.dtype);
          the output dtype is torch.promote_types(weight.dtype, h.dtype), as `weight * y` gives.
  LayerNorm (F.layer_norm): fp32 statistics, y = (h - mean) * rstd * w + b in fp32, output in h.dtype.

Backward: the statistics are recomputed from x (one extra row read, no saved rstd), so the autograd
Functions below reuse the forward launchers unchanged.

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

References (the semantics every kernel is tested against): rms_norm_ref / layer_norm_ref below.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import tl, triton
from .common import check_out, check_same_dtype, check_shape, check_tensor, next_pow2, row_warps, rows2d


# ----------------------------------------------------------------------------- references
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    # As transformers' LlamaRMSNorm: statistics in fp32, scale after casting back (weight None: no scale).
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) if weight is None else weight * xf.to(x.dtype)


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


MAX_HIDDEN = 32768


@triton.jit
def _load_row(X, R, H, row, stride_x, stride_r, stride_h, cols, mask, HAS_RES: tl.constexpr):
    """One row of x in fp32; with a residual, h = x + r is rounded once (as torch's x + residual), stored
    to H, and returned instead."""
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, h, mask=mask)
        x = h.to(tl.float32)
    return x


@triton.jit
def _rms_norm_kernel(
    X, R, W, Y, H,                      # input, residual, weight, normed out, sum out
    stride_x, stride_r, stride_y, stride_h,  # row strides (the last dim is contiguous)
    N, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = _load_row(X, R, H, row, stride_x, stride_r, stride_h, cols, mask, HAS_RES)
    var = tl.sum(x * x, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    xn = (x * rstd).to(X.dtype.element_ty).to(tl.float32)  # HF casts back before the weight
    if HAS_W:
        xn = xn * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, xn.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_kernel(
    X, R, W, B, Y, H,
    stride_x, stride_r, stride_y, stride_h,
    N, eps,
    HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = _load_row(X, R, H, row, stride_x, stride_r, stride_h, cols, mask, HAS_RES)
    mean = tl.sum(x, axis=0) / N
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (xc * rstd * w + b).to(Y.dtype.element_ty), mask=mask)


def _check_common(kind, x, residual, weight, bias, eps):
    check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (hidden) dim, got shape {tuple(x.shape)}")
    N = x.shape[-1]
    if N > MAX_HIDDEN:
        raise ValueError(f"hidden size {N} is larger than the supported {MAX_HIDDEN}")
    if residual is not None:
        check_tensor("residual", residual, device=x.device)
        check_shape("residual", residual, x.shape)
        check_same_dtype("residual", residual, x.dtype)
    if weight is not None or kind == "ln":
        check_tensor("weight", weight, ndim=1, device=x.device)
        check_shape("weight", weight, (N,))
    if bias is not None or kind == "ln":
        check_tensor("bias", bias, ndim=1, device=x.device)
        check_shape("bias", bias, (N,))
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    return N


def _norm(kind, x, residual, weight, bias, eps, out, residual_out):
    N = _check_common(kind, x, residual, weight, bias, eps)
    out_dtype = torch.promote_types(weight.dtype, x.dtype) if kind == "rms" and weight is not None else x.dtype
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    else:
        check_out("out", out, x.shape, out_dtype, x.device)
    if residual is not None:
        if residual_out is None:
            residual_out = torch.empty_like(x, memory_format=torch.contiguous_format)
        else:
            check_out("residual_out", residual_out, x.shape, x.dtype, x.device)
    if x.numel() == 0:
        return out if residual is None else (out, residual_out)
    x2 = rows2d(x, N)
    y2 = out.view(-1, N)
    if residual is not None:
        r2 = rows2d(residual, N)
        h2 = residual_out.view(-1, N)
    else:
        r2, h2 = x2, y2  # unused (HAS_RES=False)
    BLOCK_N = next_pow2(N)
    grid = (x2.shape[0],)
    common = dict(HAS_RES=residual is not None, BLOCK_N=BLOCK_N, num_warps=row_warps(BLOCK_N))
    if kind == "rms":
        _rms_norm_kernel[grid](x2, r2, weight if weight is not None else x2, y2, h2, x2.stride(0), r2.stride(0),
                               y2.stride(0), h2.stride(0), N, float(eps), HAS_W=weight is not None, **common)
    else:
        _layer_norm_kernel[grid](x2, r2, weight, bias, y2, h2, x2.stride(0), r2.stride(0), y2.stride(0),
                                 h2.stride(0), N, float(eps), **common)
    return out if residual is None else (out, residual_out)


def rms_norm(x, weight, eps, out=None):
    """x [.., N], weight [N] or None (no scale) -> RMSNorm(x) [.., N] in promote_types(weight, x)."""
    return _norm("rms", x, None, weight, None, eps, out, None)


def add_rms_norm(x, residual, weight, eps, out=None, residual_out=None):
    """-> (RMSNorm(x + residual), x + residual). residual_out may be `residual` itself (in place)."""
    return _norm("rms", x, residual, weight, None, eps, out, residual_out)


def layer_norm(x, weight, bias, eps, out=None):
    """x [.., N], weight/bias [N] -> LayerNorm(x) [.., N] in x.dtype."""
    return _norm("ln", x, None, weight, bias, eps, out, None)


def add_layer_norm(x, residual, weight, bias, eps, out=None, residual_out=None):
    """-> (LayerNorm(x + residual), x + residual)."""
    return _norm("ln", x, residual, weight, bias, eps, out, residual_out)


# ----------------------------------------------------------------------------- backward
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


# ----------------------------------------------------------------------------- autograd (training)
class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y = rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x, weight, ctx.eps)
        return dx, (dw if ctx.needs_input_grad[1] else None), None


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y = layer_norm(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        dx, dw, db = layer_norm_backward(dy, x, weight, bias, ctx.eps)
        return (dx, dw if ctx.needs_input_grad[1] else None, db if ctx.needs_input_grad[2] else None, None)
