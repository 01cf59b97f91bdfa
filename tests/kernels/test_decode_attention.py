"""Split-KV decode attention (GQA, ALiBi, per-sequence lengths) against the PyTorch reference and an fp64
oracle; empty splits, short sequences in long caches.
"""
import math

import pytest
import torch

import ulskip.kernels.decode_attention as kattn
from helpers import DEV, DTYPES, assert_close, attn_oracle, bad_tensor, gen, gpu, nan_like, randn

def _attn_case(B, Hq, Hkv, D, S, dtype, alibi, num_splits, device=DEV, seed=0, lens=None):
    g = gen(seed, device)
    q = randn(B, Hq, D, dtype=dtype, g=g, device=device)
    k_cache = randn(B, Hkv, S, D, dtype=dtype, g=g, device=device)
    v_cache = randn(B, Hkv, S, D, dtype=dtype, g=g, device=device)
    if lens is None:
        lens = torch.randint(1, S + 1, (B,), generator=gen(seed, "cpu"))
        lens[0] = 1
        if B > 1:
            lens[1] = S
    seq_lens = torch.as_tensor(lens, dtype=torch.int32).to(device)
    slopes = kattn.alibi_slopes(Hq).to(device) if alibi else None
    scale = 1.0 / math.sqrt(D)
    oracle = attn_oracle(q, k_cache, v_cache, seq_lens, scale, slopes)
    t_out = kattn.decode_attention_ref(q, k_cache, v_cache, seq_lens, scale, slopes)
    # poison everything beyond each sequence's length: the kernel must not read it
    j = torch.arange(S, device=device)
    beyond = (j.view(1, S) >= seq_lens.view(B, 1)).view(B, 1, S, 1)
    k_p = k_cache.masked_fill(beyond, float("nan"))
    v_p = v_cache.masked_fill(beyond, float("nan"))
    out = nan_like(q)
    res = kattn.decode_attention(q, k_p, v_p, seq_lens, scale, slopes, out=out, num_splits=num_splits)
    assert res is out
    assert_close(out, oracle, t_out, dtype, f"attn splits={num_splits}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("B,Hq,Hkv,D,S", [(3, 4, 4, 64, 100), (2, 8, 2, 80, 200), (2, 4, 1, 128, 64),
                                          (2, 16, 2, 64, 48), (2, 4, 2, 16, 40), (1, 4, 4, 32, 70)])
def test_decode_attention(B, Hq, Hkv, D, S, num_splits, alibi, dtype):
    _attn_case(B, Hq, Hkv, D, S, dtype, alibi, num_splits)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,Hq,Hkv,D,S,alibi", [
    (1, 32, 32, 128, 4096, False), (64, 32, 32, 128, 1024, False), (64, 32, 8, 128, 4096, False),
    (16, 32, 8, 128, 4096, False), (8, 32, 32, 80, 512, False), (8, 32, 32, 64, 2048, False),
    (4, 32, 32, 128, 256, True), (32, 32, 32, 128, 2048, True), (1, 32, 8, 128, 256, False)])
def test_decode_attention_gpu(B, Hq, Hkv, D, S, alibi, dtype):
    _attn_case(B, Hq, Hkv, D, S, dtype, alibi, None)


@gpu
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_decode_attention_short_lens_gpu(num_splits):
    # short sequences in a long cache: most splits are empty and must not disturb the result
    _attn_case(8, 32, 8, 128, 4096, torch.bfloat16, False, num_splits, lens=[1, 2, 63, 64, 65, 300, 1000, 4096])


