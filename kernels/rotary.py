"""Rotary embedding on q and k fused with the write of k and v into one compact-cache slot.

Semantics (rotary_cache_write_ref below): q_rot = rotary_ref(q, cos, sin); k_rot = rotary_ref(k, cos, sin);
cache_write_ref(k_cache, v_cache, k_rot, v, positions); return q_rot. With ROTARY=False (Bloom, ALiBi) it
is the cache write alone and q is returned untouched.

Layouts: q [B, T, Hq, D], k/v [B, T, Hkv, D] (any strides: views into a fused QKV output are fine);
cos/sin [B, T, D] (any strides: an expanded [1, T, D] table is fine); caches [B, Hkv, S, D] with a unit
last stride; positions [B, T] int32/int64. Llama's half-split convention:
  out[:D/2] = x1 * cos[:D/2] - x2 * sin[:D/2];  out[D/2:] = x2 * cos[D/2:] + x1 * sin[D/2:]
computed in fp32 with one rounding (PyTorch's reference rounds three times, so this is at least as
exact). Positions are not range-checked (that needs a host sync): each must be in [0, S).

Grid: (B*T, head blocks): the first cdiv(Hq, BLOCK_H) blocks rotate q heads, the others rotate k heads
and copy v heads into the cache. Every byte is read once and written once.
"""
from __future__ import annotations

import torch

from .backend import tl, triton
from .cache_write import cache_write
from .common import INDEX_DTYPES, check_out, check_shape, check_tensor, next_pow2


# ----------------------------------------------------------------------------- references
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos, sin: [B, T, D] in x's dtype (Llama's half-split "rotate_half" form)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


def rotary_cache_write_ref(q, k, v, cos, sin, k_cache, v_cache, positions, rotary=True):
    """What the kernel computes, in PyTorch ops; the cache write is the compiled op (ulskip._C), which has
    a CPU version, so this is also the engine's CPU path."""
    if rotary:
        q, k = rotary_ref(q, cos, sin), rotary_ref(k, cos, sin)
    cache_write(k_cache, v_cache, k, v, positions)
    return q



