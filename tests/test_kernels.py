"""Triton kernels against their PyTorch references (ulskip.ops *_ref) and an fp64 oracle.

Without CUDA the kernels run in Triton's interpreter on small shapes (fp32/fp16; bf16 only for kernels
without tl.dot: bf16 tl.dot is wrong in the CPU interpreter, DESIGN.md §5). With CUDA the same tests run
on the GPU, plus the `gpu`-marked tests on real shapes (Llama-7B decode, GQA, head dims 64/80/128) in
fp16 and bf16.

Tolerance (DESIGN.md §5): max |kernel - fp64 oracle| <= 2 * max |torch reference at the same dtype -
oracle| + a tiny floor (a fraction of an ulp in 16-bit, a few ulps in fp32). NaN never passes; outputs
are poisoned with NaN before the kernel writes them, and cache slots not meant to be written must stay
NaN.
"""
import os

import torch

CUDA = torch.cuda.is_available()
COMPILE_CHECK = os.environ.get("ULSKIP_COMPILE_CHECK") == "1"  # the sm_90 compile check's subprocess
if not CUDA and not COMPILE_CHECK:  # before any triton kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from ulskip import ops  # noqa: E402

ops.kernels_package()  # resolves `ulskip.kernels` (installed, or from the source checkout)
import ulskip.kernels.activation as kact  # noqa: E402
import ulskip.kernels.decode_attention as kattn  # noqa: E402
import ulskip.kernels.gemv as kgemv  # noqa: E402
import ulskip.kernels.norm as knorm  # noqa: E402
import ulskip.kernels.rotary as krot  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]


def gpu(f):
    """Real-shape test: marked `gpu`, skipped without CUDA."""
    for m in GPU:
        f = m(f)
    return f
# bf16 only on the GPU: the CPU interpreter's bf16 tl.dot is wrong, and (seen with triton 3.9) its
# fp32 -> bf16 conversion truncates instead of rounding to nearest, so bf16 errors there are not the GPU's.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
FLOOR_ULPS = {torch.float32: 16.0, torch.float16: 0.25, torch.bfloat16: 0.25}


def gen(seed=0, device=DEV):
    return torch.Generator(device=device).manual_seed(seed)


def randn(*shape, dtype=torch.float32, g=None, device=DEV, scale=1.0):
    return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)


def assert_close(out, oracle, torch_out, dtype, what=""):
    """out: kernel result; oracle: fp64 exact; torch_out: the PyTorch reference at the same dtype."""
    assert out.shape == oracle.shape, (what, out.shape, oracle.shape)
    assert not torch.isnan(out).any(), f"{what}: NaN in the kernel output (unwritten or bad math)"
    assert not torch.isnan(oracle).any(), f"{what}: NaN in the oracle (test bug)"
    err = (out.double() - oracle).abs().max().item()
    terr = (torch_out.double() - oracle).abs().max().item()
    scale = max(1.0, oracle.abs().max().item())
    floor = FLOOR_ULPS[dtype] * torch.finfo(dtype).eps * scale
    if os.environ.get("ULSKIP_TEST_ERRLOG"):  # optional: log every comparison's margin (tuning aid)
        with open(os.environ["ULSKIP_TEST_ERRLOG"], "a") as f:
            f.write(f"{what}\t{dtype}\t{err:.3e}\t{terr:.3e}\t{floor:.1e}\t{err / (2 * terr + floor):.2f}\n")
    assert err <= 2 * terr + floor, f"{what}: kernel error {err:.3e} > 2 x torch error {terr:.3e} + {floor:.1e}"


def nan_like(t, dtype=None):
    return torch.full(t.shape, float("nan"), dtype=dtype or t.dtype, device=t.device)


# ============================================================================ norms
def rms_oracle(h, w, eps):
    hd = h.double()
    return w.double() * (hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps))


def ln_oracle(h, w, b, eps):
    hd = h.double()
    mu = hd.mean(-1, keepdim=True)
    var = (hd - mu).pow(2).mean(-1, keepdim=True)
    return (hd - mu) / torch.sqrt(var + eps) * w.double() + b.double()


