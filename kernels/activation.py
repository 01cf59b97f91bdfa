"""Fused activations, fp32 math and one rounding on the way out.

silu_mul: SwiGLU on a fused gate/up projection [.., 2I] (gate first) -> silu(gate) * up [.., I]: reads
  2I, writes I per row instead of PyTorch's chunk + silu + mul (3 reads, 2 writes, one temporary).
gelu_tanh: Bloom's tanh GeLU, 0.5 x (1 + tanh(0.79788456 x (1 + 0.044715 x^2))), elementwise.
Backward, fp32 math and one rounding on the way out:
silu_mul_backward: y = silu(gate) * up on a fused [.., 2I] gate/up tensor; given dy [.., I] returns
  d(gate_up) [.., 2I]:  s = sigmoid(gate)
      d_gate = dy * up * s * (1 + gate * (1 - s));   d_up = dy * gate * s
gelu_tanh_backward: Bloom's tanh GeLU; given dy and x returns dx:
      t = tanh(0.79788456 x (1 + 0.044715 x^2))
      dx = dy * (0.5 x (1 - t^2) (0.79788456 + 0.1070322243 x^2) + 0.5 (1 + t))
  (the formula of transformers' bloom_gelu_back).
silu_mul_split / silu_mul_split_backward: the same SwiGLU on separate gate and up tensors [.., I] (the
  outputs of gate_proj(x) and up_proj(x)), forward and backward. The training patch uses this pair: it
  calls the projection modules themselves (so their hooks run, e.g. DeepSpeed ZeRO-3 gathering the
  weights, or LoRA adapters) instead of one GEMM on a concatenated gate/up weight.

References: silu_mul_ref / gelu_tanh_ref below; the autograd Functions for training come last.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import tl, triton
from .common import check_out, check_shape, check_tensor, rows2d


# ----------------------------------------------------------------------------- references
def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused [.., 2I] gate/up projection (gate first)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_ref(x: torch.Tensor) -> torch.Tensor:
    """Bloom's GeLU (tanh approximation), computed in fp32 as transformers' bloom_gelu_forward."""
    xf = x.float()
    return (xf * 0.5 * (1.0 + torch.tanh(0.79788456 * xf * (1 + 0.044715 * xf * xf)))).to(x.dtype)


@triton.jit
def sigmoid_f32(gate):
    """sigmoid on fp32 values, overflow-free for any gate."""
    e = tl.exp(-tl.abs(gate))             # in (0, 1]: no overflow for any gate
    return tl.where(gate >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def silu_f32(gate):
    """silu on fp32 values (shared with kernels/gemv.py's epilogue and the backward kernels)."""
    return gate * sigmoid_f32(gate)


@triton.jit
def gelu_tanh_f32(x):
    """Bloom's tanh GeLU on fp32 values (shared with kernels/gemv.py's epilogue)."""
    u = 0.79788456 * x * (1.0 + 0.044715 * x * x)
    # tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|) in (0, 1]: no overflow, no libdevice call
    # (portable across Triton versions and the CPU interpreter).
    e = tl.exp(-2.0 * tl.abs(u))
    th = (1.0 - e) / (1.0 + e)
    th = tl.where(u < 0, -th, th)
    return x * 0.5 * (1.0 + th)


@triton.jit
def _silu_mul_kernel(X, Y, stride_x, stride_y, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (silu_f32(gate) * up).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_tanh_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, gelu_tanh_f32(x).to(Y.dtype.element_ty), mask=mask)


def check_gate_up(gate_up) -> int:
    """A fused [.., 2I] gate/up tensor (gate first) -> I."""
    check_tensor("gate_up", gate_up)
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even (gate and up halves), got shape "
                         f"{tuple(gate_up.shape)}")
    return gate_up.shape[-1] // 2


def silu_mul(gate_up, out=None):
    """gate_up [.., 2I] -> silu(gate) * up [.., I] in gate_up's dtype."""
    I = check_gate_up(gate_up)
    shape = (*gate_up.shape[:-1], I)
    if out is None:
        out = torch.empty(shape, dtype=gate_up.dtype, device=gate_up.device)
    else:
        check_out("out", out, shape, gate_up.dtype, gate_up.device)
        if not out.is_contiguous():
            raise ValueError(f"out must be contiguous, got strides {out.stride()}")
    if out.numel() == 0:
        return out
    x2 = rows2d(gate_up, 2 * I)
    y2 = out.view(-1, I)
    BLOCK = min(1024, triton.next_power_of_2(I))
    _silu_mul_kernel[(x2.shape[0], triton.cdiv(I, BLOCK))](x2, y2, x2.stride(0), y2.stride(0), I,
                                                          BLOCK=BLOCK, num_warps=4)
    return out


def gelu_tanh(x, out=None):
    """Elementwise tanh GeLU in fp32, result in x's dtype (shape of x)."""
    check_tensor("x", x)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        check_out("out", out, x.shape, x.dtype, x.device)
        if not out.is_contiguous():
            raise ValueError(f"out must be contiguous, got strides {out.stride()}")
    n = x.numel()
    if n == 0:
        return out
    xc = x.contiguous()
    BLOCK = 1024
    _gelu_tanh_kernel[(triton.cdiv(n, BLOCK),)](xc, out, n, BLOCK=BLOCK, num_warps=4)
    return out


