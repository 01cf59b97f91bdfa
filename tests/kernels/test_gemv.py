"""The fused decode GEMV (norm / SwiGLU / GeLU / bias / residual-add epilogues, partial norm statistics)
against the PyTorch references and an fp64 oracle.
"""
import pytest
import torch

import ulskip.kernels.activation as kact
import ulskip.kernels.gemv as kgemv
from helpers import (DEV, assert_close, bad_tensor, gelu_oracle, gen, gpu, nan_like, randn, rms_oracle,
                     silu_oracle)

def _gemv_case(M, N, K, dtype, norm=False, glu=False, gelu=False, bias=False, add=False, parts=False,
               lead=None, device=DEV, seed=0, nparts=3):
    """fused_gemv against an fp64 oracle and the torch reference (ulskip.ops *_ref / F.linear)."""
    g = gen(seed, device)
    lead = lead or (M,)
    NW = 2 * N if glu else N
    x = randn(*lead, K, dtype=dtype, g=g, device=device)
    w = randn(NW, K, dtype=dtype, g=g, device=device, scale=K ** -0.5)
    b = randn(NW, dtype=dtype, g=g, device=device) if bias else None
    z = randn(*lead, N, dtype=dtype, g=g, device=device) if add else None
    stats = None
    if norm:  # the producer's partial sums: split the row's squares into nparts uneven chunks
        sq = x.float().pow(2)
        cuts = [0, K // 5, K // 2, K][: nparts] + [K]
        stats = torch.stack([sq[..., a:c].sum(-1) for a, c in zip(cuts[:-1], cuts[1:])], dim=-1)
    out = torch.full((*lead, N), float("nan"), dtype=dtype, device=device)
    res = kgemv.fused_gemv(x, w, b, norm_parts=stats, eps=1e-6, glu=glu, gelu=gelu, add=z, parts_out=parts, out=out)
    y, p = res if parts else (res, None)
    assert y is out
    # oracle in fp64 and the torch reference at dtype, composed in the module's order
    xo = rms_oracle(x, torch.ones(K, device=device), 1e-6) if norm else x.double()
    o = xo @ w.double().T + (b.double() if bias else 0)
    t = kgemv.rms_norm_linear_ref(x, 1e-6, w, b) if norm else torch.nn.functional.linear(x, w, b)
    if glu:
        o = silu_oracle(o)
        t = kact.silu_mul_ref(t)
    if gelu:
        o = gelu_oracle(o)
        t = kact.gelu_tanh_ref(t)
    if add:
        o = o + z.double()
        t = z + t
    assert_close(y, o, t, dtype, f"gemv norm={norm} glu={glu} gelu={gelu} add={add} M={M} N={N} K={K}")
    if parts:
        assert p.dtype == torch.float32 and p.shape[:-1] == y.shape[:-1]
        torch.testing.assert_close(p.sum(-1), y.float().pow(2).sum(-1), rtol=1e-5, atol=1e-5)
    return y


GEMV_KINDS = {"plain": {}, "norm": dict(norm=True), "norm_glu": dict(norm=True, glu=True), "gelu": dict(gelu=True),
              "add_parts": dict(add=True, parts=True), "bias_add": dict(bias=True, add=True)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kind", list(GEMV_KINDS))
@pytest.mark.parametrize("M,N,K", [(1, 48, 64), (5, 40, 200), (16, 96, 96), (3, 16, 32)])
def test_gemv(M, N, K, kind, dtype):
    _gemv_case(M, N, K, dtype, **{"bias": M == 5, **GEMV_KINDS[kind]})


def test_gemv_parts_feed_the_next_norm():
    # as in a layer: h2, parts = o(a) + h; then rms_norm(h2) @ W from those parts equals the reference
    g = gen(4)
    a, h = randn(2, 1, 64, g=g), randn(2, 1, 40, g=g)
    wo, w2 = randn(40, 64, g=g, scale=0.125), randn(24, 40, g=g, scale=0.15)
    h2, parts = kgemv.fused_gemv(a, wo, add=h, parts_out=True, config=(16, 32, 4, 2))
    assert parts.shape == (2, 1, 3)  # 3 programs of 16 columns
    y = kgemv.fused_gemv(h2, w2, norm_parts=parts, eps=1e-5)
    ref = kgemv.rms_norm_linear_ref(kgemv.linear_add_ref(a, wo, None, h), 1e-5, w2)
    assert_close(y, rms_oracle(h2, torch.ones(40), 1e-5) @ w2.double().T, ref, torch.float32, "parts -> norm")


def test_gemv_strided_rows_and_leading_dims():
    # the head takes x[:, -1] of [B, T, H] (row stride T*H); layers pass [B, 1, H]
    g = gen(3)
    x = randn(3, 4, 64, g=g)
    w = randn(40, 64, g=g, scale=0.125)
    st = x[:, -1].pow(2).sum(-1, keepdim=True)
    y = kgemv.fused_gemv(x[:, -1], w, norm_parts=st, eps=1e-6)
    assert_close(y, rms_oracle(x[:, -1], torch.ones(64), 1e-6) @ w.double().T,
                 kgemv.rms_norm_linear_ref(x[:, -1], 1e-6, w), torch.float32, "strided rows")
    _gemv_case(4, 40, 64, torch.float32, lead=(2, 2), norm=True, parts=True)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 7, 16])
