"""One checkpoint trained for several speedups (apply_uls(target_speedups=...)): each training forward runs
one drawn schedule, exactly as apply_uls with that single speedup would; the draw depends on (seed, step,
micro-batch) only; eval mode runs the default (largest) schedule; the section records the set; prefill
"skip" freezes only the layers no schedule keeps; and every bad input is refused. Also the random draft
boundary (draft_boundary="random")."""
import collections
import copy

import pytest
import torch

from helpers import make_train_model
from ulskip import uls_schedule
from ulskip.train import apply_uls, decoder_layers
from ulskip.train.apply_uls import SpeedupDraw, speedup_draw


def _model(family="llama", layers=6, seed=3):
    model = make_train_model(family, num_layers=layers, vocab_size=64, seed=seed).train()
    with torch.no_grad():  # wider weights: the schedules give clearly different losses
        for name, p in model.named_parameters():
            if "norm" not in name and "ln" not in name:
                p.normal_(0, 0.08)
    return model


def _batch(seed=0, lens=((5, 4), (2, 8), (9, 3))):
    g = torch.Generator().manual_seed(seed)
    T = max(p + r for p, r in lens)
    ids = torch.randint(3, 64, (len(lens), T), generator=g)
    am = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (p, r) in enumerate(lens):
        am[b, :p + r] = 1
        labels[b, p:p + r] = ids[b, p:p + r]
    return dict(input_ids=ids, attention_mask=am, labels=labels,
                prefix_lengths=torch.tensor([p for p, _ in lens]))


def _loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_draw_is_deterministic_follows_the_weights_and_the_mode():
    d = SpeedupDraw([1.0, 2.0, 3.0], [1.0, 2.0, 7.0], mode="step", seed=5)
    again = SpeedupDraw([1.0, 2.0, 3.0], [1.0, 2.0, 7.0], mode="step", seed=5)
    seq = [d.speedup_at(k) for k in range(6000)]
    assert seq == [again.speedup_at(k) for k in range(6000)]          # a function of (seed, step) alone
    assert seq != [SpeedupDraw([1.0, 2.0, 3.0], [1.0, 2.0, 7.0], seed=6).speedup_at(k) for k in range(6000)]
    freq = collections.Counter(seq)
    for s, w in ((1.0, 0.1), (2.0, 0.2), (3.0, 0.7)):
        assert abs(freq[s] / len(seq) - w) < 0.025, freq
    # "step": every micro-batch of a step runs the step's schedule; "micro-batch": each draws its own
    assert all(d.speedup_at(k, m) == d.speedup_at(k) for k in range(50) for m in range(4))
    mb = SpeedupDraw([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], mode="micro-batch", seed=5)
    assert len({mb.speedup_at(7, m) for m in range(40)}) == 3
    assert SpeedupDraw([1.0, 2.0], [0.0, 1.0]).speedup_at(3) == 2.0   # weight 0: never drawn
    assert all(SpeedupDraw([1.0, 2.0], [0.0, 1.0]).speedup_at(k) == 2.0 for k in range(200))


@pytest.mark.parametrize("family,prefill", [("llama", "full"), ("llama", "skip"), ("bloom", "full")])
def test_each_drawn_forward_equals_its_single_speedup(family, prefill):
    """Every training forward of the multi-speedup model: the same loss, logits and gradients as apply_uls
    with the drawn speedup alone, on the same weights and batch; eval mode runs the default (largest)."""
    base = _model(family)
    multi = apply_uls(copy.deepcopy(base), target_speedups=[1, 2, 3], prefill=prefill, draw_seed=1)
    single = {s: apply_uls(copy.deepcopy(base), target_speedup=s, prefill=prefill) for s in (1, 2, 3)}
    ctx, draw = multi._ulskip_train.uls, speedup_draw(multi)
    drawn = []
    for k in range(4):  # draw_seed 1 draws 3, 3, 1, 2
        batch = _batch(seed=k)
        out, grads = _loss_and_grads(multi, batch)
        s = ctx.speedup
        assert s == draw.speedup_at(k) and draw.step == k + 1  # plain Python: each training forward is a step
        drawn.append(s)
        ref, ref_grads = _loss_and_grads(single[int(s)], batch)
        torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
        assert grads.keys() == ref_grads.keys(), s   # prefill skip: the layers s leaves out get no gradient
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-7, msg=n)
    assert set(drawn) == {1.0, 2.0, 3.0}, drawn
    # and the schedules differ: the losses of one batch under 1x and 3x are not the same
    batch = _batch(seed=9)
    with torch.no_grad():
        assert abs(single[1](**batch).loss - single[3](**batch).loss) > 1e-3
    multi.eval()
    with torch.no_grad():
        ev = multi(**batch)
        ref = single[3].eval()(**batch)
    assert ctx.speedup == 3.0 and draw.step == 4   # eval mode: the default, and the counter stays
    torch.testing.assert_close(ev.logits, ref.logits, rtol=0, atol=1e-5)