# ----------------------------------------------------------------------------- backward and split gate/up (training)
@triton.jit
def _silu_mul_grads(dy, gate, up):
    """(d_gate, d_up) of y = silu(gate) * up, fp32."""
    s = sigmoid_f32(gate)
    return dy * up * s * (1.0 + gate * (1.0 - s)), dy * gate * s


@triton.jit
def _silu_mul_bwd_kernel(DY, X, DX, stride_dy, stride_x, stride_dx, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    d_gate, d_up = _silu_mul_grads(dy, gate, up)
    tl.store(DX + row * stride_dx + cols, d_gate.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + row * stride_dx + I + cols, d_up.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_split_kernel(G, U, Y, stride_g, stride_u, stride_y, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (silu_f32(gate) * up).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_split_bwd_kernel(DY, G, U, DG, DU, stride_dy, stride_g, stride_u, stride_d, I,
                               BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    d_gate, d_up = _silu_mul_grads(dy, gate, up)
    tl.store(DG + row * stride_d + cols, d_gate.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_d + cols, d_up.to(DU.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_tanh_bwd_kernel(DY, X, DX, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    u = 0.79788456 * x * (1.0 + 0.044715 * x * x)
    t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)  # tanh(u) without libdevice
    ff = 0.5 * x * ((1.0 - t * t) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1.0 + t)
    tl.store(DX + offs, (ff * dy).to(DX.dtype.element_ty), mask=mask)


def silu_mul_backward(dy, gate_up):
    """dy [.., I], gate_up [.., 2I] (the forward's input) -> d(gate_up) [.., 2I] in gate_up's dtype."""
    I = check_gate_up(gate_up)
    check_tensor("dy", dy, device=gate_up.device)
    check_shape("dy", dy, (*gate_up.shape[:-1], I))
    dx = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    if dx.numel() == 0:
        return dx
    x2, dy2, dx2 = rows2d(gate_up, 2 * I), rows2d(dy, I), dx.view(-1, 2 * I)
    BLOCK = min(1024, triton.next_power_of_2(I))
    _silu_mul_bwd_kernel[(x2.shape[0], triton.cdiv(I, BLOCK))](
        dy2, x2, dx2, dy2.stride(0), x2.stride(0), dx2.stride(0), I, BLOCK=BLOCK, num_warps=4)
    return dx


def gelu_tanh_backward(dy, x):
    """dy, x of one shape -> dx in x's dtype."""
    check_tensor("x", x)
    check_tensor("dy", dy, device=x.device)
    check_shape("dy", dy, x.shape)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = x.numel()
    if n == 0:
        return dx
    BLOCK = 1024
    _gelu_tanh_bwd_kernel[(triton.cdiv(n, BLOCK),)](dy.contiguous(), x.contiguous(), dx, n, BLOCK=BLOCK,
                                                   num_warps=4)
    return dx


def _check_pair(gate, up):
    check_tensor("gate", gate)
    check_tensor("up", up, dtypes=(gate.dtype,), device=gate.device)
    check_shape("up", up, gate.shape)
    if gate.dim() < 1:
        raise ValueError("gate and up must have at least one dim")


def silu_mul_split(gate, up):
    """gate, up [.., I] (same shape, dtype, device) -> silu(gate) * up [.., I] in their dtype."""
    _check_pair(gate, up)
    I = gate.shape[-1]
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    g2, u2, y2 = rows2d(gate, I), rows2d(up, I), out.view(-1, I)
    BLOCK = min(1024, triton.next_power_of_2(I))
    _silu_mul_split_kernel[(g2.shape[0], triton.cdiv(I, BLOCK))](
        g2, u2, y2, g2.stride(0), u2.stride(0), y2.stride(0), I, BLOCK=BLOCK, num_warps=4)
    return out


def silu_mul_split_backward(dy, gate, up):
    """dy, gate, up [.., I] (gate and up: the forward's inputs) -> (d_gate, d_up) in gate's dtype."""
    _check_pair(gate, up)
    check_tensor("dy", dy, device=gate.device)
    check_shape("dy", dy, gate.shape)
    I = gate.shape[-1]
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if dg.numel() == 0:
        return dg, du
    dy2, g2, u2 = rows2d(dy, I), rows2d(gate, I), rows2d(up, I)
    dg2, du2 = dg.view(-1, I), du.view(-1, I)
    BLOCK = min(1024, triton.next_power_of_2(I))
    _silu_mul_split_bwd_kernel[(g2.shape[0], triton.cdiv(I, BLOCK))](
        dy2, g2, u2, dg2, du2, dy2.stride(0), g2.stride(0), u2.stride(0), dg2.stride(0), I,
        BLOCK=BLOCK, num_warps=4)
    return dg, du


# ----------------------------------------------------------------------------- autograd (training)
class SwiGLUFunction(torch.autograd.Function):
    """gate, up [.., I] (the outputs of gate_proj and up_proj) -> silu(gate) * up [.., I].

    Two inputs rather than one [.., 2I] tensor: concatenating the projection outputs would cost an extra
    read and write of 2I per token (and splitting the gradient back another), while the kernel reads the
    two tensors where they are."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return silu_mul_split(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return silu_mul_split_backward(dy, gate, up)


class GeluTanhFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return gelu_tanh(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return gelu_tanh_backward(dy, x)
