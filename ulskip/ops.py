"""One dispatch point for the hot operations.

Each op has a PyTorch reference here (used on the CPU, and the ground truth of every kernel test);
on CUDA tensors the Triton kernels of `ulskip.kernels` / the compiled ops of `ulskip._C` take over.
Layouts (B batch, T new tokens, S cache length, H heads, D head dim):
  q, k, v from the projections: [B, T, H, D];  one cache slot: [B, Hkv, S, D];  positions: [B, T].
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import sys

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- norms
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    # As transformers' LlamaRMSNorm: statistics in fp32, scale after casting back (weight None: no scale).
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) if weight is None else weight * xf.to(x.dtype)


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


# ----------------------------------------------------------------------------- rotary
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos, sin: [B, T, D] in x's dtype (Llama's half-split "rotate_half" form)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------- cache
def cache_write_ref(k_cache, v_cache, k, v, positions) -> None:
    """k_cache[b, :, positions[b, t]] = k[b, t] (same for v). k_cache: [B, Hkv, S, D]; k: [B, T, Hkv, D]."""
    B, T = positions.shape
    b = torch.arange(B, device=positions.device).unsqueeze(1).expand(B, T)
    k_cache[b, :, positions] = k.to(k_cache.dtype)
    v_cache[b, :, positions] = v.to(v_cache.dtype)


# ----------------------------------------------------------------------------- attention
def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes exactly as Bloom builds them (fp32)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** p for p in range(1, closest + 1)]
    if closest != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** p for p in range(1, 2 * (num_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def attention_ref(q, k, v, q_pos, kv_len, scale, slopes=None) -> torch.Tensor:
    """Causal attention of new queries over keys 0..S-1.

    q: [B, Hq, T, D]; k, v: [B, Hkv, S, D] (Hq a multiple of Hkv: GQA); q_pos: [B, T] absolute
    positions; key j is visible to query t when j <= q_pos[b, t] and j < kv_len[b]. ALiBi adds
    slope_h * j (shift-invariant per row, so equal to Bloom's slope * (j - i)). Returns [B, Hq, T, D].
    """
    B, Hq, T, D = q.shape
    S, Hkv = k.shape[2], k.shape[1]
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    j = torch.arange(S, device=q.device)
    visible = (j.view(1, 1, S) <= q_pos.unsqueeze(-1)) & (j.view(1, 1, S) < kv_len.view(B, 1, 1))
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, Hq, T, S]
    if slopes is not None:
        scores = scores + slopes.view(1, Hq, 1, 1).to(scores.device) * j.view(1, 1, 1, S).float()
    scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


def decode_attention_ref(q, k_cache, v_cache, seq_lens, scale, slopes=None) -> torch.Tensor:
    """One query per sequence. q: [B, Hq, D]; caches [B, Hkv, S, D]; seq_lens [B] = visible keys."""
    out = attention_ref(q.unsqueeze(2), k_cache, v_cache, (seq_lens - 1).unsqueeze(1), seq_lens, scale, slopes)
    return out.squeeze(2)


# ----------------------------------------------------------------------------- activations
def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused [.., 2I] gate/up projection (gate first)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_ref(x: torch.Tensor) -> torch.Tensor:
    """Bloom's GeLU (tanh approximation), computed in fp32 as transformers' bloom_gelu_forward."""
    xf = x.float()
    return (xf * 0.5 * (1.0 + torch.tanh(0.79788456 * xf * (1 + 0.044715 * xf * xf)))).to(x.dtype)


# ----------------------------------------------------------------------------- projections
# A projection with the small ops around it: on the GPU at decode sizes one kernel (kernels/gemv.py).
def rms_norm_linear_ref(h, eps, weight, bias=None, glu=False):
    """rms_norm(h) @ weight^T + bias, the norm without a weight (folded into `weight` at load time);
    glu: weight is [gate; up] and the result is silu(gate) * up."""
    y = F.linear(rms_norm_ref(h, None, eps), weight, bias)
    return silu_mul_ref(y) if glu else y


def linear_add_ref(x, weight, bias, add):
    """add + x @ weight^T + bias: a projection into the residual stream."""
    return add + F.linear(x, weight, bias)


def linear_gelu_ref(x, weight, bias=None):
    return gelu_tanh_ref(F.linear(x, weight, bias))


# ----------------------------------------------------------------------------- sampling
def filter_logits_ref(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering as transformers' warpers do: filtered
    entries become -inf. logits: [B, V] -> fp32 [B, V]."""
    logits = logits.float() / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(1, idx, remove), float("-inf"))
    return logits


