"""Training kernels (backward of norms/activations, fused linear cross-entropy) against PyTorch autograd,
and `patch_model` against the unpatched transformers model (loss and every gradient). CPU: Triton runs
under TRITON_INTERPRET=1 (set by conftest.py), fp32/fp16 only (bf16 tl.dot is broken there)."""
import copy
import os


import pytest
import torch
import torch.nn.functional as F

from test_train_common import make_model
from ulskip import ops
from ulskip.train import _kernels, apply_uls, fused_linear_cross_entropy, patch_model
from ulskip.train import patching
from ulskip.train.fused_ce import ce_grad_rows_torch_

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _rel(a, b):
    assert not torch.isnan(a).any()
    return ((a.float() - b.float()).abs().max() / (b.float().abs().max() + 1e-12)).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 48), (7, 100)])
def test_rms_norm_backward(dtype, shape):
    nb = ops._kernel("norm_backward")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(DEV, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(DEV).requires_grad_()
    dy = torch.randn(shape, generator=g).to(DEV, torch.promote_types(dtype, w.dtype))
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ops.rms_norm_ref(xr, wr, 1e-6).backward(dy.double())
    dx, dw = nb.rms_norm_backward(dy, x.detach(), w.detach(), 1e-6)
    assert dx.dtype == dtype and dw.dtype == w.dtype
    assert _rel(dx, xr.grad) < TOL[dtype] and _rel(dw, wr.grad) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 48), (9, 100)])
def test_layer_norm_backward(dtype, shape):
    nb = ops._kernel("norm_backward")
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(DEV, dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(DEV)
    b = (0.1 * torch.randn(shape[-1], generator=g)).to(DEV)
    dy = torch.randn(shape, generator=g).to(DEV, dtype)
    xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
    F.layer_norm(xr, (shape[-1],), wr, br, 1e-5).backward(dy.double())
    dx, dw, db = nb.layer_norm_backward(dy, x, w, b, 1e-5)
    assert _rel(dx, xr.grad) < TOL[dtype] and _rel(dw, wr.grad) < TOL[dtype] and _rel(db, br.grad) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_backward(dtype):
    ab = ops._kernel("activation_backward")
    g = torch.Generator().manual_seed(2)
    gu = (torch.randn(4, 6, 2 * 40, generator=g) * 3).to(DEV, dtype)
    dy = torch.randn(4, 6, 40, generator=g).to(DEV, dtype)
    ref = gu.double().requires_grad_()
    ops.silu_mul_ref(ref).backward(dy.double())
    assert _rel(ab.silu_mul_backward(dy, gu), ref.grad) < TOL[dtype]
    x = (torch.randn(5, 300, generator=g) * 3).to(DEV, dtype)
    dy = torch.randn(5, 300, generator=g).to(DEV, dtype)
    xr = x.double().requires_grad_()
    ops.gelu_tanh_ref(xr).backward(dy.double())
    assert _rel(ab.gelu_tanh_backward(dy, x), xr.grad) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 6, 40), (3, 1500)])  # I > one 1024 block
def test_silu_mul_split(dtype, shape):
    """The two-input SwiGLU of the patched MLP (gate_proj(x), up_proj(x) kept apart): forward and
    backward against autograd, also on strided (non-contiguous) inputs."""
    ab = ops._kernel("activation_backward")
    g = torch.Generator().manual_seed(6)
    gate = (torch.randn(shape, generator=g) * 3).to(DEV, dtype)
    up = (torch.randn(shape, generator=g) * 3).to(DEV, dtype)
    dy = torch.randn(shape, generator=g).to(DEV, dtype)
    gr, ur = gate.double().requires_grad_(), up.double().requires_grad_()
    y = F.silu(gr) * ur
    y.backward(dy.double())
    out = ab.silu_mul_split(gate, up)
    assert out.dtype == dtype and out.shape == gate.shape and _rel(out, y) < TOL[dtype]
    dg, du = ab.silu_mul_split_backward(dy, gate, up)
    assert _rel(dg, gr.grad) < TOL[dtype] and _rel(du, ur.grad) < TOL[dtype]
    # strided views (e.g. the halves of one fused projection) give the same results
    both = torch.cat([gate, up], dim=-1)
    gv, uv = both[..., :shape[-1]], both[..., shape[-1]:]
    assert torch.equal(ab.silu_mul_split(gv, uv), out)
    assert all(torch.equal(a, b) for a, b in zip(ab.silu_mul_split_backward(dy, gv, uv), (dg, du)))
    with pytest.raises(ValueError, match="up has shape"):
        ab.silu_mul_split(gate, up[..., :-1])


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
    fn = ops._kernel("fused_linear_cross_entropy").ce_grad_rows_ if use_triton else ce_grad_rows_torch_
    loss = fn(buf, t, 1.0)
    assert loss[2] == 0 and abs(loss.sum().item() - ref.item()) < 1e-4
    assert _rel(buf, lr.grad) < 1e-5


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
        assert _rel(a, r) < 1e-5
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fused_linear_cross_entropy(h, W, torch.full((2, 19), 300, device=DEV))


def _batch(vocab, seed=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 11), generator=g)
    am = torch.ones_like(ids)
    am[1, 8:] = 0
    am[2, 6:] = 0
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, :2] = -100
    labels[2, :5] = -100
    labels[am == 0] = -100
    return ids, am, labels


