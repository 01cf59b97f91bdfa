"""Backward of the fused activations of `activation.py` (fp32 math, one rounding on the way out).

silu_mul_backward: y = silu(gate) * up on a fused [.., 2I] gate/up tensor; given dy [.., I] returns
  d(gate_up) [.., 2I]:  s = sigmoid(gate)
      d_gate = dy * up * s * (1 + gate * (1 - s));   d_up = dy * gate * s
gelu_tanh_backward: Bloom's tanh GeLU; given dy and x returns dx:
      t = tanh(0.79788456 x (1 + 0.044715 x^2))
      dx = dy * (0.5 x (1 - t^2) (0.79788456 + 0.1070322243 x^2) + 0.5 (1 + t))
  (the formula of transformers' bloom_gelu_back).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_shape, check_tensor


@triton.jit
def _silu_mul_bwd_kernel(DY, X, DX, stride_dy, stride_x, stride_dx, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-gate))
    d_gate = dy * up * s * (1.0 + gate * (1.0 - s))
    d_up = dy * gate * s
    tl.store(DX + row * stride_dx + cols, d_gate.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + row * stride_dx + I + cols, d_up.to(DX.dtype.element_ty), mask=mask)


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
    check_tensor("gate_up", gate_up)
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even, got shape {tuple(gate_up.shape)}")
    I = gate_up.shape[-1] // 2
    check_tensor("dy", dy, device=gate_up.device)
    check_shape("dy", dy, (*gate_up.shape[:-1], I))
    dx = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    if dx.numel() == 0:
        return dx
    x2 = gate_up.reshape(-1, 2 * I)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    dy2 = dy.reshape(-1, I)
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    dx2 = dx.view(-1, 2 * I)
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
