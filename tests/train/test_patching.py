"""`patch_model` against the unpatched transformers model (loss and every gradient), its ZeRO-3-safe SwiGLU,
and the one rule for when the training kernels run. CPU: Triton under TRITON_INTERPRET=1 (conftest.py).
"""
import copy
import os

import pytest
import torch

import ulskip.kernels.activation as kact
import ulskip.kernels.cross_entropy as kce
import ulskip.kernels.norm as knorm
from helpers import DEV, make_train_model, rel_err
from ulskip.kernels import backend
from ulskip.train import apply_uls, patch_model

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
    base = make_train_model(family, num_layers=4, vocab_size=64).to(DEV).train()
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
        assert rel_err(p.grad, q.grad) < 1e-4, name
        n += 1
    assert n > 10
    # without labels the patched model still gives the logits of the original
    with torch.no_grad():
        assert rel_err(pat(input_ids=ids, attention_mask=am).logits, ref(input_ids=ids, attention_mask=am).logits) < 1e-5


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
    base = make_train_model("llama", num_layers=2, vocab_size=64).to(DEV).eval()
    ref, pat = copy.deepcopy(base), copy.deepcopy(base)
    patch_model(pat, cross_entropy=False)
    fired = []
    for layer in pat.model.layers:
        _emulate_zero3(layer.mlp.gate_proj, fired)
        _emulate_zero3(layer.mlp.up_proj, fired)
    ids, am, _ = (t.to(DEV) for t in _batch(64))
    got = pat(input_ids=ids, attention_mask=am).logits
    assert len(fired) == 4  # each projection of each layer, once
    assert rel_err(got, ref(input_ids=ids, attention_mask=am).logits) < 1e-5


def test_one_triton_dispatch_rule(monkeypatch):
    """The patched modules and the fused loss follow the one rule kernels.backend.use_triton(t,
    interpreter=True): switched off, the patched modules run their original forwards and the loss its
    PyTorch path, and no Triton launcher is called."""
    x = torch.zeros(2, device=DEV)
    assert backend.use_triton(x, interpreter=True) == (
        backend.enabled() and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"))
    calls = []
    for mod, name in ((knorm, "rms_norm"), (knorm, "rms_norm_backward"), (kact, "silu_mul_split"),
                      (kact, "silu_mul_split_backward"), (kce, "ce_grad_rows_")):
        orig = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _o=orig, _n=name, **k: calls.append(_n) or _o(*a, **k))
    base = make_train_model("llama", num_layers=2, vocab_size=64).to(DEV).train()
    ids, am, labels = (t.to(DEV) for t in _batch(64))
    pat = patch_model(copy.deepcopy(base))
    if backend.use_triton(ids, interpreter=True):
        pat(input_ids=ids, attention_mask=am, labels=labels).loss.backward()
        assert {"rms_norm", "rms_norm_backward", "silu_mul_split", "silu_mul_split_backward",
                "ce_grad_rows_"} <= set(calls)
    calls.clear()
    monkeypatch.setattr(backend, "use_triton", lambda t, interpreter=False: False)
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
    base = make_train_model(family, num_layers=4, vocab_size=512).cuda().train()
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
            assert rel_err(p.grad, grads[name].grad) < 0.1, name
