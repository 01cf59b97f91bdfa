"""Fused linear + cross-entropy for training: loss and gradients without ever holding [tokens, vocab].

The tokens are cut into chunks. Per chunk: logits = h_c @ W^T (+ b) ([chunk, V], one GEMM), then one
kernel per row computes the log-sum-exp (online, over V in blocks), the row's loss, and overwrites the
logits in place with d loss / d logits = (softmax - onehot(target)) * scale; two more GEMMs turn that into
d h_c (= g @ W) and accumulate d W (+= g^T @ h_c, fp32) and d b. All gradients are made in the forward
(as Liger-Kernel does) and the backward only scales them by the incoming gradient, so nothing of
size [tokens, vocab] is saved for backward: peak extra memory is one [chunk, V] block.

`ce_grad_rows_` (this file) is the Triton row kernel. The chunked driver, the autograd Function and
the pure-PyTorch twin of this kernel (for the CPU, no Triton needed) live in `ulskip.train.fused_ce`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_tensor


@triton.jit
def _ce_grad_kernel(
    LOGITS, stride_l, TARGET, LOSS,
    V, ignore_index, scale,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_l
    t = tl.load(TARGET + row).to(tl.int64)
    valid = t != ignore_index
    t_safe = tl.where(valid, t, 0)
    # pass 1: online max and sum of exp over the row
    m = float("-inf")
    d = 0.0
    for off in range(0, V, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    x_t = tl.load(base + t_safe).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - x_t, 0.0))
    s = tl.where(valid, scale, 0.0)
    # pass 2: the gradient, written over the logits
    for off in range(0, V, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        cmask = cols < V
        x = tl.load(base + cols, mask=cmask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        g = (p - tl.where(cols == t_safe, 1.0, 0.0)) * s
        tl.store(base + cols, g.to(LOGITS.dtype.element_ty), mask=cmask)


def ce_grad_rows_(logits: torch.Tensor, target: torch.Tensor, scale: float, ignore_index: int = -100):
    """In place: logits [n, V] (unit last stride) become (softmax - onehot) * scale (0 on ignored rows).
    Returns the per-row losses lse - logit[target] in fp32 [n] (0 on ignored rows)."""
    check_tensor("logits", logits, ndim=2)
    check_tensor("target", target, ndim=1, dtypes=(torch.int32, torch.int64), device=logits.device)
    n, V = logits.shape
    if target.shape[0] != n:
        raise ValueError(f"target has {target.shape[0]} rows, logits {n}")
    if logits.stride(-1) != 1:
        raise ValueError(f"logits must have a unit last stride, got strides {logits.stride()}")
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss
    BLOCK_V = min(4096 if logits.is_cuda else 1024, triton.next_power_of_2(V))
    _ce_grad_kernel[(n,)](logits, logits.stride(0), target.contiguous(), loss, V, int(ignore_index),
                          float(scale), BLOCK_V=BLOCK_V, num_warps=8 if BLOCK_V >= 4096 else 4)
    return loss

