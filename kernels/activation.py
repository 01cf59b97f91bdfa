"""Fused activations, fp32 math and one rounding on the way out.

silu_mul: SwiGLU on a fused gate/up projection [.., 2I] (gate first) -> silu(gate) * up [.., I]: reads
  2I, writes I per row instead of PyTorch's chunk + silu + mul (3 reads, 2 writes, one temporary).
gelu_tanh: Bloom's tanh GeLU, 0.5 x (1 + tanh(0.79788456 x (1 + 0.044715 x^2))), elementwise.
References: ulskip.ops.silu_mul_ref / gelu_tanh_ref.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_out, check_tensor, rows2d


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
