"""The dispatch table ulskip.ops: each entry equals its op's reference (on the CPU the reference runs; on a
GPU the Triton kernel, at decode sizes the fused GEMV).
"""
import torch

import ulskip.kernels.activation as kact
import ulskip.kernels.decode_attention as kattn
import ulskip.kernels.gemv as kgemv
import ulskip.kernels.norm as knorm
import ulskip.kernels.rotary as krot
from helpers import (DEV, assert_close, attn_oracle, gelu_oracle, gen, ln_oracle, randn, rms_oracle, rope_tables,
                     rotary_oracle, silu_oracle)
from ulskip import ops

def test_ops_dispatch_matches():
    g = gen(11)
    x, r = randn(3, 64, g=g, dtype=torch.float16), randn(3, 64, g=g, dtype=torch.float16)
    w, b = (1 + 0.1 * randn(64, g=g)).half(), randn(64, g=g).half()
    y, h = ops.add_layer_norm(x, r, w, b, 1e-5)
    assert_close(y, ln_oracle(x + r, w, b, 1e-5), knorm.layer_norm_ref(x + r, w, b, 1e-5), torch.float16)
    assert_close(ops.layer_norm(x, w, b, 1e-5), ln_oracle(x, w, b, 1e-5), knorm.layer_norm_ref(x, w, b, 1e-5),
                 torch.float16)
    gu = randn(2, 3, 128, g=g, dtype=torch.float16)
    assert_close(ops.silu_mul(gu), silu_oracle(gu), kact.silu_mul_ref(gu), torch.float16)
    assert_close(ops.gelu_tanh(gu), gelu_oracle(gu), kact.gelu_tanh_ref(gu), torch.float16)
    # projections: the fused GEMV at decode sizes on a GPU, torch / other kernels beyond
    for rows in (3, 40):
        xs, zs = randn(rows, 64, g=g, dtype=torch.float16), randn(rows, 48, g=g, dtype=torch.float16)
        ws, bs = randn(48, 64, g=g, scale=0.125).half(), randn(48, g=g).half()
        wgu = randn(96, 64, g=g, scale=0.125).half()
        for stats in (None, xs.float().pow(2).sum(-1, keepdim=True)):
            assert_close(ops.rms_norm_linear(xs, stats, 1e-6, ws, bs),
                         rms_oracle(xs, torch.ones(64, device=DEV), 1e-6) @ ws.double().T + bs.double(),
                         kgemv.rms_norm_linear_ref(xs, 1e-6, ws, bs), torch.float16, f"norm+linear {rows}")
            assert_close(ops.rms_norm_linear(xs, stats, 1e-6, wgu, glu=True),
                         silu_oracle(rms_oracle(xs, torch.ones(64, device=DEV), 1e-6) @ wgu.double().T),
                         kgemv.rms_norm_linear_ref(xs, 1e-6, wgu, glu=True), torch.float16, f"norm+glu {rows}")
        y, st = ops.linear_add(xs, ws, bs, zs)
        assert_close(y, zs.double() + xs.double() @ ws.double().T + bs.double(), kgemv.linear_add_ref(xs, ws, bs, zs),
                     torch.float16, f"linear+add {rows}")
        if st is not None:
            torch.testing.assert_close(st.sum(-1), y.float().pow(2).sum(-1), rtol=1e-4, atol=1e-4)
        assert_close(ops.linear(xs, ws, bs), xs.double() @ ws.double().T + bs.double(),
                     torch.nn.functional.linear(xs, ws, bs), torch.float16, f"linear {rows}")
        assert_close(ops.linear_gelu(xs, ws, bs), gelu_oracle(xs.double() @ ws.double().T + bs.double()),
                     kgemv.linear_gelu_ref(xs, ws, bs), torch.float16, f"linear+gelu {rows}")
    B, T, Hq, Hkv, D, S = 2, 1, 4, 2, 64, 16
    q, k, v = randn(B, T, Hq, D, g=g), randn(B, T, Hkv, D, g=g), randn(B, T, Hkv, D, g=g)
    cos, sin = rope_tables(B, T, D, torch.float32, g, DEV)
    kc, vc = torch.zeros(B, Hkv, S, D, device=DEV), torch.zeros(B, Hkv, S, D, device=DEV)
    pos = torch.tensor([[3], [7]], device=DEV)
    qr = ops.rotary_cache_write(q, k, v, cos, sin, kc, vc, pos)
    assert_close(qr, rotary_oracle(q, cos, sin), krot.rotary_ref(q, cos, sin), torch.float32)
    assert_close(kc[[0, 1], :, [3, 7]], rotary_oracle(k, cos, sin)[:, 0], krot.rotary_ref(k, cos, sin)[:, 0],
                 torch.float32)
    lens = torch.tensor([4, 8], device=DEV)
    o = ops.decode_attention(qr[:, 0], kc, vc, lens, 0.125)
    assert_close(o, attn_oracle(qr[:, 0], kc, vc, lens, 0.125),
                 kattn.decode_attention_ref(qr[:, 0], kc, vc, lens, 0.125), torch.float32)


def test_fp32_projections_go_to_cublas(monkeypatch):
    """At decode sizes the fused GEMV takes fp16/bf16 rows only; fp32 ones go to torch (cuBLAS on a GPU),
    whatever the backend rule says (here forced on, so that the CPU can check the choice)."""
    monkeypatch.setattr(ops, "use_triton", lambda t, interpreter=False: True)
    for dtype, fused in ((torch.float16, True), (torch.bfloat16, True), (torch.float32, False)):
        assert ops._gemv_ok(torch.empty(3, 64, dtype=dtype)) is fused, dtype
    assert not ops._gemv_ok(torch.empty(40, 64, dtype=torch.bfloat16))  # past MAX_ROWS rows: cuBLAS