def _norm_case(shape, dtype, kind, fused, strided, device=DEV, seed=0):
    g = gen(seed, device)
    N = shape[-1]
    if strided:  # rows of a wider buffer: row stride != N
        x = randn(*shape[:-1], N + 16, dtype=dtype, g=g, device=device)[..., :N]
    else:
        x = randn(*shape, dtype=dtype, g=g, device=device)
    r = randn(*shape, dtype=dtype, g=g, device=device)
    w = (1 + 0.1 * randn(N, g=g, device=device)).to(dtype)
    b = randn(N, dtype=dtype, g=g, device=device, scale=0.1)
    eps = 1e-6 if kind == "rms" else 1e-5
    out = torch.full(shape, float("nan"), dtype=dtype, device=device)
    h_ref = (x + r) if fused else x
    if kind == "rms":
        oracle, t_out = rms_oracle(h_ref, w, eps), ops.rms_norm_ref(h_ref, w, eps)
    else:
        oracle, t_out = ln_oracle(h_ref, w, b, eps), ops.layer_norm_ref(h_ref, w, b, eps)
    if fused:
        h_out = torch.full(shape, float("nan"), dtype=dtype, device=device)
        if kind == "rms":
            y, h = knorm.add_rms_norm(x, r, w, eps, out=out, residual_out=h_out)
        else:
            y, h = knorm.add_layer_norm(x, r, w, b, eps, out=out, residual_out=h_out)
        assert h is h_out and torch.equal(h, x + r), "the residual sum must equal torch's x + residual"
    else:
        y = knorm.rms_norm(x, w, eps, out=out) if kind == "rms" else knorm.layer_norm(x, w, b, eps, out=out)
    assert y is out
    assert_close(y, oracle, t_out, dtype, f"{kind} fused={fused}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shape,strided", [((1, 64), False), ((3, 5, 96), False), ((7, 1000), True)])
def test_norm(shape, strided, fused, kind, dtype):
    _norm_case(shape, dtype, kind, fused, strided)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("shape", [(1, 4096), (64, 4096), (16, 1, 5120), (4, 14336)])