@triton.jit
def _rotary_cache_kernel(
    Q, K, V, COS, SIN, KC, VC, POS, QO,
    sq_b, sq_t, sq_h, sq_d,
    sk_b, sk_t, sk_h, sk_d,
    sv_b, sv_t, sv_h, sv_d,
    sc_b, sc_t, sc_d,
    ss_b, ss_t, ss_d,
    skc_b, skc_h, skc_s,
    svc_b, svc_h, svc_s,
    sp_b, sp_t,
    so_b, so_t, so_h,
    T, HQ, HKV,
    D: tl.constexpr, ROTARY: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bt = tl.program_id(0)
    hb = tl.program_id(1)
    b = (bt // T).to(tl.int64)
    t = (bt % T).to(tl.int64)
    HALF = D // 2
    NQB = tl.cdiv(HQ, BLOCK_H)  # HQ == 0 without rotary: every block is a k/v block
    offs_h = tl.arange(0, BLOCK_H)
    dh = tl.arange(0, BLOCK_HALF)
    mh = dh < HALF
    if ROTARY:
        c_row = COS + b * sc_b + t * sc_t
        s_row = SIN + b * ss_b + t * ss_t
        cos1 = tl.load(c_row + dh * sc_d, mask=mh, other=0.0).to(tl.float32)[None, :]
        cos2 = tl.load(c_row + (dh + HALF) * sc_d, mask=mh, other=0.0).to(tl.float32)[None, :]
        sin1 = tl.load(s_row + dh * ss_d, mask=mh, other=0.0).to(tl.float32)[None, :]
        sin2 = tl.load(s_row + (dh + HALF) * ss_d, mask=mh, other=0.0).to(tl.float32)[None, :]
    if hb < NQB:
        # ---- rotate a block of q heads into QO (only launched with ROTARY)
        if ROTARY:
            h = hb * BLOCK_H + offs_h
            m = (h < HQ)[:, None] & mh[None, :]
            q_ptr = Q + b * sq_b + t * sq_t + h[:, None] * sq_h
            q1 = tl.load(q_ptr + dh[None, :] * sq_d, mask=m, other=0.0).to(tl.float32)
            q2 = tl.load(q_ptr + (dh[None, :] + HALF) * sq_d, mask=m, other=0.0).to(tl.float32)
            o_ptr = QO + b * so_b + t * so_t + h[:, None] * so_h
            tl.store(o_ptr + dh[None, :], (q1 * cos1 - q2 * sin1).to(QO.dtype.element_ty), mask=m)
            tl.store(o_ptr + dh[None, :] + HALF, (q2 * cos2 + q1 * sin2).to(QO.dtype.element_ty), mask=m)
    else:
        # ---- (rotate) a block of k heads and copy the v heads into cache slot `pos`
        h = (hb - NQB) * BLOCK_H + offs_h
        hm = h < HKV
        pos = tl.load(POS + b * sp_b + t * sp_t).to(tl.int64)
        k_ptr = K + b * sk_b + t * sk_t + h[:, None] * sk_h
        kc_ptr = KC + b * skc_b + h[:, None] * skc_h + pos * skc_s
        if ROTARY:
            m = hm[:, None] & mh[None, :]
            k1 = tl.load(k_ptr + dh[None, :] * sk_d, mask=m, other=0.0).to(tl.float32)
            k2 = tl.load(k_ptr + (dh[None, :] + HALF) * sk_d, mask=m, other=0.0).to(tl.float32)
            tl.store(kc_ptr + dh[None, :], (k1 * cos1 - k2 * sin1).to(KC.dtype.element_ty), mask=m)
            tl.store(kc_ptr + dh[None, :] + HALF, (k2 * cos2 + k1 * sin2).to(KC.dtype.element_ty), mask=m)
        dd = tl.arange(0, BLOCK_D)
        md = hm[:, None] & (dd < D)[None, :]
        if not ROTARY:
            kk = tl.load(k_ptr + dd[None, :] * sk_d, mask=md, other=0.0)
            tl.store(kc_ptr + dd[None, :], kk.to(KC.dtype.element_ty), mask=md)
        v_ptr = V + b * sv_b + t * sv_t + h[:, None] * sv_h
        vv = tl.load(v_ptr + dd[None, :] * sv_d, mask=md, other=0.0)
        vc_ptr = VC + b * svc_b + h[:, None] * svc_h + pos * svc_s
        tl.store(vc_ptr + dd[None, :], vv.to(VC.dtype.element_ty), mask=md)


def rotary_cache_write(q, k, v, cos, sin, k_cache, v_cache, positions, rotary=True, out=None):
    """Rotate q and k (if `rotary`), write k and v into k_cache/v_cache[b, :, positions[b, t]].

    q [B, T, Hq, D] (may be None when rotary=False), k/v [B, T, Hkv, D], cos/sin [B, T, D] (ignored and
    may be None when rotary=False), k_cache/v_cache [B, Hkv, S, D], positions [B, T] int.
    Returns the rotated q (in `out` [B, T, Hq, D] when given, else a new tensor); q itself when
    rotary=False.
    """
    check_tensor("k", k, ndim=4)
    B, T, Hkv, D = k.shape
    dev = k.device
    check_tensor("v", v, ndim=4, device=dev)
    check_shape("v", v, (B, T, Hkv, D))
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, c, ndim=4, device=dev)
        if c.shape[0] != B or c.shape[1] != Hkv or c.shape[3] != D:
            raise ValueError(f"{name} has shape {tuple(c.shape)}, expected ({B}, {Hkv}, S, {D}) for k of "
                             f"shape {tuple(k.shape)}")
        if c.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in its last dim, got strides {c.stride()}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)}, k_cache {tuple(k_cache.shape)}; "
                         "they must match")
    check_tensor("positions", positions, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    check_shape("positions", positions, (B, T))
    if rotary:
        check_tensor("q", q, ndim=4, device=dev)
        if q.shape[0] != B or q.shape[1] != T or q.shape[3] != D:
            raise ValueError(f"q has shape {tuple(q.shape)}, expected ({B}, {T}, Hq, {D}) for k of shape "
                             f"{tuple(k.shape)}")
        Hq = q.shape[2]
        if D % 2:
            raise ValueError(f"rotary needs an even head dim, got D={D}")
        for name, c in (("cos", cos), ("sin", sin)):
            check_tensor(name, c, ndim=3, device=dev)
            check_shape(name, c, (B, T, D))
        if out is None:
            out = torch.empty((B, T, Hq, D), dtype=q.dtype, device=dev)
        else:
            check_out("out", out, (B, T, Hq, D), q.dtype, dev)
    else:
        Hq = 0
    if B * T == 0:
        return out if rotary else q
    BLOCK_H = min(next_pow2(max(Hq, Hkv)), 8)
    n_blocks = triton.cdiv(Hq, BLOCK_H) + triton.cdiv(Hkv, BLOCK_H)
    if rotary:
        qs, cs, ss, os_ = q.stride(), cos.stride(), sin.stride(), out.stride()
        qq, cc, s_, oo = q, cos, sin, out
    else:
        qs, cs, ss, os_ = (0, 0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0, 0)
        qq = cc = s_ = oo = k  # unused pointers
    _rotary_cache_kernel[(B * T, n_blocks)](
        qq, k, v, cc, s_, k_cache, v_cache, positions, oo,
        *qs, *k.stride(), *v.stride(), *cs, *ss,
        *k_cache.stride()[:3], *v_cache.stride()[:3], *positions.stride(), *os_[:3],
        T, Hq, Hkv,
        D=D, ROTARY=bool(rotary), BLOCK_H=BLOCK_H, BLOCK_HALF=next_pow2(max(D // 2, 1)), BLOCK_D=next_pow2(D),
        num_warps=4 if D * BLOCK_H <= 1024 else 8,
    )
    return out if rotary else q