@pytest.mark.parametrize("family,uls", [("llama", False), ("llama", True), ("bloom", True)])
def test_patch_model_matches_unpatched(family, uls):
    base = make_model(family, num_layers=4, vocab_size=64).to(DEV).train()
    ref, pat = copy.deepcopy(base), copy.deepcopy(base)
    if uls:
        apply_uls(ref, target_speedup=2, prefill="full")
        apply_uls(pat, target_speedup=2, prefill="full", fused_kernels=True)
    else:
        patch_model(pat)
    counts = pat._ulskip_patched
    if family == "llama":
        assert counts["rms_norm"] == 2 * 4 + 1 and counts["swiglu"] == 4
    else:
        assert counts["layer_norm"] == 2 * 4 + 2 and counts["gelu"] == 4
    ids, am, labels = (t.to(DEV) for t in _batch(64))
    lr = ref(input_ids=ids, attention_mask=am, labels=labels).loss
    out = pat(input_ids=ids, attention_mask=am, labels=labels)
    assert out.logits is None  # the fused loss never builds the logits
    assert abs(out.loss.item() - lr.item()) < 1e-5
    lr.backward()
    out.loss.backward()
    grads = dict(ref.named_parameters())
    n = 0
    for name, p in pat.named_parameters():
        q = grads[name]
        if q.grad is None:
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        assert _rel(p.grad, q.grad) < 1e-4, name
        n += 1
    assert n > 10
    # without labels the patched model still gives the logits of the original
    with torch.no_grad():
        assert _rel(pat(input_ids=ids, attention_mask=am).logits, ref(input_ids=ids, attention_mask=am).logits) < 1e-5


def _emulate_zero3(module, fired):
    """DeepSpeed ZeRO-3 in miniature: outside its own forward the module's weight holds no data (an
    empty tensor); a pre-forward hook gathers it, a forward hook releases it again."""
    full = module.weight.data
    module.weight.data = torch.empty(0, dtype=full.dtype, device=full.device)

    def gather(m, args):
        fired.append(m)
        m.weight.data = full

    def release(m, args, out):
        m.weight.data = torch.empty(0, dtype=full.dtype, device=full.device)

    module.register_forward_pre_hook(gather)
    module.register_forward_hook(release)


@torch.no_grad()
def test_patched_swiglu_calls_the_projections():
    """The fused SwiGLU calls gate_proj/up_proj as modules (their hooks run: ZeRO-3 gathering, adapters)
    and never reads their weights directly: with ZeRO-3-style partitioned projections the patched model
    still gives the unpatched model's logits."""
    base = make_model("llama", num_layers=2, vocab_size=64).to(DEV).eval()
    ref, pat = copy.deepcopy(base), copy.deepcopy(base)
    patch_model(pat, cross_entropy=False)
    fired = []
    for layer in pat.model.layers:
        _emulate_zero3(layer.mlp.gate_proj, fired)
        _emulate_zero3(layer.mlp.up_proj, fired)
    ids, am, _ = (t.to(DEV) for t in _batch(64))
    got = pat(input_ids=ids, attention_mask=am).logits
    assert len(fired) == 4  # each projection of each layer, once
    assert _rel(got, ref(input_ids=ids, attention_mask=am).logits) < 1e-5


def test_one_triton_dispatch_rule(monkeypatch):
    """patching and fused_ce follow the one rule ulskip.train._kernels.use_triton: switched off, the
    patched modules run their original forwards and the loss its PyTorch path."""
    x = torch.zeros(2, device=DEV)
    assert _kernels.use_triton(x) == (ops._triton_ok() and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"))
    calls = []
    orig_kernel = patching._kernel
    monkeypatch.setattr(patching, "_kernel", lambda name: calls.append(name) or orig_kernel(name))
    monkeypatch.setattr("ulskip.train.fused_ce._kernel", lambda name: calls.append(name) or orig_kernel(name))
    base = make_model("llama", num_layers=2, vocab_size=64).to(DEV).train()
    ids, am, labels = (t.to(DEV) for t in _batch(64))
    pat = patch_model(copy.deepcopy(base))
    if _kernels.use_triton(ids):
        pat(input_ids=ids, attention_mask=am, labels=labels).loss.backward()
        assert {"norm", "activation_backward", "fused_linear_cross_entropy"} <= set(calls)
    calls.clear()
    monkeypatch.setattr(_kernels, "use_triton", lambda t: False)
    loss = pat(input_ids=ids, attention_mask=am, labels=labels).loss
    loss.backward()
    assert calls == []
    assert abs(loss.item() - base(input_ids=ids, attention_mask=am, labels=labels).loss.item()) < 1e-5


def test_patch_model_rejects_unsupported():
    from transformers import GPT2Config, GPT2LMHeadModel
    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*bloom, llama, mistral, qwen2"):
        patch_model(m)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_patch_model_bf16_autocast_gpu(family):
    """On the GPU under bf16 autocast (what `ulskip train --bf16` runs): the patched model's loss and
    gradients stay within bf16 noise of the unpatched model's."""
    base = make_model(family, num_layers=4, vocab_size=512).cuda().train()
    ref, pat = copy.deepcopy(base), copy.deepcopy(base)
    apply_uls(ref, target_speedup=2)
    apply_uls(pat, target_speedup=2, fused_kernels=True)
    ids, am, labels = (t.cuda() for t in _batch(512))
    losses = []
    for m in (ref, pat):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(input_ids=ids, attention_mask=am, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 2e-2 * abs(losses[0])
    grads = dict(ref.named_parameters())
    for name, p in pat.named_parameters():
        if grads[name].grad is not None:
            assert _rel(p.grad, grads[name].grad) < 0.1, name