@pytest.mark.parametrize("fused", [False, True])
def test_norm_gpu(shape, fused, kind, dtype):
    _norm_case(shape, dtype, kind, fused, strided=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_without_weight(dtype):
    # the engine's prompt pass: the norm weight lives in the next projection (LlamaLM.fold_norms)
    x = randn(5, 200, dtype=dtype, g=gen(8))
    y = knorm.rms_norm(x, None, 1e-6)
    assert y.dtype == dtype
    assert_close(y, rms_oracle(x, torch.ones(200, device=DEV), 1e-6), ops.rms_norm_ref(x, None, 1e-6), dtype, "rms, no weight")


def test_rms_norm_promotes_like_hf():
    # fp32 weight on fp16 activations: HF's `weight * x.to(fp16)` gives fp32
    x = randn(4, 64, dtype=torch.float16, g=gen(1))
    w = 1 + 0.1 * randn(64, g=gen(2))
    y = knorm.rms_norm(x, w, 1e-6)
    assert y.dtype == torch.float32
    assert_close(y, rms_oracle(x, w, 1e-6), ops.rms_norm_ref(x, w, 1e-6), torch.float16, "promote")


def test_add_rms_norm_in_place_residual():
    g = gen(3)
    x, r = randn(5, 128, dtype=torch.float16, g=g), randn(5, 128, dtype=torch.float16, g=g)
    w = (1 + 0.1 * randn(128, g=g)).to(torch.float16)
    expect_h = x + r
    y, h = knorm.add_rms_norm(x, r, w, 1e-6, residual_out=r)
    assert h is r and torch.equal(r, expect_h)
    assert_close(y, rms_oracle(expect_h, w, 1e-6), ops.rms_norm_ref(expect_h, w, 1e-6), torch.float16)


# ============================================================================ rotary + cache write
def _rope_tables(B, T, D, dtype, g, device, expand=False):
    ang = torch.rand(1 if expand else B, T, D // 2, generator=g, device=device) * 50.0
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    if expand:
        cos, sin = cos.expand(B, T, D), sin.expand(B, T, D)
    return cos, sin


def rotary_oracle(x, cos, sin):
    return ops.rotary_ref(x.double(), cos.double(), sin.double())


def _rotary_case(B, T, Hq, Hkv, D, S, dtype, rotary, device=DEV, seed=0, expand=False):
    g = gen(seed, device)
    qkv = randn(B, T, (Hq + 2 * Hkv) * D, dtype=dtype, g=g, device=device)  # a fused projection output
    q = qkv[..., : Hq * D].view(B, T, Hq, D)
    k = qkv[..., Hq * D:(Hq + Hkv) * D].view(B, T, Hkv, D)
    v = qkv[..., (Hq + Hkv) * D:].view(B, T, Hkv, D)
    cos, sin = _rope_tables(B, T, D, dtype, g, device, expand)
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
        assert_close(res, rotary_oracle(q, cos, sin), ops.rotary_ref(q, cos, sin), dtype, "q")
        assert_close(k_got, rotary_oracle(k, cos, sin), ops.rotary_ref(k, cos, sin), dtype, "k")
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


# ============================================================================ decode attention
def attn_oracle(q, k_cache, v_cache, seq_lens, scale, slopes=None):
    """fp64, grouped (no repeat of K/V): q [B, Hq, D] -> [B, Hq, D]."""
    B, Hq, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    qd = q.double().view(B, Hkv, G, D)
    s = torch.einsum("bhgd,bhsd->bhgs", qd, k_cache.double()) * scale
    j = torch.arange(S, device=q.device)
    if slopes is not None:
        s = s + slopes.double().view(1, Hkv, G, 1) * j.double()
    s = s.masked_fill((j.view(1, S) >= seq_lens.view(B, 1)).view(B, 1, 1, S), float("-inf"))
    return torch.einsum("bhgs,bhsd->bhgd", torch.softmax(s, -1), v_cache.double()).reshape(B, Hq, D)


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
    slopes = ops.alibi_slopes(Hq).to(device) if alibi else None
    scale = 1.0 / math.sqrt(D)
    oracle = attn_oracle(q, k_cache, v_cache, seq_lens, scale, slopes)
    t_out = ops.decode_attention_ref(q, k_cache, v_cache, seq_lens, scale, slopes)
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


# ============================================================================ activations
def silu_oracle(x):
    xd = x.double()
    gate, up = xd.chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


def gelu_oracle(x):
    xd = x.double()
    return xd * 0.5 * (1.0 + torch.tanh(0.79788456 * xd * (1 + 0.044715 * xd * xd)))


def _act_case(shape, dtype, device=DEV, seed=0):
    g = gen(seed, device)
    x = randn(*shape, dtype=dtype, g=g, device=device, scale=3.0)
    out = torch.full((*shape[:-1], shape[-1] // 2), float("nan"), dtype=dtype, device=device)
    assert kact.silu_mul(x, out=out) is out
    assert_close(out, silu_oracle(x), ops.silu_mul_ref(x), dtype, "silu_mul")
    out = nan_like(x)
    assert kact.gelu_tanh(x, out=out) is out
    assert_close(out, gelu_oracle(x), ops.gelu_tanh_ref(x), dtype, "gelu_tanh")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 200), (4, 2 * 1100)])
def test_activations(shape, dtype):
    _act_case(shape, dtype)


def test_activations_extremes():
    x = torch.tensor([[-1e4, -90.0, -20.0, 0.0, 20.0, 90.0, 1e4, 1.0] * 2], device=DEV)
    assert_close(kact.silu_mul(x), silu_oracle(x), ops.silu_mul_ref(x), torch.float32, "silu extremes")
    assert_close(kact.gelu_tanh(x), gelu_oracle(x), ops.gelu_tanh_ref(x), torch.float32, "gelu extremes")


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 2 * 11008), (64, 2 * 11008), (64, 16384)])
def test_activations_gpu(shape, dtype):
    _act_case(shape, dtype)


# ============================================================================ projections (fused GEMV)
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
    t = ops.rms_norm_linear_ref(x, 1e-6, w, b) if norm else torch.nn.functional.linear(x, w, b)
    if glu:
        o = silu_oracle(o)
        t = ops.silu_mul_ref(t)
    if gelu:
        o = gelu_oracle(o)
        t = ops.gelu_tanh_ref(t)
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
    ref = ops.rms_norm_linear_ref(ops.linear_add_ref(a, wo, None, h), 1e-5, w2)
    assert_close(y, rms_oracle(h2, torch.ones(40), 1e-5) @ w2.double().T, ref, torch.float32, "parts -> norm")


