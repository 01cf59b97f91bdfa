"""Padding-free packing: several records per row with per-record positions and the exact ULS semantics per
record give the same loss and the same gradients as the records padded one per row."""
import copy

import pytest
import torch

from helpers import make_tokenizer, make_train_model, records
from ulskip.train import apply_uls
from ulskip.train.apply_uls import SpeedupDraw, speedup_draw
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


def _segments(ri_row):
    """(start, length) of each record's response in one packed row: the runs of response_index >= 0 (a
    record's prefix, at least one token, separates it from the one before)."""
    out, vals = [], ri_row.tolist() + [-1]
    for t, v in enumerate(vals[:-1]):
        if v >= 0 and (t == 0 or vals[t - 1] < 0):
            e = t
            while vals[e] >= 0:
                e += 1
            out.append((t, e - t))
    return out


def test_random_draft_boundary_packed():
    """draft_boundary="random" on packed rows: each record's response index is shifted down by its own k in
    [0, r - 2] (prefix and padding untouched); a training forward equals the plain model's forward on the
    shifted index, and that equals the unpacked records with their prefix lengths moved by the same k."""
    tok = make_tokenizer()
    exs = [encode(tok, {"prefix": r["prefix"], "text": r["text"] + " " + r["text"]}, 256, f"r{i}")
           for i, r in enumerate(records()[:7])]  # longer responses: room to move
    base = make_train_model("llama", num_layers=6, vocab_size=len(tok), seed=5).float().train()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08)
    moved = apply_uls(copy.deepcopy(base), target_speedup=2, draft_boundary="random", draw_seed=4)
    plain = apply_uls(copy.deepcopy(base), target_speedup=2)
    rows = PackedULSDataset(exs, block_size=60).rows
    packed = PackingCollator(tok.pad_token_id)(rows)
    ri = packed["response_index"]
    draw, n_moved = speedup_draw(moved), 0
    for step in range(3):
        shifted = draw.packed_boundaries((step, 0), ri)
        assert torch.equal(shifted[ri < 0], ri[ri < 0])  # prefix tokens and padding untouched
        ks = []
        for b in range(ri.shape[0]):
            segs = _segments(ri[b])
            assert len(segs) == len(rows[b])
            for (t, r), ex in zip(segs, rows[b]):
                k = ri[b, t:t + r] - shifted[b, t:t + r]
                assert k.eq(k[0]).all() and 0 <= int(k[0]) <= max(r - 2, 0), (r, k)
                ks.append(int(k[0]))
                n_moved += int(k[0]) != 0
        la, ga = _loss_and_grads(moved, packed)  # this forward draws (step, 0): the same shift
        lb, gb = _loss_and_grads(plain, {**packed, "response_index": shifted})
        torch.testing.assert_close(la, lb, rtol=0, atol=1e-6)
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-7, msg=n)
        flat = [ex for row in rows for ex in row]
        padded = ULSCollator(tok.pad_token_id)(flat)
        padded["prefix_lengths"] = padded["prefix_lengths"] + torch.tensor(ks)
        lc, gc = _loss_and_grads(plain, padded)
        torch.testing.assert_close(lb, lc, rtol=1e-5, atol=1e-6)
        for n in gb:
            torch.testing.assert_close(gb[n], gc[n], rtol=1e-4, atol=1e-6, msg=n)
    assert n_moved >= 5, n_moved
    # a fresh draw object with the same seed repeats the shifts; another seed differs
    again = apply_uls(copy.deepcopy(base), target_speedup=2, draft_boundary="random", draw_seed=4)
    other = apply_uls(copy.deepcopy(base), target_speedup=2, draft_boundary="random", draw_seed=5)
    assert torch.equal(speedup_draw(again).packed_boundaries((1, 0), ri), draw.packed_boundaries((1, 0), ri))
    assert not torch.equal(speedup_draw(other).packed_boundaries((1, 0), ri), draw.packed_boundaries((1, 0), ri))


