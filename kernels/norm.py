"""RMSNorm and LayerNorm, plain and fused with the residual add.

One program per row: the row (hidden size up to 32768) is loaded once, statistics in fp32, written once.
The fused form reads x and residual, writes h = x + residual (the next layer's residual stream, rounded
to the input dtype exactly as PyTorch's `x + residual` is) and norm(h): 2 reads + 2 writes instead of the
3 reads + 2 writes of an add followed by a norm.

Numerics follow transformers:
  RMSNorm (LlamaRMSNorm): xf = h.float(); y = weight * (xf * rsqrt(mean(xf^2) + eps)).to(h.dtype);
          the output dtype is torch.promote_types(weight.dtype, h.dtype), as `weight * y` gives.
  LayerNorm (F.layer_norm): fp32 statistics, y = (h - mean) * rstd * w + b in fp32, output in h.dtype.
References: ulskip.ops.rms_norm_ref / layer_norm_ref.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_out, check_same_dtype, check_shape, check_tensor, next_pow2, row_warps, rows2d

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