def test_gemv_strided_rows_and_leading_dims():
    # the head takes x[:, -1] of [B, T, H] (row stride T*H); layers pass [B, 1, H]
    g = gen(3)
    x = randn(3, 4, 64, g=g)
    w = randn(40, 64, g=g, scale=0.125)
    st = x[:, -1].pow(2).sum(-1, keepdim=True)
    y = kgemv.fused_gemv(x[:, -1], w, norm_parts=st, eps=1e-6)
    assert_close(y, rms_oracle(x[:, -1], torch.ones(64), 1e-6) @ w.double().T,
                 ops.rms_norm_linear_ref(x[:, -1], 1e-6, w), torch.float32, "strided rows")
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


# ============================================================================ sampling
def _sampling_devices():
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=GPU)]


@pytest.mark.parametrize("device", _sampling_devices())
def test_sample_greedy(device):
    logits = randn(6, 1000, g=gen(5, device), device=device)
    am = logits.argmax(-1)
    assert torch.equal(ops.sample(logits, 1.0, 1, 1.0, gen(0, device)), am)
    assert torch.equal(ops.sample(logits, 0.0, 0, 1.0), am)
    assert torch.equal(ops.sample(logits, 0.7, 1, 0.5), am)


@pytest.mark.parametrize("device", _sampling_devices())
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 50, 1.0), (1.3, 0, 0.8), (0.9, 20, 0.9)])
def test_sample_seeded_matches_reference(device, temperature, top_k, top_p):
    logits = randn(8, 500, g=gen(6, device), device=device, scale=3.0).half()
    a = ops.sample(logits, temperature, top_k, top_p, gen(42, device))
    b = ops.sample(logits, temperature, top_k, top_p, gen(42, device))
    c = ops.sample(logits, temperature, top_k, top_p, gen(43, device))
    assert a.dtype == torch.int64 and a.shape == (8,) and a.device.type == device
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("device", _sampling_devices())
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 3, 1.0), (1.0, 0, 0.6), (2.0, 5, 0.7)])
def test_sample_never_picks_filtered(device, temperature, top_k, top_p):
    base = randn(1, 40, g=gen(7, device), device=device, scale=2.0)
    logits = base.expand(4000, 40).contiguous()
    allowed = torch.isfinite(ops.filter_logits_ref(base, temperature, top_k, top_p))[0]
    tok = ops.sample(logits, temperature, top_k, top_p, gen(8, device))
    assert allowed[tok].all()


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 5, 1.0), (1.5, 0, 0.85), (1.0, 6, 0.9), (1.0, 0, 0.3)])
def test_filtering_equals_transformers_warpers(temperature, top_k, top_p):
    from transformers import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)
    logits = randn(4, 300, g=gen(12), scale=3.0)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                  + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    ref = warpers(None, logits.clone())
    ours = ops.filter_logits_ref(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    torch.testing.assert_close(ours[torch.isfinite(ours)], ref[torch.isfinite(ref)])


@pytest.mark.parametrize("device", _sampling_devices())
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.5, 0, 0.85), (1.0, 6, 0.9)])
def test_sample_frequencies(device, temperature, top_k, top_p):
    V, N = 8, 40000
    base = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]], device=device)
    p = torch.softmax(ops.filter_logits_ref(base, temperature, top_k, top_p), -1)[0].double().cpu()
    tok = ops.sample(base.expand(N, V).contiguous(), temperature, top_k, top_p, gen(9, device))
    freq = torch.bincount(tok.cpu(), minlength=V).double() / N
    sigma = (p * (1 - p) / N).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-4).all(), (freq, p)