def sample_ref(logits, temperature, top_k, top_p, generator=None) -> torch.Tensor:
    """Draw one token per row without a host sync: argmax(p / E), E ~ Exp(1), is a draw from p."""
    probs = torch.softmax(filter_logits_ref(logits, temperature, top_k, top_p), dim=-1)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    # a filtered token has p == 0; should E ever be exactly 0, 0/0 = NaN would win argmax: keep it out
    return torch.argmax((probs / noise).masked_fill(probs == 0, -1.0), dim=-1)


# ============================================================================= dispatch
# One entry point per op, what the engine calls: Triton kernels from `ulskip.kernels` for CUDA tensors
# (when triton imports), the references above everywhere else; the KV-cache write is the compiled op
# of ulskip._C on every device. Triton is imported lazily, so CPU users without triton can import this
# module. ULSKIP_NO_TRITON=1 forces the references (debugging).
@functools.lru_cache(maxsize=None)
def kernels_package():
    """`ulskip.kernels` (the repo's kernels/ folder, mapped by setup.py's package_dir). When the package
    is not installed (a plain source checkout on sys.path), load that folder under the same name."""
    try:
        return importlib.import_module("ulskip.kernels")
    except ModuleNotFoundError as e:
        if e.name != "ulskip.kernels":
            raise
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(root, "__init__.py")
    if not os.path.isfile(init):
        raise ModuleNotFoundError("ulskip.kernels is not installed and no kernels/ folder is next to ulskip/",
                                  name="ulskip.kernels")
    spec = importlib.util.spec_from_file_location("ulskip.kernels", init, submodule_search_locations=[root])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ulskip.kernels"] = mod
    spec.loader.exec_module(mod)
    return mod


def _kernel(name: str):
    kernels_package()
    return importlib.import_module(f"ulskip.kernels.{name}")


@functools.lru_cache(maxsize=None)
def _triton_ok() -> bool:
    if os.environ.get("ULSKIP_NO_TRITON", "0") not in ("", "0"):
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and _triton_ok()


def rotary(x, cos, sin):
    """Rotary on the prompt pass (torch ops: a few kernels per layer, captured in the prompt-pass graph for
    short prompts, small next to the GEMMs for long ones); decode uses rotary_cache_write."""
    return rotary_ref(x, cos, sin)


def cache_write(k_cache, v_cache, k, v, positions) -> None:
    """Compiled op of ulskip._C (csrc/cache_write*.c*), CPU and CUDA."""
    from ulskip import _ext
    _ext.cache_write(k_cache, v_cache, k, v, positions)


def layer_norm(x, weight, bias, eps):
    if _use_triton(x):
        return _kernel("norm").layer_norm(x, weight, bias, eps)
    return layer_norm_ref(x, weight, bias, eps)


def add_layer_norm(x, residual, weight, bias, eps):
    """-> (layer_norm(x + residual), x + residual)."""
    if _use_triton(x):
        return _kernel("norm").add_layer_norm(x, residual, weight, bias, eps)
    h = x + residual
    return layer_norm_ref(h, weight, bias, eps), h


