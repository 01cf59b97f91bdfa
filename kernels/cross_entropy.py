"""Fused linear + cross-entropy for training: loss and gradients without ever holding [tokens, vocab].

The tokens are cut into chunks. Per chunk: logits = h_c @ W^T (+ b) ([chunk, V], one GEMM), then one
kernel per row computes the log-sum-exp (online, over V in blocks), the row's loss, and overwrites the
logits in place with d loss / d logits = (softmax - onehot(target)) * scale; two more GEMMs turn that into
d h_c (= g @ W) and accumulate d W (+= g^T @ h_c, fp32) and d b. All gradients are made in the forward
(as Liger-Kernel does) and the backward only scales them by the incoming gradient, so nothing of
size [tokens, vocab] is saved for backward: peak extra memory is one [chunk, V] block.

Only rows whose target is not `ignore_index` are computed at all: with ULS fine-tuning the prefix
tokens, often most of a sequence, cost no head GEMM. Bloom's 250k vocabulary makes the full logits the
largest tensor of a training step, which is why this exists.

`ce_grad_rows_` is the Triton row kernel; `ce_grad_rows_ref_` its PyTorch twin (the reference, and the
path where Triton does not run); `fused_linear_cross_entropy` the chunked driver with its autograd
Function.
"""
from __future__ import annotations

import math

import torch

from . import backend
from .backend import tl, triton
from .common import check_tensor

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



def ce_grad_rows_ref_(logits: torch.Tensor, target: torch.Tensor, scale: float, ignore_index: int = -100):
    """In place: logits [n, V] become (softmax - onehot(target)) * scale (0 on ignored rows); returns the
    per-row loss lse - logit[target] in fp32 (0 on ignored rows). The twin of the Triton kernel."""
    lf = logits.float()
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target)).long()
    lse = torch.logsumexp(lf, dim=-1)
    loss = (lse - lf.gather(1, t[:, None])[:, 0]) * valid
    g = torch.exp(lf - lse[:, None])
    g[torch.arange(g.shape[0], device=g.device), t] -= 1.0
    g *= (scale * valid.float())[:, None]
    logits.copy_(g)
    return loss


def default_chunk_rows(n: int, hidden: int, vocab: int) -> int:
    # A [chunk, V] block about as large as the [n, H] hidden states, at least 64 rows (GEMM efficiency).
    chunks = max(1, math.ceil(vocab / hidden))
    rows = 1 << max(0, (math.ceil(n / chunks) - 1).bit_length())
    return max(1, min(n, max(64, rows)))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (TypeError, AttributeError):  # older torch: only the CUDA flag
        if dev == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return t.dtype


class LinearCrossEntropyFunction(torch.autograd.Function):
    """sum over rows of CE(h @ W^T + b, target) * scale. h [n, H]; W [V, H]; b [V] or None; target [n]."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, scale, chunk_rows, use_triton, ignore_index):
        dt = _compute_dtype(h)
        n, H = h.shape
        V = weight.shape[0]
        need_w = weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        row_fn = ce_grad_rows_ if use_triton else ce_grad_rows_ref_
        with torch.autocast(h.device.type, enabled=False):
            hc_all = h.to(dt)
            w = weight.to(dt)
            b = bias.to(dt) if bias is not None else None
            grad_h = torch.empty((n, H), dtype=h.dtype, device=h.device)
            grad_w = torch.zeros((V, H), dtype=torch.float32, device=h.device) if need_w else None
            grad_b = torch.zeros((V,), dtype=torch.float32, device=h.device) if need_b else None
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, n, chunk_rows):
                e = min(n, s + chunk_rows)
                hc = hc_all[s:e]
                logits = torch.addmm(b, hc, w.t()) if b is not None else hc @ w.t()  # [c, V]
                loss += row_fn(logits, target[s:e], scale, ignore_index).sum()
                grad_h[s:e] = logits @ w                                          # [c, H]
                if need_w:
                    grad_w += logits.t() @ hc
                if need_b:
                    grad_b += logits.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.w_dtype = weight.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        return loss * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype)
        gw = (grad_w * grad_out).to(ctx.w_dtype) if grad_w is not None else None
        gb = (grad_b * grad_out).to(ctx.b_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None, None, None, None


def fused_linear_cross_entropy(hidden, weight, target, bias=None, ignore_index: int = -100,
                               reduction: str = "mean", num_items_in_batch=None, chunk_rows=None,
                               use_triton=None):
    """Cross-entropy of `hidden @ weight.T + bias` against `target` (already shifted: target[i] is the
    token that row i predicts), never materializing all logits.

    hidden [.., H]; target [..] (same leading shape); weight [V, H]. reduction "mean" (over rows whose
    target is not ignore_index) or "sum"; num_items_in_batch (int or tensor) overrides it with
    sum / num_items_in_batch, as transformers' loss does under gradient accumulation. The result is an
    fp32 scalar. use_triton: None follows `backend.use_triton(hidden, interpreter=True)` (the Triton kernel on
    CUDA or under TRITON_INTERPRET=1, PyTorch elsewhere).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"weight must be [vocab, {H}], got shape {tuple(weight.shape)}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} does not match hidden {tuple(hidden.shape)}")
    V = weight.shape[0]
    h2 = hidden.reshape(-1, H)
    t2 = target.reshape(-1)
    # Everything the host needs (the row count for the shapes, the targets' range for the check, the
    # denominator) comes back in ONE read: on a GPU each .item() / nonzero is a host sync that drains the
    # stream. Ignored rows count as target 0 in the range, which is inside [0, V), so lo < 0 / hi >= V
    # exactly when a kept target is out of range, and lo / hi are then that target's value.
    valid = t2 != ignore_index
    tz = torch.where(valid, t2, torch.zeros_like(t2))
    parts = [valid.sum(), tz.min(), tz.max()] if t2.numel() else [valid.sum(), valid.sum(), valid.sum()]
    items_on_device = torch.is_tensor(num_items_in_batch) and num_items_in_batch.device == t2.device
    if items_on_device:
        parts.append(num_items_in_batch.reshape(()))
    stats = torch.stack([x.to(torch.float64) for x in parts]).tolist()  # the one host read
    n, lo, hi = int(stats[0]), int(stats[1]), int(stats[2])
    if n and (lo < 0 or hi >= V):
        bad = lo if lo < 0 else hi
        raise ValueError(f"target holds {bad}, outside the vocabulary [0, {V}) (ignore_index={ignore_index})")
    if num_items_in_batch is not None:
        if items_on_device:
            denom = float(stats[3])
        else:  # a Python number, or a tensor on another device (the host: reading it costs no sync)
            denom = float(num_items_in_batch.item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
    else:
        denom = float(max(n, 1)) if reduction == "mean" else 1.0
    if n:
        # the kept rows in order, as nonzero() gives them, without its host sync: a stable sort puts the
        # kept rows (key 0) first, in their order, and n is known
        keep = torch.argsort((~valid).to(torch.int32), stable=True)[:n]
        tk = t2.index_select(0, keep)
    if n == 0:  # nothing to learn from: a zero that keeps the graph
        return (hidden.sum() * 0.0).float()
    hk = h2.index_select(0, keep)
    if use_triton is None:
        use_triton = backend.use_triton(hidden, interpreter=True)
    chunk = int(chunk_rows) if chunk_rows else default_chunk_rows(n, H, V)
    return LinearCrossEntropyFunction.apply(hk, weight, bias, tk, 1.0 / denom, chunk, bool(use_triton),
                                            int(ignore_index))