# ============================================================================ dispatch (ulskip.ops)
def test_ops_dispatch_matches():
    g = gen(11)
    x, r = randn(3, 64, g=g, dtype=torch.float16), randn(3, 64, g=g, dtype=torch.float16)
    w, b = (1 + 0.1 * randn(64, g=g)).half(), randn(64, g=g).half()
    y, h = ops.add_layer_norm(x, r, w, b, 1e-5)
    assert_close(y, ln_oracle(x + r, w, b, 1e-5), ops.layer_norm_ref(x + r, w, b, 1e-5), torch.float16)
    assert_close(ops.layer_norm(x, w, b, 1e-5), ln_oracle(x, w, b, 1e-5), ops.layer_norm_ref(x, w, b, 1e-5),
                 torch.float16)
    gu = randn(2, 3, 128, g=g, dtype=torch.float16)
    assert_close(ops.silu_mul(gu), silu_oracle(gu), ops.silu_mul_ref(gu), torch.float16)
    assert_close(ops.gelu_tanh(gu), gelu_oracle(gu), ops.gelu_tanh_ref(gu), torch.float16)
    # projections: the fused GEMV at decode sizes on a GPU, torch / other kernels beyond
    for rows in (3, 40):
        xs, zs = randn(rows, 64, g=g, dtype=torch.float16), randn(rows, 48, g=g, dtype=torch.float16)
        ws, bs = randn(48, 64, g=g, scale=0.125).half(), randn(48, g=g).half()
        wgu = randn(96, 64, g=g, scale=0.125).half()
        for stats in (None, xs.float().pow(2).sum(-1, keepdim=True)):
            assert_close(ops.rms_norm_linear(xs, stats, 1e-6, ws, bs),
                         rms_oracle(xs, torch.ones(64, device=DEV), 1e-6) @ ws.double().T + bs.double(),
                         ops.rms_norm_linear_ref(xs, 1e-6, ws, bs), torch.float16, f"norm+linear {rows}")
            assert_close(ops.rms_norm_linear(xs, stats, 1e-6, wgu, glu=True),
                         silu_oracle(rms_oracle(xs, torch.ones(64, device=DEV), 1e-6) @ wgu.double().T),
                         ops.rms_norm_linear_ref(xs, 1e-6, wgu, glu=True), torch.float16, f"norm+glu {rows}")
        y, st = ops.linear_add(xs, ws, bs, zs)
        assert_close(y, zs.double() + xs.double() @ ws.double().T + bs.double(), ops.linear_add_ref(xs, ws, bs, zs),
                     torch.float16, f"linear+add {rows}")
        if st is not None:
            torch.testing.assert_close(st.sum(-1), y.float().pow(2).sum(-1), rtol=1e-4, atol=1e-4)
        assert_close(ops.linear(xs, ws, bs), xs.double() @ ws.double().T + bs.double(),
                     torch.nn.functional.linear(xs, ws, bs), torch.float16, f"linear {rows}")
        assert_close(ops.linear_gelu(xs, ws, bs), gelu_oracle(xs.double() @ ws.double().T + bs.double()),
                     ops.linear_gelu_ref(xs, ws, bs), torch.float16, f"linear+gelu {rows}")
    B, T, Hq, Hkv, D, S = 2, 1, 4, 2, 64, 16
    q, k, v = randn(B, T, Hq, D, g=g), randn(B, T, Hkv, D, g=g), randn(B, T, Hkv, D, g=g)
    cos, sin = _rope_tables(B, T, D, torch.float32, g, DEV)
    kc, vc = torch.zeros(B, Hkv, S, D, device=DEV), torch.zeros(B, Hkv, S, D, device=DEV)
    pos = torch.tensor([[3], [7]], device=DEV)
    qr = ops.rotary_cache_write(q, k, v, cos, sin, kc, vc, pos)
    assert_close(qr, rotary_oracle(q, cos, sin), ops.rotary_ref(q, cos, sin), torch.float32)
    assert_close(kc[[0, 1], :, [3, 7]], rotary_oracle(k, cos, sin)[:, 0], ops.rotary_ref(k, cos, sin)[:, 0],
                 torch.float32)
    lens = torch.tensor([4, 8], device=DEV)
    o = ops.decode_attention(qr[:, 0], kc, vc, lens, 0.125)
    assert_close(o, attn_oracle(qr[:, 0], kc, vc, lens, 0.125),
                 ops.decode_attention_ref(qr[:, 0], kc, vc, lens, 0.125), torch.float32)


# ============================================================================ bad input
def _t(*shape, dtype=torch.float16):
    return torch.randn(*shape, device=DEV).to(dtype)


