"""Padding-free packing: several records per row with per-record positions and the exact ULS semantics per
record give the same loss and the same gradients as the records padded one per row."""
import copy

import pytest
import torch

from helpers import make_tokenizer, make_train_model, records
from ulskip.train import apply_uls
from ulskip.train.data import PackedULSDataset, PackingCollator, ULSCollator, encode


def _examples(tok, n=7):
    return [encode(tok, r, 256, f"r{i}") for i, r in enumerate(records()[:n])]


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("kw", [dict(target_speedup=1), dict(target_speedup=2, prefill="full"),
                                dict(target_speedup=2, prefill="skip"), dict(target_speedup=2, strategy="skipdecode",
                                                                             skipdecode_horizon=3),
                                dict(target_speedup=3, strategy="early-exit")],
                         ids=["all-layers", "uls-full", "uls-skip", "skipdecode", "early-exit"])
def test_packed_equals_unpacked(family, kw):
    tok = make_tokenizer()
    exs = _examples(tok)
    base = make_train_model("llama", num_layers=6, vocab_size=len(tok), seed=5)
    if family == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM
        torch.manual_seed(5)
        base = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                                            pad_token_id=0, bos_token_id=1, eos_token_id=2))
    base = base.float().train()
    with torch.no_grad():  # dropout-free, but make the layers matter
        for name, p in base.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    apply_uls(a, **kw)
    apply_uls(b, **kw)
    padded = ULSCollator(tok.pad_token_id)(exs)
    packed_ds = PackedULSDataset(exs, block_size=60)
    assert len(packed_ds) < len(exs) and sum(len(r) for r in packed_ds.rows) == len(exs)
    packed = PackingCollator(tok.pad_token_id)(packed_ds.rows)
    la, ga = _loss_and_grads(a, padded)
    lb, gb = _loss_and_grads(b, packed)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6, msg=n)


def test_packing_layout():
    tok = make_tokenizer()
    exs = _examples(tok, 3)
    rows = PackedULSDataset(exs, block_size=10 ** 6).rows
    assert len(rows) == 1
    out = PackingCollator(tok.pad_token_id, pad_to_multiple_of=8)(rows)
    n = [len(e["input_ids"]) for e in exs]
    T = out["input_ids"].shape[1]
    assert T % 8 == 0 and T >= sum(n)
    starts = [0, n[0], n[0] + n[1]]
    for e, s in zip(exs, starts):
        p = e["prefix_length"]
        assert out["position_ids"][0, s:s + len(e["input_ids"])].tolist() == list(range(len(e["input_ids"])))
        assert out["labels"][0, s:s + p].eq(-100).all() and out["response_index"][0, s:s + p].eq(-1).all()
        assert out["response_index"][0, s + p:s + len(e["input_ids"])].tolist() == list(range(len(e["input_ids"]) - p))
    assert "attention_mask" not in out


def test_packing_refuses_what_it_cannot_do():
    tok = make_tokenizer()
    exs = _examples(tok, 3)
    rows = PackedULSDataset(exs, block_size=100).rows
    batch = PackingCollator(tok.pad_token_id)(rows)
    bloom = make_train_model("bloom", num_layers=2, vocab_size=len(tok))
    apply_uls(bloom, target_speedup=1)
    with pytest.raises(ValueError, match="Bloom cannot pack"):
        bloom(**batch)
    llama = make_train_model("llama", num_layers=2, vocab_size=len(tok))
    apply_uls(llama, target_speedup=1)
    with pytest.raises(ValueError, match="no attention_mask"):
        llama(**batch, attention_mask=torch.ones_like(batch["input_ids"]))