def test_packed_boundaries_edge_cases():
    """Records with a response of 1 or 2 tokens keep k = 0; longer ones draw every k in [0, r - 2] over keys;
    padding at a row's end, a row filled to its last token and a record of prefix length 0 (a response token
    first in its row, which encode never makes) are handled; the same key repeats its draw."""
    ex = lambda p, r: {"input_ids": list(range(1, p + r + 1)), "prefix_length": p}  # noqa: E731
    rows = [[ex(2, 1), ex(1, 2), ex(1, 5)], [ex(1, 13)], [ex(0, 4), ex(2, 6)]]
    ri = PackingCollator(0, pad_to_multiple_of=8)(rows)["response_index"]  # T = 16: every row ends in padding
    ri = torch.cat([ri, torch.tensor([[-1] + list(range(15))])])          # and one filled to its last token
    draw, seen = SpeedupDraw(seed=1), {}
    for step in range(40):
        out = draw.packed_boundaries((step, 0), ri)
        assert torch.equal(out, draw.packed_boundaries((step, 0), ri))
        assert torch.equal(out[ri < 0], ri[ri < 0])
        for b in range(ri.shape[0]):
            for t, r in _segments(ri[b]):
                k = ri[b, t:t + r] - out[b, t:t + r]
                assert k.eq(k[0]).all() and 0 <= int(k[0]) <= max(r - 2, 0), (b, t, r, k)
                seen.setdefault(r, set()).add(int(k[0]))
    assert seen == {1: {0}, 2: {0}, 4: {0, 1, 2}, 5: {0, 1, 2, 3}, 6: set(range(5)), 13: set(range(12)),
                    15: set(range(14))}, seen


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


def _oracle_packed(rows, pad, T):
    """The collators' layout written out per record with tensor slices (what PackingCollator made before it
    was vectorized): the exactness reference."""
    B = len(rows)
    out = {"input_ids": torch.full((B, T), pad, dtype=torch.long), "position_ids": torch.zeros((B, T), dtype=torch.long),
           "labels": torch.full((B, T), -100, dtype=torch.long), "response_index": torch.full((B, T), -1, dtype=torch.long)}
    for b, row in enumerate(rows):
        s = 0
        for ex in row:
            ids = torch.as_tensor(ex["input_ids"], dtype=torch.long)
            n, p = ids.numel(), int(ex["prefix_length"])
            out["input_ids"][b, s:s + n] = ids
            out["position_ids"][b, s:s + n] = torch.arange(n)
            out["labels"][b, s + p:s + n] = ids[p:]
            out["response_index"][b, s + p:s + n] = torch.arange(n - p)
            s += n
        out["position_ids"][b, s:] = torch.arange(T - s)
    return out


def _oracle_padded(features, pad, T):
    B = len(features)
    out = {"input_ids": torch.full((B, T), pad, dtype=torch.long), "attention_mask": torch.zeros((B, T), dtype=torch.long),
           "labels": torch.full((B, T), -100, dtype=torch.long), "prefix_lengths": torch.empty(B, dtype=torch.long)}
    for b, f in enumerate(features):
        ids = torch.as_tensor(f["input_ids"], dtype=torch.long)
        n, p = ids.numel(), int(f["prefix_length"])
        out["input_ids"][b, :n] = ids
        out["attention_mask"][b, :n] = 1
        out["labels"][b, p:n] = ids[p:]
        out["prefix_lengths"][b] = p
    return out


@pytest.mark.parametrize("multiple", [None, 8])
def test_collators_match_per_record_layout(multiple):
    """The vectorized collators give exactly the per-record layout: random lengths and prefixes (a 1-token
    prefix, a 1-token response, a row of one record, rows of several), int64 tensors, same keys."""
    g = torch.Generator().manual_seed(0)

    def ex():
        n = int(torch.randint(2, 40, (1,), generator=g))
        p = int(torch.randint(1, n, (1,), generator=g))
        return {"input_ids": torch.randint(3, 100, (n,), generator=g).tolist(), "prefix_length": p}

    exs = [ex() for _ in range(40)] + [{"input_ids": [1, 5], "prefix_length": 1}, {"input_ids": [1, 5, 6], "prefix_length": 2}]
    rows = PackedULSDataset(exs, block_size=100).rows + [[exs[0]]]
    got = PackingCollator(0, pad_to_multiple_of=multiple)(rows)
    T = got["input_ids"].shape[1]
    want = _oracle_packed(rows, 0, T)
    assert T == (max(sum(len(e["input_ids"]) for e in r) for r in rows) if multiple is None else T) and \
        (multiple is None or T % multiple == 0)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == torch.long and torch.equal(got[k], want[k]), k
    got = ULSCollator(0, pad_to_multiple_of=multiple)(exs)
    want = _oracle_padded(exs, 0, got["input_ids"].shape[1])
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == torch.long and torch.equal(got[k], want[k]), k
