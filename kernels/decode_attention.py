"""Decode attention over the compact KV cache: one query per sequence, split-KV ("flash-decoding").

Roofline. One decode step reads every visible key and value once: bytes = B * Hkv * L * D * 2 * elt
(L = visible keys) plus q/out (negligible). Work per key per KV head is 4 * G * D flops (G = Hq/Hkv query
heads: q.k and p.v), i.e. about G flops per byte in 16-bit -- far below the H200's ~200 flop/byte
balance point (990 TFLOP/s dense fp16/bf16 over ~4.8 TB/s), so the kernel is purely memory-bound and the
goal is to stream K/V at HBM bandwidth (~4.15 TB/s measured copy). Llama-7B, B=64, L=4096, fp16:
64*32*4096*128*2*2 B = 4.3 GB -> ~1.0 ms at 4.15 TB/s; B=1, L=4096: 67 MB -> ~16 us, where launch latency
and filling 132 SMs dominate. Hence:
  * GQA: one program per (sequence, KV head, split) handles all G query heads of that KV head, so each
    K/V tile is read from HBM once, not G times. The G query rows (padded to >=16 for tl.dot) share it.
  * Split-KV: with B*Hkv programs alone a small batch leaves most SMs idle, so the keys are cut into
    `num_splits` chunks chosen from B, Hkv and the cache capacity S (never from the actual lengths, which
    live on the device: the launch is static and CUDA-graph safe). A program whose chunk starts at or
    beyond its sequence's length runs no loop iteration and writes an empty partial (max -inf, sum 0);
    a small reduce kernel merges the partials (log-sum-exp). With one split the main kernel writes the
    normalized output itself and no reduce runs.
  * K/V tiles of BLOCK_N keys x BLOCK_D (head dim padded to a power of two, masked: 80 -> 128) are
    loaded with masks on the visible length, so nothing beyond seq_len is read (garbage/NaN there is
    harmless) and the loop is software-pipelined by Triton (num_stages).
  * Accuracy: scores in fp32 (fp16/bf16 products are exact in fp32), softmax in fp32, p.v with p split
    into hi + lo 16-bit parts (two tensor-core dots, free when memory-bound) so that rounding p to 16 bits
    does not add an error comparable to the output's own rounding. fp32 inputs use IEEE fp32 dots (no
    TF32).

Semantics = decode_attention_ref below: q [B, Hq, D]; k_cache, v_cache [B, Hkv, S, D];
seq_lens [B] int (visible keys, 1 <= seq_lens[b] <= S, not checked: that would need a host sync);
key j is visible to sequence b when j < seq_lens[b]; optional ALiBi slopes [Hq] fp32 add slope_h * j.
"""
from __future__ import annotations

import functools
import math

import torch

from .backend import tl, triton

from .common import INDEX_DTYPES, check_out, check_shape, check_tensor, next_pow2

# ----------------------------------------------------------------------------- references
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


def verify_attention_ref(q, k_cache, v_cache, seq_lens, scale, slopes=None) -> torch.Tensor:
    """T new tokens per sequence. q: [B, T, Hq, D]; caches [B, Hkv, S, D]; seq_lens [B] = keys visible to
    the last new token (its position + 1). -> [B, T, Hq, D]"""
    T = q.shape[1]
    q_pos = (seq_lens - T).unsqueeze(1) + torch.arange(T, device=q.device)
    return attention_ref(q.transpose(1, 2), k_cache, v_cache, q_pos, seq_lens, scale, slopes).transpose(1, 2)



SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)


