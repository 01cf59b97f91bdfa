"""RMSNorm / LayerNorm kernels (plain, fused with the residual add, backward) against the PyTorch
reference and an fp64 oracle; the tolerance rule is in helpers.assert_close.
"""
import pytest
import torch
import torch.nn.functional as F

import ulskip.kernels.norm as knorm
from helpers import (DEV, DTYPES, TRAIN_TOL, assert_close, bad_tensor, gen, gpu, ln_oracle, nan_like, randn, rel_err,
                     rms_oracle)

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
        oracle, t_out = rms_oracle(h_ref, w, eps), knorm.rms_norm_ref(h_ref, w, eps)
    else:
        oracle, t_out = ln_oracle(h_ref, w, b, eps), knorm.layer_norm_ref(h_ref, w, b, eps)
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
    assert_close(y, rms_oracle(x, torch.ones(200, device=DEV), 1e-6), knorm.rms_norm_ref(x, None, 1e-6), dtype, "rms, no weight")


def test_rms_norm_promotes_like_hf():
    # fp32 weight on fp16 activations: HF's `weight * x.to(fp16)` gives fp32
    x = randn(4, 64, dtype=torch.float16, g=gen(1))
    w = 1 + 0.1 * randn(64, g=gen(2))
    y = knorm.rms_norm(x, w, 1e-6)
    assert y.dtype == torch.float32
    assert_close(y, rms_oracle(x, w, 1e-6), knorm.rms_norm_ref(x, w, 1e-6), torch.float16, "promote")


def test_add_rms_norm_in_place_residual():
    g = gen(3)
    x, r = randn(5, 128, dtype=torch.float16, g=g), randn(5, 128, dtype=torch.float16, g=g)
    w = (1 + 0.1 * randn(128, g=g)).to(torch.float16)
    expect_h = x + r
    y, h = knorm.add_rms_norm(x, r, w, 1e-6, residual_out=r)
    assert h is r and torch.equal(r, expect_h)
    assert_close(y, rms_oracle(expect_h, w, 1e-6), knorm.rms_norm_ref(expect_h, w, 1e-6), torch.float16)


def test_bad_inputs_norm():
    x = bad_tensor(4, 64)
    with pytest.raises(ValueError, match=r"weight has shape \(32,\), expected \(64,\)"):
        knorm.rms_norm(x, bad_tensor(32), 1e-6)
    with pytest.raises(ValueError, match=r"x has dtype torch.int64"):
        knorm.rms_norm(torch.ones(4, 64, dtype=torch.long, device=DEV), bad_tensor(64), 1e-6)
    with pytest.raises(ValueError, match=r"residual has dtype torch.float32, expected torch.float16"):
        knorm.add_rms_norm(x, bad_tensor(4, 64, dtype=torch.float32), bad_tensor(64), 1e-6)
    with pytest.raises(ValueError, match=r"residual has shape \(4, 32\), expected \(4, 64\)"):
        knorm.add_layer_norm(x, bad_tensor(4, 32), bad_tensor(64), bad_tensor(64), 1e-5)
    with pytest.raises(ValueError, match=r"bias must be a torch.Tensor"):
        knorm.layer_norm(x, bad_tensor(64), None, 1e-5)
    with pytest.raises(ValueError, match=r"eps must be a non-negative float, got -1"):
        knorm.rms_norm(x, bad_tensor(64), -1)
    out = nan_like(x)
    with pytest.raises(ValueError, match=r"out has dtype torch.float32, expected torch.float16"):
        knorm.rms_norm(x, bad_tensor(64), 1e-6, out=torch.zeros(4, 64, device=DEV))
    assert torch.isnan(out).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 48), (7, 100)])
def test_rms_norm_backward(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(DEV, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(DEV).requires_grad_()
    dy = torch.randn(shape, generator=g).to(DEV, torch.promote_types(dtype, w.dtype))
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    knorm.rms_norm_ref(xr, wr, 1e-6).backward(dy.double())
    dx, dw = knorm.rms_norm_backward(dy, x.detach(), w.detach(), 1e-6)
    assert dx.dtype == dtype and dw.dtype == w.dtype
    assert rel_err(dx, xr.grad) < TRAIN_TOL[dtype] and rel_err(dw, wr.grad) < TRAIN_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 48), (9, 100)])
def test_layer_norm_backward(dtype, shape):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(DEV, dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(DEV)
    b = (0.1 * torch.randn(shape[-1], generator=g)).to(DEV)
    dy = torch.randn(shape, generator=g).to(DEV, dtype)
    xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
    F.layer_norm(xr, (shape[-1],), wr, br, 1e-5).backward(dy.double())
    dx, dw, db = knorm.layer_norm_backward(dy, x, w, b, 1e-5)
    assert rel_err(dx, xr.grad) < TRAIN_TOL[dtype] and rel_err(dw, wr.grad) < TRAIN_TOL[dtype] and rel_err(db, br.grad) < TRAIN_TOL[dtype]