@pytest.mark.parametrize("kind,N,K", [("norm", 12288, 4096), ("add_parts", 4096, 4096), ("norm_glu", 11008, 4096),
                                      ("add_parts", 4096, 11008), ("norm", 32000, 4096), ("gelu", 16384, 4096),
                                      ("bias_add", 4096, 16384), ("plain", 1536, 5120)])
def test_gemv_gpu(M, kind, N, K, dtype):
    kw = dict(GEMV_KINDS[kind])
    if kind == "norm":
        kw["nparts"] = 1 if M == 7 else 3
    _gemv_case(M, N, K, dtype, **{"bias": kind in ("gelu", "plain") and M == 7, **kw})


def test_bad_inputs_gemv():
    x, w = bad_tensor(2, 64), bad_tensor(32, 64)
    with pytest.raises(ValueError, match=r"x has 17 rows; fused_gemv takes at most 16"):
        kgemv.fused_gemv(bad_tensor(17, 64), w)
    with pytest.raises(ValueError, match=r"x has dtype torch.float32, expected the weight's dtype torch.float16"):
        kgemv.fused_gemv(bad_tensor(2, 64, dtype=torch.float32), w)
    with pytest.raises(ValueError, match=r"x has shape \(2, 48\), expected last dim 64"):
        kgemv.fused_gemv(bad_tensor(2, 48), w)
    with pytest.raises(ValueError, match=r"glu and gelu are exclusive"):
        kgemv.fused_gemv(x, w, glu=True, gelu=True)
    with pytest.raises(ValueError, match=r"glu needs a \[gate; up\] weight with an even number of rows, got 33"):
        kgemv.fused_gemv(x, bad_tensor(33, 64), glu=True)
    with pytest.raises(ValueError, match=r"bias has shape \(64,\), expected \(32,\)"):
        kgemv.fused_gemv(x, w, bad_tensor(64))
    with pytest.raises(ValueError, match=r"norm_parts has dtype torch.float16"):
        kgemv.fused_gemv(x, w, norm_parts=bad_tensor(2, 3))
    with pytest.raises(ValueError, match=r"norm_parts has shape \(3, 2\), expected \(2,\) \+ \(P,\)"):
        kgemv.fused_gemv(x, w, norm_parts=bad_tensor(3, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"eps must be a non-negative float, got -1"):
        kgemv.fused_gemv(x, w, norm_parts=bad_tensor(2, 1, dtype=torch.float32), eps=-1)
    with pytest.raises(ValueError, match=r"add is \(2, 64\) torch.float16, expected \(2, 32\)"):
        kgemv.fused_gemv(x, w, add=bad_tensor(2, 64))
    out = nan_like(bad_tensor(2, 32))
    with pytest.raises(ValueError, match=r"out has shape \(2, 32\), expected \(2, 16\)"):
        kgemv.fused_gemv(x, bad_tensor(16, 64), out=out)
    with pytest.raises(ValueError, match=r"weight must have a unit stride"):
        kgemv.fused_gemv(x, bad_tensor(64, 32).t(), out=out)
    assert torch.isnan(out).all(), "nothing may be written on bad input"