@triton.jit
def _decode_attn_kernel(
    Q, K, V, SEQ, SLOPES, OUT, M_P, L_P, ACC_P,
    sq_b, sq_t, sq_h,
    sk_b, sk_h, sk_s,
    sv_b, sv_h, sv_s,
    so_b, so_t, so_h,
    sp_b, sp_h,            # strides of the [B, T*Hq, SPLITS] partials (ACC_P is [B, T*Hq, SPLITS, D])
    S, CHUNK, HQ, scale,
    D: tl.constexpr,       # head dim (constexpr: the masks on it fold away / stay vector-friendly)
    T: tl.constexpr,       # new tokens per sequence (1: decode; k+1: a speculative verify pass)
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_ALIBI: tl.constexpr, DIRECT: tl.constexpr, SPLIT_P: tl.constexpr, FP32_DOT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)

    # BLOCK_G rows: row r is query head g = r % G of KV head hk for new token t = r // G; all of them
    # share each K/V tile, read from HBM once
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    t_row = offs_g // G
    hq = hk * G + offs_g % G                  # query heads of this KV head
    g_mask = offs_g < T * G
    d_mask = offs_d < D

    q = tl.load(Q + b * sq_b + t_row[:, None] * sq_t + hq[:, None] * sq_h + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)          # [BLOCK_G, BLOCK_D]
    if HAS_ALIBI:
        slope = tl.load(SLOPES + hq, mask=g_mask, other=0.0).to(tl.float32)

    seq_len = tl.load(SEQ + b).to(tl.int32)
    start = split * CHUNK
    hi = tl.minimum(tl.minimum(start + CHUNK, seq_len), S)
    row_hi = seq_len - (T - 1) + t_row        # causal among the new tokens: token t sees keys < row_hi

    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, hi, BLOCK_N):
        n = n0 + offs_n
        n_mask = n < hi
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + n[:, None].to(tl.int64) * sk_s + offs_d[None, :], mask=kv_mask, other=0.0)
        if FP32_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale                                                      # [BLOCK_G, BLOCK_N] fp32
        if HAS_ALIBI:
            s += slope[:, None] * n[None, :].to(tl.float32)
        if T > 1:
            s = tl.where(n_mask[None, :] & (n[None, :] < row_hi[:, None]), s, float("-inf"))
        else:
            s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = m_new
        if T > 1:  # a row may have seen no key yet: its exp() terms must be 0, not NaN (-inf - -inf)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        v = tl.load(v_base + n[:, None].to(tl.int64) * sv_s + offs_d[None, :], mask=kv_mask, other=0.0)
        if FP32_DOT:
            acc += tl.dot(p, v, input_precision="ieee")
        elif SPLIT_P:
            p_hi = p.to(v.dtype)
            p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
            acc += tl.dot(p_hi, v)
            acc += tl.dot(p_lo, v)
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out_mask = g_mask[:, None] & d_mask[None, :]
    if DIRECT:
        o = acc / l_i[:, None]
        tl.store(OUT + b * so_b + t_row[:, None] * so_t + hq[:, None] * so_h + offs_d[None, :],
                 o.to(OUT.dtype.element_ty), mask=out_mask)
    else:
        p_off = b * sp_b + (t_row * HQ + hq) * sp_h + split
        tl.store(M_P + p_off, m_i, mask=g_mask)
        tl.store(L_P + p_off, l_i, mask=g_mask)
        tl.store(ACC_P + p_off[:, None] * D + offs_d[None, :], acc, mask=out_mask)


