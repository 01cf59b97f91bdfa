"""Rotary fused with the compact-cache write, against the PyTorch reference and an fp64 oracle.
"""
import pytest
import torch

import ulskip.kernels.rotary as krot
from helpers import DEV, DTYPES, assert_close, bad_tensor, gen, gpu, nan_like, randn, rope_tables, rotary_oracle

def _rotary_case(B, T, Hq, Hkv, D, S, dtype, rotary, device=DEV, seed=0, expand=False):
    g = gen(seed, device)
    qkv = randn(B, T, (Hq + 2 * Hkv) * D, dtype=dtype, g=g, device=device)  # a fused projection output
    q = qkv[..., : Hq * D].view(B, T, Hq, D)
    k = qkv[..., Hq * D:(Hq + Hkv) * D].view(B, T, Hkv, D)
    v = qkv[..., (Hq + Hkv) * D:].view(B, T, Hkv, D)
    cos, sin = rope_tables(B, T, D, dtype, g, device, expand)
    pos = torch.stack([torch.randperm(S, generator=gen(seed + 1 + b, "cpu"))[:T] for b in range(B)]).to(device)
    k_cache = torch.full((B, Hkv, S, D), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    out = torch.full((B, T, Hq, D), float("nan"), dtype=dtype, device=device)
    res = krot.rotary_cache_write(q, k, v, cos if rotary else None, sin if rotary else None, k_cache, v_cache,
                                  pos, rotary=rotary, out=out if rotary else None)
    bidx = torch.arange(B, device=device).unsqueeze(1).expand(B, T)
    written = torch.zeros(B, S, dtype=torch.bool, device=device)
    written[bidx, pos] = True
    # every slot not at a position keeps its poison; every written slot is finite
    assert torch.isnan(k_cache.permute(0, 2, 1, 3)[~written]).all()
    assert torch.isnan(v_cache.permute(0, 2, 1, 3)[~written]).all()
    k_got = k_cache[bidx, :, pos]  # [B, T, Hkv, D]
    v_got = v_cache[bidx, :, pos]
    assert torch.equal(v_got, v), "v must be copied exactly"
    if rotary:
        assert res is out
        assert_close(res, rotary_oracle(q, cos, sin), krot.rotary_ref(q, cos, sin), dtype, "q")
        assert_close(k_got, rotary_oracle(k, cos, sin), krot.rotary_ref(k, cos, sin), dtype, "k")
    else:
        assert res is q
        assert torch.equal(k_got, k), "k must be copied exactly without rotary"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotary", [True, False])
@pytest.mark.parametrize("B,T,Hq,Hkv,D,S", [(2, 1, 4, 4, 64, 16), (2, 3, 4, 2, 80, 32), (1, 5, 9, 3, 128, 8)])
def test_rotary_cache_write(B, T, Hq, Hkv, D, S, rotary, dtype):
    _rotary_case(B, T, Hq, Hkv, D, S, dtype, rotary)


def test_rotary_expanded_tables():
    _rotary_case(3, 2, 4, 2, 64, 8, torch.float16, True, expand=True)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rotary", [True, False])
@pytest.mark.parametrize("B,T,Hq,Hkv,D,S", [
    (64, 1, 32, 32, 128, 2048), (16, 1, 32, 8, 128, 4096), (4, 128, 32, 8, 128, 512),
    (8, 1, 32, 32, 80, 256), (8, 1, 16, 16, 64, 256), (1, 1, 32, 32, 128, 4096)])
def test_rotary_cache_write_gpu(B, T, Hq, Hkv, D, S, rotary, dtype):
    _rotary_case(B, T, Hq, Hkv, D, S, dtype, rotary)


def test_bad_inputs_rotary():
    B, T, Hq, Hkv, D, S = 2, 1, 4, 2, 64, 8
    q, k, v = bad_tensor(B, T, Hq, D), bad_tensor(B, T, Hkv, D), bad_tensor(B, T, Hkv, D)
    cos, sin = bad_tensor(B, T, D), bad_tensor(B, T, D)
    kc, vc = nan_like(bad_tensor(B, Hkv, S, D)), nan_like(bad_tensor(B, Hkv, S, D))
    pos = torch.zeros(B, T, dtype=torch.long, device=DEV)
    with pytest.raises(ValueError, match=r"k_cache has shape \(2, 3, 8, 64\), expected \(2, 2, S, 64\)"):
        krot.rotary_cache_write(q, k, v, cos, sin, bad_tensor(B, 3, S, D), vc, pos)
    with pytest.raises(ValueError, match=r"positions has dtype torch.float32"):
        krot.rotary_cache_write(q, k, v, cos, sin, kc, vc, pos.float())
    with pytest.raises(ValueError, match=r"positions has shape \(2, 3\), expected \(2, 1\)"):
        krot.rotary_cache_write(q, k, v, cos, sin, kc, vc, torch.zeros(B, 3, dtype=torch.long, device=DEV))
    with pytest.raises(ValueError, match=r"cos has shape \(2, 1, 32\), expected \(2, 1, 64\)"):
        krot.rotary_cache_write(q, k, v, bad_tensor(B, T, 32), sin, kc, vc, pos)
    with pytest.raises(ValueError, match=r"q has shape \(2, 1, 4, 32\), expected \(2, 1, Hq, 64\)"):
        krot.rotary_cache_write(bad_tensor(B, T, Hq, 32), k, v, cos, sin, kc, vc, pos)
    assert torch.isnan(kc).all() and torch.isnan(vc).all(), "nothing may be written on bad input"
