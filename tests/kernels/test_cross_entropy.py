"""The chunked fused linear + cross-entropy (Triton row kernel and its PyTorch twin) against autograd.
"""
import pytest
import torch
import torch.nn.functional as F

import ulskip.kernels.cross_entropy as kce
from helpers import DEV, rel_err
from ulskip.kernels.cross_entropy import fused_linear_cross_entropy

@pytest.mark.parametrize("use_triton", [False, True])
def test_ce_rows(use_triton):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(6, 1500, generator=g) * 4).to(DEV)  # V > one 1024 block
    t = torch.randint(0, 1500, (6,), generator=g).to(DEV)
    t[2] = -100
    lr = logits.clone().requires_grad_()
    ref = F.cross_entropy(lr, t, ignore_index=-100, reduction="sum")
    ref.backward()
    buf = logits.clone()
    fn = kce.ce_grad_rows_ if use_triton else kce.ce_grad_rows_ref_
    loss = fn(buf, t, 1.0)
    assert loss[2] == 0 and abs(loss.sum().item() - ref.item()) < 1e-4
    assert rel_err(buf, lr.grad) < 1e-5


@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("bias,frozen,num_items", [(False, False, None), (True, True, 23)])
def test_fused_linear_cross_entropy(use_triton, bias, frozen, num_items):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 19, 32, generator=g).to(DEV).requires_grad_()
    W = (0.3 * torch.randn(300, 32, generator=g)).to(DEV).requires_grad_(not frozen)
    b = (0.1 * torch.randn(300, generator=g)).to(DEV).requires_grad_() if bias else None
    t = torch.randint(0, 300, (2, 19), generator=g).to(DEV)
    t[0, :7] = -100
    t[1, -3:] = -100
    logits = F.linear(h, W, b).reshape(-1, 300)
    red = "sum" if num_items else "mean"
    ref = F.cross_entropy(logits, t.reshape(-1), ignore_index=-100, reduction=red)
    if num_items:
        ref = ref / num_items
    params = [p for p in (h, W, b) if p is not None and p.requires_grad]
    gref = torch.autograd.grad(ref * 3, params)
    loss = fused_linear_cross_entropy(h, W, t, bias=b, num_items_in_batch=num_items, chunk_rows=8,
                                      use_triton=use_triton)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 1e-5
    got = torch.autograd.grad(loss * 3, params)
    for a, r in zip(got, gref):
        assert rel_err(a, r) < 1e-5
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fused_linear_cross_entropy(h, W, torch.full((2, 19), 300, device=DEV))