def test_bad_inputs_norm():
    x = _t(4, 64)
    with pytest.raises(ValueError, match=r"weight has shape \(32,\), expected \(64,\)"):
        knorm.rms_norm(x, _t(32), 1e-6)
    with pytest.raises(ValueError, match=r"x has dtype torch.int64"):
        knorm.rms_norm(torch.ones(4, 64, dtype=torch.long, device=DEV), _t(64), 1e-6)
    with pytest.raises(ValueError, match=r"residual has dtype torch.float32, expected torch.float16"):
        knorm.add_rms_norm(x, _t(4, 64, dtype=torch.float32), _t(64), 1e-6)
    with pytest.raises(ValueError, match=r"residual has shape \(4, 32\), expected \(4, 64\)"):
        knorm.add_layer_norm(x, _t(4, 32), _t(64), _t(64), 1e-5)
    with pytest.raises(ValueError, match=r"bias must be a torch.Tensor"):
        knorm.layer_norm(x, _t(64), None, 1e-5)
    with pytest.raises(ValueError, match=r"eps must be a non-negative float, got -1"):
        knorm.rms_norm(x, _t(64), -1)
    out = nan_like(x)
    with pytest.raises(ValueError, match=r"out has dtype torch.float32, expected torch.float16"):
        knorm.rms_norm(x, _t(64), 1e-6, out=torch.zeros(4, 64, device=DEV))
    assert torch.isnan(out).all()


def test_bad_inputs_rotary():
    B, T, Hq, Hkv, D, S = 2, 1, 4, 2, 64, 8
    q, k, v = _t(B, T, Hq, D), _t(B, T, Hkv, D), _t(B, T, Hkv, D)
    cos, sin = _t(B, T, D), _t(B, T, D)
    kc, vc = nan_like(_t(B, Hkv, S, D)), nan_like(_t(B, Hkv, S, D))
    pos = torch.zeros(B, T, dtype=torch.long, device=DEV)
    with pytest.raises(ValueError, match=r"k_cache has shape \(2, 3, 8, 64\), expected \(2, 2, S, 64\)"):
        krot.rotary_cache_write(q, k, v, cos, sin, _t(B, 3, S, D), vc, pos)
    with pytest.raises(ValueError, match=r"positions has dtype torch.float32"):
        krot.rotary_cache_write(q, k, v, cos, sin, kc, vc, pos.float())
    with pytest.raises(ValueError, match=r"positions has shape \(2, 3\), expected \(2, 1\)"):
        krot.rotary_cache_write(q, k, v, cos, sin, kc, vc, torch.zeros(B, 3, dtype=torch.long, device=DEV))
    with pytest.raises(ValueError, match=r"cos has shape \(2, 1, 32\), expected \(2, 1, 64\)"):
        krot.rotary_cache_write(q, k, v, _t(B, T, 32), sin, kc, vc, pos)
    with pytest.raises(ValueError, match=r"q has shape \(2, 1, 4, 32\), expected \(2, 1, Hq, 64\)"):
        krot.rotary_cache_write(_t(B, T, Hq, 32), k, v, cos, sin, kc, vc, pos)
    assert torch.isnan(kc).all() and torch.isnan(vc).all(), "nothing may be written on bad input"


def test_bad_inputs_attention():
    q, kc = _t(2, 8, 64), _t(2, 2, 32, 64)
    lens = torch.tensor([3, 5], device=DEV)
    with pytest.raises(ValueError, match=r"Hq=6 must be a multiple of KV heads Hkv=4"):
        kattn.decode_attention(_t(2, 6, 64), _t(2, 4, 32, 64), _t(2, 4, 32, 64), lens, 0.1)
    with pytest.raises(ValueError, match=r"head dim 72 is not supported"):
        kattn.decode_attention(_t(2, 8, 72), _t(2, 2, 32, 72), _t(2, 2, 32, 72), lens, 0.1)
    with pytest.raises(ValueError, match=r"v_cache has dtype torch.float32, expected q's dtype torch.float16"):
        kattn.decode_attention(q, kc, _t(2, 2, 32, 64, dtype=torch.float32), lens, 0.1)
    with pytest.raises(ValueError, match=r"seq_lens has dtype torch.float32"):
        kattn.decode_attention(q, kc, kc, lens.float(), 0.1)
    with pytest.raises(ValueError, match=r"seq_lens has shape \(3,\), expected \(2,\)"):
        kattn.decode_attention(q, kc, kc, torch.tensor([1, 2, 3], device=DEV), 0.1)
    with pytest.raises(ValueError, match=r"slopes has shape \(4,\), expected \(8,\)"):
        kattn.decode_attention(q, kc, kc, lens, 0.1, slopes=torch.ones(4, device=DEV))
    with pytest.raises(ValueError, match=r"k_cache has shape \(2, 2, 32, 128\), expected \(2, Hkv, S, 64\)"):
        kattn.decode_attention(q, _t(2, 2, 32, 128), _t(2, 2, 32, 128), lens, 0.1)