def test_bad_inputs_attention():
    q, kc = bad_tensor(2, 8, 64), bad_tensor(2, 2, 32, 64)
    lens = torch.tensor([3, 5], device=DEV)
    with pytest.raises(ValueError, match=r"Hq=6 must be a multiple of KV heads Hkv=4"):
        kattn.decode_attention(bad_tensor(2, 6, 64), bad_tensor(2, 4, 32, 64), bad_tensor(2, 4, 32, 64), lens, 0.1)
    with pytest.raises(ValueError, match=r"head dim 72 is not supported"):
        kattn.decode_attention(bad_tensor(2, 8, 72), bad_tensor(2, 2, 32, 72), bad_tensor(2, 2, 32, 72), lens, 0.1)
    with pytest.raises(ValueError, match=r"v_cache has dtype torch.float32, expected q's dtype torch.float16"):
        kattn.decode_attention(q, kc, bad_tensor(2, 2, 32, 64, dtype=torch.float32), lens, 0.1)
    with pytest.raises(ValueError, match=r"seq_lens has dtype torch.float32"):
        kattn.decode_attention(q, kc, kc, lens.float(), 0.1)
    with pytest.raises(ValueError, match=r"seq_lens has shape \(3,\), expected \(2,\)"):
        kattn.decode_attention(q, kc, kc, torch.tensor([1, 2, 3], device=DEV), 0.1)
    with pytest.raises(ValueError, match=r"slopes has shape \(4,\), expected \(8,\)"):
        kattn.decode_attention(q, kc, kc, lens, 0.1, slopes=torch.ones(4, device=DEV))
    with pytest.raises(ValueError, match=r"k_cache has shape \(2, 2, 32, 128\), expected \(2, Hkv, S, 64\)"):
        kattn.decode_attention(q, bad_tensor(2, 2, 32, 128), bad_tensor(2, 2, 32, 128), lens, 0.1)


def _verify_case(B, T, Hq, Hkv, D, S, dtype, alibi, num_splits, device=DEV, seed=0, lens=None):
    g = gen(seed, device)
    q = randn(B, T, Hq, D, dtype=dtype, g=g, device=device)
    k_cache = randn(B, Hkv, S, D, dtype=dtype, g=g, device=device)
    v_cache = randn(B, Hkv, S, D, dtype=dtype, g=g, device=device)
    if lens is None:  # keys visible to the last new token: at least T (the new tokens themselves)
        lens = torch.randint(T, S + 1, (B,), generator=gen(seed, "cpu"))
        lens[0] = T
        if B > 1:
            lens[1] = S
    seq_lens = torch.as_tensor(lens, dtype=torch.int32).to(device)
    slopes = kattn.alibi_slopes(Hq).to(device) if alibi else None
    scale = 1.0 / math.sqrt(D)
    # new token t is a decode query that sees seq_lens - (T - 1 - t) keys
    oracle = torch.stack([attn_oracle(q[:, t], k_cache, v_cache, seq_lens - (T - 1 - t), scale, slopes)
                          for t in range(T)], dim=1)
    t_out = kattn.verify_attention_ref(q, k_cache, v_cache, seq_lens, scale, slopes)
    j = torch.arange(S, device=device)
    beyond = (j.view(1, S) >= seq_lens.view(B, 1)).view(B, 1, S, 1)
    k_p, v_p = k_cache.masked_fill(beyond, float("nan")), v_cache.masked_fill(beyond, float("nan"))
    out = nan_like(q)
    res = kattn.verify_attention(q, k_p, v_p, seq_lens, scale, slopes, out=out, num_splits=num_splits)
    assert res is out
    assert_close(out, oracle, t_out, dtype, f"verify T={T} splits={num_splits}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("B,T,Hq,Hkv,D,S,alibi", [(3, 2, 4, 4, 64, 100, False), (2, 5, 8, 2, 80, 90, True),
                                                  (2, 3, 6, 2, 32, 40, False), (1, 1, 4, 4, 32, 70, False),
                                                  (2, 16, 16, 2, 32, 48, True)])  # 16 x 8 = 128 query rows
def test_verify_attention(B, T, Hq, Hkv, D, S, alibi, num_splits, dtype):
    _verify_case(B, T, Hq, Hkv, D, S, dtype, alibi, num_splits)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,T,Hq,Hkv,D,S,alibi", [
    (1, 5, 32, 32, 128, 4096, False), (32, 9, 32, 32, 128, 2048, False), (8, 4, 9, 3, 64, 2048, False),
    (16, 16, 32, 8, 128, 1024, False), (4, 3, 32, 32, 128, 512, True)])
def test_verify_attention_gpu(B, T, Hq, Hkv, D, S, alibi, dtype):
    _verify_case(B, T, Hq, Hkv, D, S, dtype, alibi, None)


def test_bad_inputs_verify_attention():
    lens = torch.tensor([3, 5], device=DEV)
    kc = bad_tensor(2, 2, 32, 64)
    with pytest.raises(ValueError, match=r"verify_attention takes 1 to 16 new tokens per sequence, got 17"):
        kattn.verify_attention(bad_tensor(2, 17, 8, 64), kc, kc, lens, 0.1)
    with pytest.raises(ValueError, match=r"q must have 4 dims, got shape \(2, 8, 64\)"):
        kattn.verify_attention(bad_tensor(2, 8, 64), kc, kc, lens, 0.1)