def rotary_cache_write(q, k, v, cos, sin, k_cache, v_cache, positions, rotary=True):
    """Rotary on q and k (Llama half-split; skipped when rotary=False), k and v written into
    k_cache/v_cache[b, :, positions[b, t]]. Returns the rotated q (q itself when rotary=False)."""
    if _use_triton(k):
        return _kernel("rotary").rotary_cache_write(q, k, v, cos, sin, k_cache, v_cache, positions, rotary)
    if rotary:
        q, k = rotary_ref(q, cos, sin), rotary_ref(k, cos, sin)
    cache_write(k_cache, v_cache, k, v, positions)  # the compiled CPU op of ulskip._C
    return q


def decode_attention(q, k_cache, v_cache, seq_lens, scale, slopes=None):
    """q [B, Hq, D] over caches [B, Hkv, S, D] with seq_lens [B] visible keys -> [B, Hq, D]."""
    if _use_triton(q):
        return _kernel("decode_attention").decode_attention(q, k_cache, v_cache, seq_lens, scale, slopes)
    return decode_attention_ref(q, k_cache, v_cache, seq_lens, scale, slopes)


def silu_mul(gate_up):
    if _use_triton(gate_up):
        return _kernel("activation").silu_mul(gate_up)
    return silu_mul_ref(gate_up)


def gelu_tanh(x):
    if _use_triton(x):
        return _kernel("activation").gelu_tanh(x)
    return gelu_tanh_ref(x)


def _gemv_ok(x: torch.Tensor) -> bool:
    """Decode-sized rows on a GPU: the fused GEMV (kernels/gemv.py) beats cuBLAS and absorbs the ops around."""
    return _use_triton(x) and x.numel() <= 16 * x.shape[-1]


def linear(x, weight, bias=None):
    if _gemv_ok(x):
        return _kernel("gemv").fused_gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def rms_norm_linear(h, stats, eps, weight, bias=None, glu=False):
    """rms_norm(h) @ weight^T + bias (the norm's weight folded into `weight`); glu: silu(gate) * up of a
    [gate; up] weight. stats: [..., P] fp32 partial sums of h**2 from linear_add (None: computed here)."""
    if _gemv_ok(h):
        if stats is None:
            stats = h.float().pow(2).sum(-1, keepdim=True)
        return _kernel("gemv").fused_gemv(h, weight, bias, norm_parts=stats, eps=eps, glu=glu)
    hn = _kernel("norm").rms_norm(h, None, eps) if _use_triton(h) else rms_norm_ref(h, None, eps)
    y = F.linear(hn, weight, bias)
    return silu_mul(y) if glu else y


def linear_add(x, weight, bias, add):
    """-> (add + x @ weight^T + bias, stats): the new residual stream and, from the fused GEMV, the partial
    sums of its squares that the next rms_norm_linear uses (None elsewhere)."""
    if _gemv_ok(x):
        return _kernel("gemv").fused_gemv(x, weight, bias, add=add, parts_out=True)
    if x.is_cuda and bias is None:  # one cuBLAS call (beta = 1): the add rides in its epilogue
        N = weight.shape[0]
        return torch.addmm(add.reshape(-1, N), x.reshape(-1, x.shape[-1]), weight.t()).view(add.shape), None
    return add + F.linear(x, weight, bias), None


def linear_gelu(x, weight, bias=None):
    if _gemv_ok(x):
        return _kernel("gemv").fused_gemv(x, weight, bias, gelu=True)
    return gelu_tanh(F.linear(x, weight, bias))


def sample(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Token ids [B] (int64) from logits [B, V]; temperature 0 or top_k 1 is greedy. No host sync.

    The same torch ops on every device: each step is one device kernel already (topk, sort, softmax,
    cumsum, exponential_, argmax) and the noise must come from a seeded torch.Generator, so a Triton
    kernel would not pay. Known cost: top-p sorts the vocabulary, ~0.45-0.57 ms per step on an H200
    (bench/results/kernel_bench_h200.md), which a sort-free threshold search could remove."""
    if temperature == 0 or top_k == 1:
        return torch.argmax(logits, dim=-1)
    return sample_ref(logits, temperature, top_k, top_p, generator)
