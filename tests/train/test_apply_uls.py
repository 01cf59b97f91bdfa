"""apply_uls: the training forward equals a reference built from plain transformers (docs/design.md):
prefix through the full model with a cache, the kept layers' cache entries kept, the response through a
copy of the model holding only the kept layers (prefill="full"); or everything through that copy
(prefill="skip"). Batches mix prefix and response lengths with padding."""
import copy

import pytest
import torch
from transformers import DynamicCache

from helpers import make_train_model as make_model
from helpers import cache_kwarg, output_cache, reduced_copy
from ulskip import uls_schedule
from ulskip.train import apply_uls, decoder_layers

LENS = [(5, 4), (2, 8), (9, 1), (3, 3)]  # (prefix, response) per row


@torch.no_grad()
def reference_logits(model, seq, P, kept, prefill):
    """Teacher-forced logits of the whole sequence (helpers.reference_decode decodes greedily, so it
    does not fit here): the prefix through the full model, the response through the reduced copy."""
    small = reduced_copy(model, kept)
    ids = torch.tensor([seq])
    if prefill == "skip":
        return small(ids).logits[0].float()
    out = model(ids[:, :P], use_cache=True)
    cache = DynamicCache()
    for j, i in enumerate(kept):
        layer = output_cache(out).layers[i]
        cache.update(layer.keys, layer.values, j)
    o = small(ids[:, P:], use_cache=True, position_ids=torch.arange(P, len(seq))[None],
              attention_mask=torch.ones(1, len(seq), dtype=torch.long), **{cache_kwarg(small): cache})
    return torch.cat([out.logits[0], o.logits[0]]).float()


def _batch(vocab, lens=LENS, seed=1):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, vocab, (p + r,), generator=g).tolist() for p, r in lens]
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    am = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (s, (p, r)) in enumerate(zip(seqs, lens)):
        ids[b, :len(s)] = torch.tensor(s)
        am[b, :len(s)] = 1
        labels[b, p:len(s)] = ids[b, p:len(s)]
    return seqs, ids, am, labels, torch.tensor([p for p, _ in lens])


@pytest.mark.parametrize("family", ["llama", "bloom"])
@pytest.mark.parametrize("prefill", ["full", "skip"])
def test_forward_matches_reference(family, prefill):
    model = make_model(family, num_layers=6, vocab_size=64, seed=3).eval()
    with torch.no_grad():  # wider weights: layers matter clearly
        for name, p in model.named_parameters():
            if "norm" not in name and "ln" not in name:
                p.normal_(0, 0.08)
    kept = uls_schedule(6, 2)
    seqs, ids, am, labels, pl = _batch(64)
    refs = [reference_logits(model, s, p, kept, prefill) for s, (p, _) in zip(seqs, LENS)]
    uls = apply_uls(copy.deepcopy(model), target_speedup=2, prefill=prefill)
    assert uls.config.ulskip == {"kept_layers": kept, "num_layers": 6, "target_speedup": 2.0,
                                 "strategy": "paper", "prefill": prefill}
    with torch.no_grad():
        by_len = uls(input_ids=ids, attention_mask=am, prefix_lengths=pl).logits
        by_labels = uls(input_ids=ids, attention_mask=am, labels=labels)
        plain = model(input_ids=ids, attention_mask=am).logits
    for b, s in enumerate(seqs):
        n = len(s)
        assert torch.allclose(by_len[b, :n], refs[b], atol=1e-4), b
        assert torch.allclose(by_labels.logits[b, :n], refs[b], atol=1e-4), b
    # the schedule matters: the plain model differs on response positions
    assert (plain[1, 2:10] - by_len[1, 2:10]).abs().max() > 1e-2
    # the loss is the response-only CE of those logits
    lg = by_labels.logits[:, :-1].reshape(-1, 64)
    ref_loss = torch.nn.functional.cross_entropy(lg, labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(by_labels.loss.item() - ref_loss.item()) < 1e-5


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_gradient_checkpointing_same_grads(family):
    model = make_model(family, num_layers=4, vocab_size=64, seed=4).train()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    for m in (a, b):
        apply_uls(m, target_speedup=2)
        m.get_input_embeddings().weight.requires_grad_(False)
    b.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, ids, am, labels, pl = _batch(64, seed=2)
    for m in (a, b):
        m(input_ids=ids, attention_mask=am, labels=labels).loss.backward()
    gb = dict(b.named_parameters())
    for name, p in a.named_parameters():
        if p.grad is None:
            assert gb[name].grad is None, name
        else:
            assert torch.allclose(p.grad, gb[name].grad, atol=1e-6, rtol=1e-4), name
    # skipped layers learn from the prefix only (prefill="full"): they do get gradients
    skipped = [i for i in range(4) if i not in a.config.ulskip["kept_layers"]]
    assert all(p.grad is not None for p in decoder_layers(a)[skipped[0]].parameters())


def test_skip_mode_freezes_unused_layers_and_errors():
    model = apply_uls(make_model("llama", num_layers=6, vocab_size=64), target_speedup=2, prefill="skip")
    kept = model.config.ulskip["kept_layers"]
    assert kept == [0, 3, 5]
    for i, layer in enumerate(decoder_layers(model)):
        assert all(p.requires_grad == (i in kept) for p in layer.parameters())
    m = make_model("llama", num_layers=6, vocab_size=64)
    with pytest.raises(ValueError, match="prefill"):
        apply_uls(m, target_speedup=2, prefill="half")
    with pytest.raises(ValueError, match="target_speedup"):
        apply_uls(m, target_speedup=4)
    with pytest.raises(ValueError, match="first"):
        apply_uls(m, schedule=[1, 5])
    apply_uls(m, schedule=[0, 2, 5])
    assert m.config.ulskip["strategy"] == "custom" and m.config.ulskip["target_speedup"] == 2.0
    with pytest.raises(ValueError, match="KV cache"):
        m(input_ids=torch.tensor([[3, 4]]), past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="one length per row"):
        m(input_ids=torch.tensor([[3, 4]]), prefix_lengths=torch.tensor([1, 1]))