@triton.jit
def _decode_attn_reduce_kernel(
    M_P, L_P, ACC_P, OUT,
    sp_b, sp_h, so_b, so_t, so_h,
    SPLITS, HQ,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)             # t * HQ + query head
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < SPLITS
    d_mask = offs_d < D
    p_off = b * sp_b + h * sp_h + offs_s
    m = tl.load(M_P + p_off, mask=s_mask, other=float("-inf"))
    l = tl.load(L_P + p_off, mask=s_mask, other=0.0)
    m_max = tl.max(m, axis=0)                     # finite: split 0 always holds key 0
    w = tl.where(s_mask & (m > float("-inf")), tl.exp(m - m_max), 0.0)
    denom = tl.sum(w * l, axis=0)
    acc = tl.load(ACC_P + p_off[:, None] * D + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :],
                  other=0.0)
    o = tl.sum(acc * w[:, None], axis=0) / denom
    tl.store(OUT + b * so_b + (h // HQ) * so_t + (h % HQ) * so_h + offs_d, o.to(OUT.dtype.element_ty),
             mask=d_mask)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(B: int, Hkv: int, S: int, device: torch.device, block_n: int = 64,
                      min_chunk: int = 256) -> int:
    """Splits per (sequence, KV head) so that ~4 programs per SM exist, each chunk >= min_chunk keys.
    Static: depends only on shapes, never on the lengths held on the device."""
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    target = 4 * sms
    splits = max(1, -(-target // (B * Hkv)))
    splits = min(splits, max(1, -(-S // max(min_chunk, block_n))))
    return splits


def decode_attention(q, k_cache, v_cache, seq_lens, scale, slopes=None, out=None, num_splits=None,
                     block_n=None, num_warps=None, num_stages=None):
    """q [B, Hq, D], k_cache/v_cache [B, Hkv, S, D], seq_lens [B] -> out [B, Hq, D] (q's dtype).

    num_splits (optional) overrides the automatic split count (tests use it to cover the reduce path).
    """
    check_tensor("q", q, ndim=3)
    if out is not None:
        check_out("out", out, tuple(q.shape), q.dtype, q.device)
    res = _attend(q.unsqueeze(1), k_cache, v_cache, seq_lens, scale, slopes,
                  None if out is None else out.unsqueeze(1), num_splits, block_n, num_warps, num_stages)
    return res.squeeze(1) if out is None else out


MAX_VERIFY_TOKENS = 16  # new tokens per sequence verify_attention takes (a speculative pass: k drafts + 1)


def verify_attention(q, k_cache, v_cache, seq_lens, scale, slopes=None, out=None, num_splits=None,
                     block_n=None, num_warps=None, num_stages=None):
    """T new tokens per sequence over the cache (a speculative verify pass): q [B, T, Hq, D], caches
    [B, Hkv, S, D] already holding the new tokens' K/V, seq_lens [B] = keys visible to the last new token;
    new token t sees the first seq_lens[b] - (T - 1 - t) keys. -> out [B, T, Hq, D]. One program per
    (sequence, KV head, split) handles all T x G query rows, so each K/V tile is read once for all of them.
    """
    check_tensor("q", q, ndim=4)
    if not 1 <= q.shape[1] <= MAX_VERIFY_TOKENS:
        raise ValueError(f"verify_attention takes 1 to {MAX_VERIFY_TOKENS} new tokens per sequence, got {q.shape[1]}")
    if out is not None:
        check_out("out", out, tuple(q.shape), q.dtype, q.device)
    return _attend(q, k_cache, v_cache, seq_lens, scale, slopes, out, num_splits, block_n, num_warps, num_stages)


def _attend(q, k_cache, v_cache, seq_lens, scale, slopes, out, num_splits, block_n, num_warps, num_stages):
    B, T, Hq, D = q.shape
    dev = q.device
    check_tensor("k_cache", k_cache, ndim=4, device=dev)
    if k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"k_cache has shape {tuple(k_cache.shape)}, expected ({B}, Hkv, S, {D}) for q of "
                         f"shape {tuple(q.shape)}")
    _, Hkv, S, _ = k_cache.shape
    check_tensor("v_cache", v_cache, ndim=4, device=dev)
    check_shape("v_cache", v_cache, k_cache.shape)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, expected q's dtype {q.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in its last dim, got strides {t.stride()}")
    if q.stride(-1) != 1:
        raise ValueError(f"q must have a unit stride in its last dim, got strides {q.stride()}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {D} is not supported; allowed: {SUPPORTED_HEAD_DIMS}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads Hq={Hq} must be a multiple of KV heads Hkv={Hkv}")
    if S == 0:
        raise ValueError("the cache has S=0 slots; it needs at least one")
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, device=dev)
    check_shape("seq_lens", seq_lens, (B,))
    if slopes is not None:
        check_tensor("slopes", slopes, ndim=1, dtypes=(torch.float32,), device=dev)
        check_shape("slopes", slopes, (Hq,))
    if not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a Python float, got {type(scale).__name__}")
    if out is None:
        out = torch.empty((B, T, Hq, D), dtype=q.dtype, device=dev)
    if B == 0 or Hq == 0:
        return out

    G = Hq // Hkv
    BLOCK_G = max(16, next_pow2(T * G))
    BLOCK_D = next_pow2(D)
    fp32 = q.dtype == torch.float32
    # 16-bit, D<=128: 64-key tiles, 3 stages = ~72 KB of shared memory, 3 programs per H100/H200 SM,
    # ~100 registers, cp.async-pipelined (checked on the sm_90 PTX). fp32 (tests) gets smaller tiles.
    BLOCK_N = block_n or (32 if fp32 or BLOCK_D > 128 else 64)
    if num_stages is None:
        num_stages = 2 if fp32 or BLOCK_D > 128 else 3
    if num_splits is None:
        num_splits = choose_num_splits(B, Hkv, S, dev, BLOCK_N)
    if num_warps is None:  # a verify pass of T x G >= 128 query rows: 8 warps share the [rows, D] fp32 accumulator
        num_warps = 8 if BLOCK_G >= 128 else 4
    num_splits = max(1, min(int(num_splits), triton.cdiv(S, BLOCK_N)))
    chunk = triton.cdiv(triton.cdiv(S, num_splits), BLOCK_N) * BLOCK_N
    num_splits = triton.cdiv(S, chunk)
    direct = num_splits == 1
    if direct:
        m_p = l_p = acc_p = out  # unused
        sp = (0, 0)
    else:
        m_p = torch.empty((B, T * Hq, num_splits), dtype=torch.float32, device=dev)
        l_p = torch.empty_like(m_p)
        acc_p = torch.empty((B, T * Hq, num_splits, D), dtype=torch.float32, device=dev)
        sp = m_p.stride()[:2]
    _decode_attn_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, seq_lens, slopes if slopes is not None else q, out, m_p, l_p, acc_p,
        q.stride(0), q.stride(1), q.stride(2),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        out.stride(0), out.stride(1), out.stride(2), *sp,
        S, chunk, Hq, float(scale),
        D=D, T=T, G=G, BLOCK_G=BLOCK_G, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        HAS_ALIBI=slopes is not None, DIRECT=direct, SPLIT_P=not fp32, FP32_DOT=fp32,
        num_warps=num_warps, num_stages=num_stages,
    )
    if not direct:
        _decode_attn_reduce_kernel[(B, T * Hq)](
            m_p, l_p, acc_p, out, *sp, out.stride(0), out.stride(1), out.stride(2), num_splits, Hq,
            D=D, BLOCK_S=max(2, next_pow2(num_splits)), BLOCK_D=BLOCK_D, num_warps=4,
        )
    return out