def test_section_and_frozen_layers():
    m = apply_uls(_model(), target_speedups=[3, 1, 2], speedup_weights=[1, 0.5, 2], speedup_draw="micro-batch")
    assert m.config.ulskip == {
        "kept_layers": [0, 5], "num_layers": 6, "target_speedup": 3.0, "strategy": "paper", "prefill": "full",
        "target_speedups": [1.0, 2.0, 3.0], "speedup_weights": [0.5, 2.0, 1.0],  # sorted with their speedups
        "schedules": {"1": [0, 1, 2, 3, 4, 5], "2": [0, 3, 5], "3": [0, 5]}, "speedup_draw": "micro-batch"}
    assert all(p.requires_grad for p in m.parameters())
    # one listed speedup is exactly target_speedup: today's section, no new keys
    one, ref = apply_uls(_model(), target_speedups=[2]), apply_uls(_model(), target_speedup=2)
    assert one.config.ulskip == ref.config.ulskip and speedup_draw(one) is None
    # prefill skip: a layer is frozen only if no listed schedule keeps it (2x: 0,1,2; 3x: 0,1 of early-exit)
    m = apply_uls(_model(), target_speedups=[2, 3], strategy="early-exit", prefill="skip")
    assert m.config.ulskip["schedules"] == {"2": [0, 1, 2], "3": [0, 1]}
    for i, layer in enumerate(decoder_layers(m)):
        assert all(p.requires_grad == (i <= 2) for p in layer.parameters()), i
    m = apply_uls(_model(), target_speedups=[1, 3], prefill="skip")  # 1x keeps every layer: none frozen
    assert all(p.requires_grad for p in m.parameters())
    # the other policies take the set too (the same layer_seed for each speedup)
    m = apply_uls(_model(), target_speedups=[2, 3], strategy="random", layer_seed=4)
    assert m.config.ulskip["schedules"] == {"2": uls_schedule(6, 2, "random", seed=4),
                                            "3": uls_schedule(6, 3, "random", seed=4)}


@pytest.mark.parametrize("kw,match", [
    (dict(target_speedups=[1, 2], strategy="skipdecode"), "skipdecode .* takes one speedup"),
    (dict(target_speedups=[2, 2.0]), "lists 2 twice"),
    (dict(target_speedups=[1, 2], speedup_weights=[1]), "one weight per speedup"),
    (dict(target_speedups=[1, 2], speedup_weights=[1, -1]), "finite numbers >= 0"),
    (dict(target_speedups=[1, 2], speedup_weights=[1, float("nan")]), "finite numbers >= 0"),
    (dict(target_speedups=[1, 2], speedup_weights=[0, 0]), "must not all be 0"),
    (dict(target_speedups=[1, 2], speedup_weights=[1e308, 1e308]), "must have a finite sum"),
    (dict(target_speedups=[1.5, 1.5000001]), "both print as 1.5"),  # config.json's schedules keys would collide
    (dict(target_speedups=[2.5, 2.9]), r"2.5 and 2.9 keep the same layers \[0, 5\]"),
    (dict(target_speedups=[1, 4]), r"target_speedup must be in \[1, 3\] for 6 layers"),  # uls_schedule's own
    (dict(target_speedups=[1, float("nan")]), "target_speedup must be a finite number"),
    (dict(target_speedups=[]), "at least one speedup"),
    (dict(target_speedups="1,2"), "must be a list of numbers"),
    (dict(target_speedups=[1, 2], target_speedup=2), "target_speedups alone"),
    (dict(target_speedups=[1, 2], schedule=[0, 5]), "target_speedups alone"),
    (dict(target_speedup=2, speedup_weights=[1]), "give target_speedups too"),
    (dict(target_speedups=[1, 2], speedup_draw="epoch"), "speedup_draw must be one of"),
    (dict(target_speedup=2, draft_boundary="middle"), "draft_boundary must be one of"),
    (dict(target_speedup=2, draft_boundary="random", prefill="skip"), "needs prefill='full'"),
    (dict(target_speedup=2, draft_boundary="random", strategy="skipdecode"), "not skipdecode"),
])
def test_bad_inputs_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        apply_uls(_model(), **kw)


def test_random_draft_boundary():
    """draft_boundary="random": a training forward equals the plain forward whose prefix_lengths are the
    drawn boundaries, each inside its row's response with at least one skip-path position left for the
    loss; eval mode keeps the prefix boundary."""
    base = _model()
    moved = apply_uls(copy.deepcopy(base), target_speedup=2, draft_boundary="random", draw_seed=2)
    plain = apply_uls(copy.deepcopy(base), target_speedup=2)
    assert moved.config.ulskip == {**plain.config.ulskip, "draft_boundary": "random"}
    draw = speedup_draw(moved)
    lens = ((5, 4), (2, 8), (9, 1), (3, 2))
    n_moved = 0
    for k in range(4):
        batch = _batch(seed=k, lens=lens)
        b = draw.boundaries((k, 0), batch["prefix_lengths"], batch["labels"], batch["input_ids"].shape[1])
        for (p, r), x in zip(lens, b.tolist()):
            assert p <= x <= p + max(r - 2, 0), (p, r, x)  # r <= 2: no room, the boundary stays
            n_moved += x != p
        out, grads = _loss_and_grads(moved, batch)
        ref, ref_grads = _loss_and_grads(plain, {**batch, "prefix_lengths": b})
        torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-6)
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-7, msg=n)
    assert n_moved >= 4, n_moved  # of the 8 rows with room to move
    batch = _batch(seed=0, lens=lens)
    with torch.no_grad():
        torch.testing.assert_close(moved.eval()(**batch).loss, plain.eval()(**batch).loss, rtol=0, atol=1e-6)