def test_bad_inputs_activation():
    with pytest.raises(ValueError, match=r"last dim must be even.*\(3, 7\)"):
        kact.silu_mul(_t(3, 7))
    with pytest.raises(ValueError, match=r"gate_up has dtype torch.int32"):
        kact.silu_mul(torch.ones(3, 8, dtype=torch.int32, device=DEV))


def test_bad_inputs_gemv():
    x, w = _t(2, 64), _t(32, 64)
    with pytest.raises(ValueError, match=r"x has 17 rows; fused_gemv takes at most 16"):
        kgemv.fused_gemv(_t(17, 64), w)
    with pytest.raises(ValueError, match=r"x has dtype torch.float32, expected the weight's dtype torch.float16"):
        kgemv.fused_gemv(_t(2, 64, dtype=torch.float32), w)
    with pytest.raises(ValueError, match=r"x has shape \(2, 48\), expected last dim 64"):
        kgemv.fused_gemv(_t(2, 48), w)
    with pytest.raises(ValueError, match=r"glu and gelu are exclusive"):
        kgemv.fused_gemv(x, w, glu=True, gelu=True)
    with pytest.raises(ValueError, match=r"glu needs a \[gate; up\] weight with an even number of rows, got 33"):
        kgemv.fused_gemv(x, _t(33, 64), glu=True)
    with pytest.raises(ValueError, match=r"bias has shape \(64,\), expected \(32,\)"):
        kgemv.fused_gemv(x, w, _t(64))
    with pytest.raises(ValueError, match=r"norm_parts has dtype torch.float16"):
        kgemv.fused_gemv(x, w, norm_parts=_t(2, 3))
    with pytest.raises(ValueError, match=r"norm_parts has shape \(3, 2\), expected \(2,\) \+ \(P,\)"):
        kgemv.fused_gemv(x, w, norm_parts=_t(3, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"eps must be a non-negative float, got -1"):
        kgemv.fused_gemv(x, w, norm_parts=_t(2, 1, dtype=torch.float32), eps=-1)
    with pytest.raises(ValueError, match=r"add is \(2, 64\) torch.float16, expected \(2, 32\)"):
        kgemv.fused_gemv(x, w, add=_t(2, 64))
    out = nan_like(_t(2, 32))
    with pytest.raises(ValueError, match=r"out has shape \(2, 32\), expected \(2, 16\)"):
        kgemv.fused_gemv(x, _t(16, 64), out=out)
    with pytest.raises(ValueError, match=r"weight must have a unit stride"):
        kgemv.fused_gemv(x, _t(64, 32).t(), out=out)
    assert torch.isnan(out).all(), "nothing may be written on bad input"


# ============================================================================ sm_90 compile check
# The interpreter runs kernels as Python, so it cannot catch what only the compiler sees (type or layout
# errors, scalar instead of vector loads, a K/V loop that is not cp.async-pipelined). Without a GPU, this
# test compiles the kernels for sm_90 (Triton bundles ptxas) in a subprocess free of TRITON_INTERPRET,
# with the argument divisibility a real launch would give, and checks the attention kernel's PTX.
def _compile_check() -> int:
    import inspect

    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        return 3
    target = GPUTarget("cuda", 90, 32)


    def comp(fn, ptrs, consts, warps=4, stages=2, nodiv=()):
        """ptrs: {arg: "*bf16", ...}; other runtime args are i32 (fp32 for scale/eps)."""
        names = list(inspect.signature(fn.fn).parameters)
        sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n in ("scale", "eps") else "i32")
               for n in names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
                 if sig[n] not in ("constexpr", "fp32") and n not in nodiv}
        try:
            src = ASTSource(fn, sig, consts, attrs)
        except TypeError:
            raise SystemExit(3)  # another Triton's internal API: skip
        return triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})

    def attn_ptrs(dt):
        return dict(Q=dt, K=dt, V=dt, OUT=dt, SEQ="*i32", SLOPES="*fp32", M_P="*fp32", L_P="*fp32", ACC_P="*fp32")

    for dt in ("*fp16", "*bf16"):
        for G, D, direct in ((1, 128, True), (4, 128, False), (8, 80, False), (1, 64, False)):
            k = comp(kattn._decode_attn_kernel, attn_ptrs(dt), dict(
                D=D, G=G, BLOCK_G=16, BLOCK_N=64, BLOCK_D=triton.next_power_of_2(D), HAS_ALIBI=G == 4,
                DIRECT=direct, SPLIT_P=True, FP32_DOT=False), stages=3)
            ptx = k.asm["ptx"]
            assert "cp.async" in ptx, f"attention {dt} G={G} D={D}: K/V loads not pipelined"
            assert "ld.global.b16" not in ptx, f"attention {dt} G={G} D={D}: scalar 16-bit loads"
    comp(kattn._decode_attn_kernel, attn_ptrs("*fp32"), dict(D=128, G=4, BLOCK_G=16, BLOCK_N=32, BLOCK_D=128,
         HAS_ALIBI=False, DIRECT=False, SPLIT_P=False, FP32_DOT=True))
    comp(kattn._decode_attn_reduce_kernel, dict(M_P="*fp32", L_P="*fp32", ACC_P="*fp32", OUT="*bf16"),
         dict(D=80, BLOCK_S=16, BLOCK_D=128), nodiv=("SPLITS",))
    norm_ptrs = {n: "*bf16" for n in ("X", "R", "W", "B", "Y", "H")}
    for res in (True, False):
        comp(knorm._layer_norm_kernel, norm_ptrs, dict(HAS_RES=res, BLOCK_N=4096), warps=8)
        for has_w in (True, False):
            comp(knorm._rms_norm_kernel, norm_ptrs, dict(HAS_RES=res, HAS_W=has_w, BLOCK_N=4096), warps=8)
    rot_ptrs = {n: "*bf16" for n in ("Q", "K", "V", "COS", "SIN", "KC", "VC", "QO")}
    rot_ptrs["POS"] = "*i64"
    for rot in (True, False):
        for D in (64, 80, 128):
            comp(krot._rotary_cache_kernel, rot_ptrs, dict(
                D=D, ROTARY=rot, BLOCK_H=8, BLOCK_HALF=triton.next_power_of_2(D // 2),
                BLOCK_D=triton.next_power_of_2(D), sq_d=1, sk_d=1, sv_d=1, sc_d=1, ss_d=1),
                nodiv=("sp_t", "T", "HQ", "HKV"))
    gemv_ptrs = {n: "*bf16" for n in ("X", "W", "BIAS", "ADD", "Y")}
    gemv_ptrs.update(PARTS_IN="*fp32", PARTS_OUT="*fp32")
    for norm_in, glu, gelu, bias, add, parts in ((True, False, False, False, False, False),
                                                 (False, False, False, False, True, True),
                                                 (True, True, False, False, False, False),
                                                 (False, False, True, True, False, False),
                                                 (False, False, False, True, True, False)):
        for N, K in ((12288, 4096), (11008, 4096), (4096, 11008)):
            bn, bk, warps, stages = kgemv._config(N, K, False, glu)
            k = comp(kgemv._gemv_kernel, gemv_ptrs, dict(
                NORM_IN=norm_in, GLU=glu, GELU=gelu, HAS_BIAS=bias, HAS_ADD=add, PARTS=parts, IEEE=False,
                BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, BLOCK_P=128), warps=warps, stages=stages,
                nodiv=("M", "P_IN"))
            assert "cp.async" in k.asm["ptx"], f"gemv N={N} glu={glu}: W loads not pipelined"
    comp(kgemv._gemv_kernel, {n: "*fp32" for n in gemv_ptrs}, dict(
        NORM_IN=True, GLU=True, GELU=False, HAS_BIAS=True, HAS_ADD=True, PARTS=True, IEEE=True, BLOCK_M=16,
        BLOCK_N=32, BLOCK_K=64, BLOCK_P=2), stages=2, nodiv=("M", "P_IN"))
    comp(kact._silu_mul_kernel, dict(X="*bf16", Y="*bf16"), dict(BLOCK=1024))
    comp(kact._gelu_tanh_kernel, dict(X="*bf16", Y="*bf16"), dict(BLOCK=1024))
    print("all kernels compile for sm_90")
    return 0


@pytest.mark.skipif(CUDA, reason="the GPU runs the kernels themselves")
def test_kernels_compile_for_sm90():
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["ULSKIP_COMPILE_CHECK"] = "1"
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                       timeout=600)
    if r.returncode == 3:
        pytest.skip("this Triton's compiler API differs from the one the check was written for")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]


if __name__ == "__main__" and COMPILE_CHECK:
    raise SystemExit(_compile_check())
