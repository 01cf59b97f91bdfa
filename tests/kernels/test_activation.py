"""SwiGLU / GeLU kernels, forward and backward, fused and split gate/up, against the PyTorch reference,
autograd and an fp64 oracle.
"""
import pytest
import torch
import torch.nn.functional as F

import ulskip.kernels.activation as kact
from helpers import (DEV, DTYPES, TRAIN_TOL, assert_close, bad_tensor, gelu_oracle, gen, gpu,
                     nan_like, randn, rel_err, silu_oracle)

def _act_case(shape, dtype, device=DEV, seed=0):
    g = gen(seed, device)
    x = randn(*shape, dtype=dtype, g=g, device=device, scale=3.0)
    out = torch.full((*shape[:-1], shape[-1] // 2), float("nan"), dtype=dtype, device=device)
    assert kact.silu_mul(x, out=out) is out
    assert_close(out, silu_oracle(x), kact.silu_mul_ref(x), dtype, "silu_mul")
    out = nan_like(x)
    assert kact.gelu_tanh(x, out=out) is out
    assert_close(out, gelu_oracle(x), kact.gelu_tanh_ref(x), dtype, "gelu_tanh")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 200), (4, 2 * 1100)])
def test_activations(shape, dtype):
    _act_case(shape, dtype)


def test_activations_extremes():
    x = torch.tensor([[-1e4, -90.0, -20.0, 0.0, 20.0, 90.0, 1e4, 1.0] * 2], device=DEV)
    assert_close(kact.silu_mul(x), silu_oracle(x), kact.silu_mul_ref(x), torch.float32, "silu extremes")
    assert_close(kact.gelu_tanh(x), gelu_oracle(x), kact.gelu_tanh_ref(x), torch.float32, "gelu extremes")


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 2 * 11008), (64, 2 * 11008), (64, 16384)])
def test_activations_gpu(shape, dtype):
    _act_case(shape, dtype)


def test_bad_inputs_activation():
    with pytest.raises(ValueError, match=r"last dim must be even.*\(3, 7\)"):
        kact.silu_mul(bad_tensor(3, 7))
    with pytest.raises(ValueError, match=r"gate_up has dtype torch.int32"):
        kact.silu_mul(torch.ones(3, 8, dtype=torch.int32, device=DEV))


@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_backward(dtype):
    g = torch.Generator().manual_seed(2)
    gu = (torch.randn(4, 6, 2 * 40, generator=g) * 3).to(DEV, dtype)
    dy = torch.randn(4, 6, 40, generator=g).to(DEV, dtype)
    ref = gu.double().requires_grad_()
    kact.silu_mul_ref(ref).backward(dy.double())
    assert rel_err(kact.silu_mul_backward(dy, gu), ref.grad) < TRAIN_TOL[dtype]
    x = (torch.randn(5, 300, generator=g) * 3).to(DEV, dtype)
    dy = torch.randn(5, 300, generator=g).to(DEV, dtype)
    xr = x.double().requires_grad_()
    kact.gelu_tanh_ref(xr).backward(dy.double())
    assert rel_err(kact.gelu_tanh_backward(dy, x), xr.grad) < TRAIN_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 6, 40), (3, 1500)])  # I > one 1024 block
def test_silu_mul_split(dtype, shape):
    """The two-input SwiGLU of the patched MLP (gate_proj(x), up_proj(x) kept apart): forward and
    backward against autograd, also on strided (non-contiguous) inputs."""
    g = torch.Generator().manual_seed(6)
    gate = (torch.randn(shape, generator=g) * 3).to(DEV, dtype)
    up = (torch.randn(shape, generator=g) * 3).to(DEV, dtype)
    dy = torch.randn(shape, generator=g).to(DEV, dtype)
    gr, ur = gate.double().requires_grad_(), up.double().requires_grad_()
    y = F.silu(gr) * ur
    y.backward(dy.double())
    out = kact.silu_mul_split(gate, up)
    assert out.dtype == dtype and out.shape == gate.shape and rel_err(out, y) < TRAIN_TOL[dtype]
    dg, du = kact.silu_mul_split_backward(dy, gate, up)
    assert rel_err(dg, gr.grad) < TRAIN_TOL[dtype] and rel_err(du, ur.grad) < TRAIN_TOL[dtype]
    # strided views (e.g. the halves of one fused projection) give the same results
    both = torch.cat([gate, up], dim=-1)
    gv, uv = both[..., :shape[-1]], both[..., shape[-1]:]
    assert torch.equal(kact.silu_mul_split(gv, uv), out)
    assert all(torch.equal(a, b) for a, b in zip(kact.silu_mul_split_backward(dy, gv, uv), (dg, du)))
    with pytest.raises(ValueError, match="up has shape"):
        kact.silu_mul_split(gate, up[..., :-1])
