"""The dispatch table of the hot operations: what the models call.

Each entry picks the Triton kernel of `ulskip.kernels` for a tensor where `backend.use_triton` says so
(a CUDA tensor, triton installed, ULSKIP_NO_TRITON unset), and the op's PyTorch reference (the `*_ref`
beside the kernel) everywhere else. The KV-cache write is the compiled op of ulskip._C on every device.
Layouts (B batch, T new tokens, S cache length, H heads, D head dim):
  q, k, v from the projections: [B, T, H, D];  one cache slot: [B, Hkv, S, D];  positions: [B, T].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ulskip.kernels import activation, cache_write as cache, decode_attention as attn, gemv, norm, rotary as rope
from ulskip.kernels.backend import use_triton

alibi_slopes = attn.alibi_slopes
cache_write = cache.cache_write


def rotary(x, cos, sin):
    """Rotary on the prompt pass (torch ops: a few kernels per layer, captured in the prompt-pass graph for
    short prompts, small next to the GEMMs for long ones); decode uses rotary_cache_write."""
    return rope.rotary_ref(x, cos, sin)


def layer_norm(x, weight, bias, eps):
    if use_triton(x):
        return norm.layer_norm(x, weight, bias, eps)
    return norm.layer_norm_ref(x, weight, bias, eps)


def add_layer_norm(x, residual, weight, bias, eps):
    """-> (layer_norm(x + residual), x + residual)."""
    if use_triton(x):
        return norm.add_layer_norm(x, residual, weight, bias, eps)
    h = x + residual
    return norm.layer_norm_ref(h, weight, bias, eps), h


def rotary_cache_write(q, k, v, cos, sin, k_cache, v_cache, positions, rotary=True):
    """Rotary on q and k (Llama half-split; skipped when rotary=False), k and v written into
    k_cache/v_cache[b, :, positions[b, t]]. Returns the rotated q (q itself when rotary=False)."""
    if use_triton(k):
        return rope.rotary_cache_write(q, k, v, cos, sin, k_cache, v_cache, positions, rotary)
    return rope.rotary_cache_write_ref(q, k, v, cos, sin, k_cache, v_cache, positions, rotary)


def decode_attention(q, k_cache, v_cache, seq_lens, scale, slopes=None):
    """q [B, Hq, D] over caches [B, Hkv, S, D] with seq_lens [B] visible keys -> [B, Hq, D]."""
    if use_triton(q):
        return attn.decode_attention(q, k_cache, v_cache, seq_lens, scale, slopes)
    return attn.decode_attention_ref(q, k_cache, v_cache, seq_lens, scale, slopes)


def verify_attention(q, k_cache, v_cache, seq_lens, scale, slopes=None):
    """T new tokens per sequence, q [B, T, Hq, D], over caches [B, Hkv, S, D] that hold their K/V; seq_lens
    [B] = keys visible to the last new token (token t sees T - 1 - t fewer) -> [B, T, Hq, D]."""
    if use_triton(q):
        return attn.verify_attention(q, k_cache, v_cache, seq_lens, scale, slopes)
    return attn.verify_attention_ref(q, k_cache, v_cache, seq_lens, scale, slopes)


def silu_mul(gate_up):
    if use_triton(gate_up):
        return activation.silu_mul(gate_up)
    return activation.silu_mul_ref(gate_up)


def gelu_tanh(x):
    if use_triton(x):
        return activation.gelu_tanh(x)
    return activation.gelu_tanh_ref(x)


# ----------------------------------------------------------------------------- projections
# A projection with the small ops around it: at decode sizes on a GPU one kernel (kernels/gemv.py).
def _gemv_ok(x: torch.Tensor) -> bool:
    """Decode-sized fp16/bf16 rows on a GPU: the fused GEMV beats cuBLAS and absorbs the ops around it.
    fp32 goes to cuBLAS: the GEMV's IEEE fp32 dots run on the FMA units over 16 padded rows, and an fp32
    SmolLM2 decoded ~6x slower than in bf16 on the H200 (its batch-32 steps, past the GEMV, were faster than
    its batch-8 ones). The kernel keeps fp32 for the tests that check it against its reference."""
    return use_triton(x) and x.dtype != torch.float32 and x.numel() <= gemv.MAX_ROWS * x.shape[-1]


def linear(x, weight, bias=None):
    if _gemv_ok(x):
        return gemv.fused_gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def rms_norm_linear(h, stats, eps, weight, bias=None, glu=False):
    """rms_norm(h) @ weight^T + bias (the norm's weight folded into `weight`); glu: silu(gate) * up of a
    [gate; up] weight. stats: [..., P] fp32 partial sums of h**2 from linear_add (None: computed here)."""
    if _gemv_ok(h):
        if stats is None:
            stats = h.float().pow(2).sum(-1, keepdim=True)
        return gemv.fused_gemv(h, weight, bias, norm_parts=stats, eps=eps, glu=glu)
    hn = norm.rms_norm(h, None, eps) if use_triton(h) else norm.rms_norm_ref(h, None, eps)
    y = F.linear(hn, weight, bias)
    return silu_mul(y) if glu else y


def linear_add(x, weight, bias, add):
    """-> (add + x @ weight^T + bias, stats): the new residual stream and, from the fused GEMV, the partial
    sums of its squares that the next rms_norm_linear uses (None elsewhere)."""
    if _gemv_ok(x):
        return gemv.fused_gemv(x, weight, bias, add=add, parts_out=True)
    if x.is_cuda and bias is None:  # one cuBLAS call (beta = 1): the add rides in its epilogue
        N = weight.shape[0]
        return torch.addmm(add.reshape(-1, N), x.reshape(-1, x.shape[-1]), weight.t()).view(add.shape), None
    return gemv.linear_add_ref(x, weight, bias, add), None


def linear_gelu(x, weight, bias=None):
    if _gemv_ok(x):
        return gemv.fused_gemv(x, weight, bias, gelu=True)
    return gelu_tanh(F.linear(x, weight, bias))
