"""The auxiliary losses (ulskip/train/aux_loss.py): skip path + a * full path cross-entropy + b * hidden-state
match, checked against a direct computation on an untouched copy of the model (the full path) and the ULS
model's own forward (the skip path); packed rows equal padded ones; bad weights and combinations refused.
The review's cases: Mistral/Qwen2, inputs_embeds, gradient checkpointing, SkipDecode, a random draft
boundary, gradient accumulation through num_items_in_batch, a drawn 1x schedule, and what the two-path
forward costs (no graph for a full path without gradient, no second pass for a 1x draw, no host read)."""
import copy
import json
import os
import re
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import make_checkpoint, make_tokenizer, make_train_model, records, write_train_data
from ulskip.cli import main
from ulskip.train import apply_uls, patch_model
from ulskip.train import enable_aux_losses
from ulskip.train.aux_loss import hidden_match_loss
from ulskip.train.data import PackedULSDataset, PackingCollator, ULSCollator, encode


def _model(family, seed=5, n=6):
    tok = make_tokenizer()
    base = make_train_model(family, num_layers=6, vocab_size=len(tok), seed=seed).float().train()
    with torch.no_grad():  # make the layers matter
        for name, p in base.named_parameters():
            if "norm" not in name and "ln" not in name:
                p.normal_(0, 0.08)
    exs = [encode(tok, r, 256, f"r{i}") for i, r in enumerate(records()[:n])]
    return tok, base, exs


def _final_norm(model):
    return model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm


def _with_final_hidden(model, batch):
    """model(**batch).loss and the final norm's output, caught by a hook (independent of aux_loss.py)."""
    seen = []
    handle = _final_norm(model).register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        loss = model(**batch).loss
    finally:
        handle.remove()
    return loss, seen[-1]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "bloom"])
@pytest.mark.parametrize("a,b", [(0.3, 0.0), (0.0, 0.7), (0.4, 1.5)])
def test_aux_loss_equals_a_direct_computation(family, a, b):
    tok, base, exs = _model(family)
    batch = ULSCollator(tok.pad_token_id)(exs)
    full = copy.deepcopy(base)                    # the full path: the plain model, every layer
    skip = apply_uls(copy.deepcopy(base), target_speedup=2)
    aux = enable_aux_losses(apply_uls(copy.deepcopy(base), target_speedup=2), full_path_weight=a,
                            hidden_match_weight=b)

    ce_skip, h_skip = _with_final_hidden(skip, batch)
    ce_full, h_full = _with_final_hidden(full, {k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
    shift = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    match = hidden_match_loss(h_skip, h_full, shift)
    want = ce_skip + a * ce_full + b * match
    (ce_skip + b * match).backward()               # the match term's gradient reaches the skip path only
    (a * ce_full).backward()
    got = aux(**batch).loss
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g_skip, g_full, g_aux = _grads(skip), _grads(full), _grads(aux)
    assert g_aux
    for n, g in g_aux.items():
        ref = g_skip.get(n, torch.zeros_like(g)) + g_full.get(n, torch.zeros_like(g))
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6, msg=n)
    if b:
        assert match > 0  # the skip path's output differs from the full path's: the term is not vacuous


def test_direct_definition_of_the_match_term():
    h_skip = torch.randn(2, 5, 8, requires_grad=True)
    h_full = torch.randn(2, 5, 8, requires_grad=True)
    shift = torch.tensor([[-100, 3, 4, -100, -100], [-100, -100, 7, 8, 9]])
    loss = hidden_match_loss(h_skip, h_full, shift)
    pos = [(0, 1), (0, 2), (1, 2), (1, 3), (1, 4)]
    want = sum(1 - F.cosine_similarity(h_skip[i, t], h_full[i, t], dim=0) for i, t in pos) / 5
    torch.testing.assert_close(loss, want)
    scaled = hidden_match_loss(h_skip, h_full, shift, num_items_in_batch=10)  # the accumulated batch's count
    assert float(scaled.detach()) * 10 == pytest.approx(float(loss.detach()) * 5)
    loss.backward()
    assert h_full.grad is None and h_skip.grad is not None  # the full path is the target


def test_packed_rows_equal_padded_ones_and_the_fused_loss_agrees():
    tok, base, exs = _model("llama")
    padded = ULSCollator(tok.pad_token_id)(exs)
    packed = PackingCollator(tok.pad_token_id)(PackedULSDataset(exs, block_size=60).rows)
    losses = []
    for batch, fused in ((padded, False), (packed, False), (padded, True)):
        m = apply_uls(copy.deepcopy(base), target_speedup=2)
        if fused:
            patch_model(m, norm=False, activation=False)  # the fused linear cross-entropy alone
        enable_aux_losses(m, full_path_weight=0.5, hidden_match_weight=2.0)
        losses.append(m(**batch).loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[2], losses[0], rtol=1e-5, atol=1e-6)


def test_off_and_eval_mode_run_the_skip_path_alone():
    tok, base, exs = _model("llama")
    batch = ULSCollator(tok.pad_token_id)(exs)
    plain = apply_uls(copy.deepcopy(base), target_speedup=2)
    off = enable_aux_losses(apply_uls(copy.deepcopy(base), target_speedup=2), 0, 0)
    assert off._ulskip_train.aux is None
    torch.testing.assert_close(off(**batch).loss, plain(**batch).loss)
    on = enable_aux_losses(apply_uls(copy.deepcopy(base), target_speedup=2), 1.0, 1.0).eval()
    plain.eval()
    with torch.no_grad():  # eval (scoring, the Trainer's evaluation): the schedule's loss, no extra terms
        torch.testing.assert_close(on(**batch).loss, plain(**batch).loss)


def test_one_draw_per_forward_with_several_speedups():
    """A several-speedups run still draws one schedule per training forward (the full path draws nothing)."""
    tok, base, exs = _model("llama")
    batch = ULSCollator(tok.pad_token_id)(exs)
    m = enable_aux_losses(apply_uls(copy.deepcopy(base), target_speedups=[1, 2]), 0.5, 0.5)
    draw = m._ulskip_train.uls.draw
    for i in range(3):
        m(**batch).loss.backward()
        assert draw.step == i + 1


def test_hidden_states_are_refused_and_a_new_schedule_drops_the_losses():
    tok, base, exs = _model("llama")
    batch = ULSCollator(tok.pad_token_id)(exs)
    m = enable_aux_losses(apply_uls(copy.deepcopy(base), target_speedup=2), 0.5, 0.5)
    for flag in ("output_hidden_states", "output_attentions"):
        with pytest.raises(ValueError, match=f"{flag}=True is not supported"):
            m(**batch, **{flag: True})
    apply_uls(m, target_speedup=3, prefill="skip")  # the check against prefill "skip" would be bypassed
    assert m._ulskip_train.aux is None


def test_bad_weights_and_models_are_refused():
    tok, base, _ = _model("llama")
    with pytest.raises(ValueError, match="call ulskip.train.apply_uls"):
        enable_aux_losses(copy.deepcopy(base), 0.5)
    m = apply_uls(copy.deepcopy(base), target_speedup=2)
    for bad in (-0.1, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="must be a finite number >= 0"):
            enable_aux_losses(m, full_path_weight=bad)
        with pytest.raises(ValueError, match="must be a finite number >= 0"):
            enable_aux_losses(m, hidden_match_weight=bad)
    with pytest.raises(ValueError, match="need prefill 'full'"):
        enable_aux_losses(apply_uls(copy.deepcopy(base), target_speedup=2, prefill="skip"), 0.5)


def test_ulskip_train_with_aux_losses(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt", "llama", num_layers=4)
    data = write_train_data(tmp_path)
    common = ["--model-name-or-path", ckpt, "--train-file", data, "--per-device-train-batch-size", "4",
              "--learning-rate", "3e-3", "--warmup-ratio", "0", "--lr-scheduler-type", "constant", "--seed", "0",
              "--save-steps", "100", "--logging-steps", "5", "--target-speedup", "2", "--max-steps", "12"]
    out, plain, zero = str(tmp_path / "aux"), str(tmp_path / "plain"), str(tmp_path / "zero")
    assert main(["train", *common, "--output-dir", out, "--full-path-loss-weight", "0.5",
                 "--hidden-match-weight", "1"]) == 0
    assert main(["train", *common, "--output-dir", plain]) == 0
    assert main(["train", *common, "--output-dir", zero, "--full-path-loss-weight", "0",
                 "--hidden-match-weight", "0"]) == 0
    cfg = json.load(open(f"{out}/config.json"))
    assert cfg["ulskip"]["kept_layers"] == [0, 3]
    from safetensors.torch import load_file
    a, b, z = (load_file(f"{d}/model.safetensors") for d in (out, plain, zero))
    # the flags reach the loss (what they compute is checked exactly above), and weights 0 are the plain run
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(z[k], b[k]) for k in b)
    capsys.readouterr()
    for argv, match in ((["--full-path-loss-weight", "-1"], "--full-path-loss-weight must be"),
                        (["--hidden-match-weight", "nan"], "--hidden-match-weight must be"),
                        (["--hidden-match-weight", "1", "--prefill", "skip"], "need prefill 'full'"),
                        (["--full-path-loss-weight", "1", "--distill-from", plain], "cannot be combined with --distill-from")):
        assert main(["train", *common, "--output-dir", str(tmp_path / "x"), *argv]) == 2
        err = capsys.readouterr().err
        assert re.search(match, err), err
    assert not (tmp_path / "x").exists()  # refused before anything was written


# ---------------------------------------------------------------- the review's cases (fifth session)
def _direct(base, batch, a, b, **uls):
    """(loss, grads) of CE(skip) + a CE(full) + b match, from an untouched full copy and a plain ULS copy."""
    full = copy.deepcopy(base)
    skip = apply_uls(copy.deepcopy(base), **uls)
    ce_skip, h_skip = _with_final_hidden(skip, batch)
    ce_full, h_full = _with_final_hidden(full, {k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
    shift = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    loss = ce_skip + a * ce_full + b * hidden_match_loss(h_skip, h_full, shift)
    (ce_skip + b * hidden_match_loss(h_skip, h_full.detach(), shift)).backward(retain_graph=True)
    (a * ce_full).backward()
    gs, gf = _grads(skip), _grads(full)
    names = set(gs) | set(gf)
    zero = {n: p for n, p in skip.named_parameters()}
    return loss.detach(), {n: gs.get(n, torch.zeros_like(zero[n])) + gf.get(n, torch.zeros_like(zero[n]))
                           for n in names}


def _check(model, batch, want_loss, want_grads):
    got = model(**batch).loss
    got.backward()
    torch.testing.assert_close(got.detach(), want_loss, rtol=1e-5, atol=1e-6)
    g = _grads(model)
    assert set(g) == set(want_grads)
    for n in g:
        torch.testing.assert_close(g[n], want_grads[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_llama_family_models_equal_a_direct_computation(family):
    tok, base, exs = _model(family)
    batch = ULSCollator(tok.pad_token_id)(exs)
    want = _direct(base, batch, 0.4, 1.5, target_speedup=2)
    _check(enable_aux_losses(apply_uls(copy.deepcopy(base), target_speedup=2), 0.4, 1.5), batch, *want)


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_inputs_embeds_equal_input_ids(family):
    tok, base, exs = _model(family)
    batch = ULSCollator(tok.pad_token_id)(exs)
    m = enable_aux_losses(apply_uls(copy.deepcopy(base), target_speedup=2), 0.4, 1.5)
    emb = dict(batch)
    emb["inputs_embeds"] = m.get_input_embeddings()(emb.pop("input_ids")).detach()
    torch.testing.assert_close(m(**emb).loss, m(**batch).loss)


@pytest.mark.parametrize("family", ["llama", "bloom"])
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("a", [0.4, 0.0])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family, reentrant, a):
    """The recomputation in backward runs after the skip path's ULS state was closed: it must still recompute
    what the forward ran (the cut inputs), for both paths (a = 0: the full path runs without a graph)."""
    tok, base, exs = _model(family)
    batch = ULSCollator(tok.pad_token_id)(exs)
    want = _direct(base, batch, a, 1.5, target_speedup=2)
    m = enable_aux_losses(apply_uls(copy.deepcopy(base), target_speedup=2), a, 1.5)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    m.train()
    _check(m, batch, *want)


@pytest.mark.parametrize("uls", [dict(target_speedup=2, strategy="skipdecode", skipdecode_horizon=4),
                                 dict(target_speedup=2, draft_boundary="random", draw_seed=3)],
                         ids=["skipdecode", "random-draft-boundary"])
def test_other_schedules_equal_a_direct_computation(uls):
    """SkipDecode's per-position depths, and a random draft boundary (both models' first training forward
    draws the same boundaries: seed, step 0)."""
    tok, base, exs = _model("llama")
    batch = ULSCollator(tok.pad_token_id)(exs)
    want = _direct(base, batch, 0.5, 1.0, **uls)
    _check(enable_aux_losses(apply_uls(copy.deepcopy(base), **uls), 0.5, 1.0), batch, *want)


def test_gradient_accumulation_with_num_items_equals_one_big_batch():
    """Two micro-batches, each divided by the pair's label count (transformers' num_items_in_batch), sum to
    the loss and gradients of the two as one batch: every term is a per-token sum over that count."""
    tok, base, exs = _model("llama", n=8)
    collate = ULSCollator(tok.pad_token_id)
    whole, first, second = collate(exs), collate(exs[:3]), collate(exs[3:])
    count = sum(int((b["labels"][:, 1:] != -100).sum()) for b in (first, second))
    one = enable_aux_losses(apply_uls(copy.deepcopy(base), target_speedup=2), 0.6, 2.0)
    acc = enable_aux_losses(apply_uls(copy.deepcopy(base), target_speedup=2), 0.6, 2.0)
    want = one(**whole).loss
    want.backward()
    got = 0
    for b in (first, second):
        loss = acc(**b, num_items_in_batch=torch.tensor(count)).loss
        loss.backward()
        got = got + loss.detach()
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    g1, g2 = _grads(one), _grads(acc)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-6, msg=n)


def _count_base_passes(model, batch):
    calls = []
    handle = _final_norm(model).register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        loss = model(**batch).loss
    finally:
        handle.remove()
    return loss, len(calls)


def test_a_drawn_1x_schedule_runs_one_pass_with_the_plain_loss_and_gradients():
    """Several speedups with 1x drawn: the skip path is the full path, so the step is a plain full-model step
    (its cross-entropy is the full path's; the match term would be 0), in one pass through the model."""
    tok, base, exs = _model("llama")
    batch = ULSCollator(tok.pad_token_id)(exs)
    a, b = 0.5, 1.0
    full = copy.deepcopy(base)
    ce = full(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    ce.backward()
    m = enable_aux_losses(apply_uls(copy.deepcopy(base), target_speedups=[1, 2], speedup_weights=[1, 0]), a, b)
    loss, passes = _count_base_passes(m, batch)
    assert m._ulskip_train.uls.speedup == 1.0
    loss.backward()
    torch.testing.assert_close(loss.detach(), ce.detach(), rtol=1e-5, atol=1e-6)
    gf, gm = _grads(full), _grads(m)
    for n in gf:
        torch.testing.assert_close(gm[n], gf[n], rtol=1e-4, atol=1e-6, msg=n)
    assert passes == 1
    # a drawn 2x schedule still runs both paths
    m2 = enable_aux_losses(apply_uls(copy.deepcopy(base), target_speedups=[1, 2], speedup_weights=[0, 1]), a, b)
    assert _count_base_passes(m2, batch)[1] == 2


class _SavedNumel:
    def __init__(self):
        self.numel = 0

    def pack(self, t):
        self.numel += t.numel()
        return t


def _saved_numel(model, batch):
    s = _SavedNumel()
    with torch.autograd.graph.saved_tensors_hooks(s.pack, lambda t: t):
        model(**batch).loss.backward()
    return s.numel


def test_match_only_keeps_no_graph_of_the_full_path():
    """With full_path_weight 0 the full path is only the match term's target (no gradient through it): its
    pass must not keep activations for a backward that never reaches it."""
    tok, base, exs = _model("llama")
    batch = ULSCollator(tok.pad_token_id)(exs)
    skip_only = _saved_numel(apply_uls(copy.deepcopy(base), target_speedup=2), batch)
    match_only = _saved_numel(enable_aux_losses(apply_uls(copy.deepcopy(base), target_speedup=2), 0.0, 1.0), batch)
    both = _saved_numel(enable_aux_losses(apply_uls(copy.deepcopy(base), target_speedup=2), 1.0, 1.0), batch)
    assert match_only < 1.25 * skip_only, (match_only, skip_only)
    assert both > 1.5 * skip_only  # the full path's CE does need its graph


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AUX_FILE = os.path.join(ROOT, "ulskip", "train", "aux_loss.py")
READS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero", "aten.equal"}


class _Reads(TorchDispatchMode):
    """Ops that read a tensor back to the host (a sync on a GPU) called from aux_loss.py itself (the innermost
    frame outside torch)."""

    def __init__(self):
        super().__init__()
        self.sites = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        # h[mask] with a bool mask: the index kernel runs a nonzero inside (not seen as an op of its own)
        bool_index = name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
            torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] if len(args) > 1 else ())
            if i is not None)
        if name in READS or bool_index:
            for f in reversed(traceback.extract_stack()[:-1]):
                if f"{os.sep}torch{os.sep}" in f.filename or f.filename == __file__:
                    continue
                if f.filename == AUX_FILE:  # not transformers' own reads (its mask building) nor apply_uls's
                    self.sites.append((name, f"aux_loss.py:{f.lineno}"))
                break
        return func(*args, **(kwargs or {}))


def test_the_aux_loss_reads_nothing_back_to_the_host():
    """Boolean-mask indexing (h[mask]) is a nonzero: on a GPU a stream drain every step."""
    tok, base, exs = _model("llama")
    batch = ULSCollator(tok.pad_token_id)(exs)
    m = enable_aux_losses(apply_uls(copy.deepcopy(base), target_speedup=2), 0.5, 1.0)
    with _Reads() as reads:
        m(**batch).loss.backward()
    assert reads.sites == []


def test_hidden_match_ignores_positions_without_a_label():
    h_skip = torch.randn(2, 4, 8, requires_grad=True)
    h_full = torch.randn(2, 4, 8)
    shift = torch.tensor([[-100, 3, -100, -100], [5, -100, -100, -100]])
    loss = hidden_match_loss(h_skip, h_full, shift)
    want = (2 - F.cosine_similarity(h_skip[0, 1], h_full[0, 1], dim=0)
            - F.cosine_similarity(h_skip[1, 0], h_full[1, 0], dim=0)) / 2
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert h_skip.grad[0, [0, 2, 3]].abs().sum() == 0 and h_skip.grad[1, 1:].abs().sum() == 0
    # no label at all: 0, not nan
    assert float(hidden_match_loss(h_skip, h_full, torch.full((2, 4), -100))) == 0.0


def test_ulskip_train_aux_with_gradient_checkpointing_accumulation_and_two_speedups(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", "llama", num_layers=4)
    data = write_train_data(tmp_path)
    assert main(["train", "--model-name-or-path", ckpt, "--train-file", data, "--output-dir", str(tmp_path / "o"),
                 "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "2", "--learning-rate",
                 "1e-3", "--warmup-ratio", "0", "--seed", "0", "--save-steps", "100", "--logging-steps", "2",
                 "--target-speedups", "1,2", "--speedup-draw", "micro-batch", "--max-steps", "4",
                 "--gradient-checkpointing", "--full-path-loss-weight", "0.5", "--hidden-match-weight", "1"]) == 0
    assert os.path.exists(tmp_path / "o" / "model.safetensors")


def test_a_refused_input_closes_the_skip_paths_state():
    """begin() refuses a bad prefix_lengths after marking the forward active: the state must still end, or
    a later call of the base model alone would run the ULS semantics with a stale context."""
    tok, base, exs = _model("llama")
    batch = ULSCollator(tok.pad_token_id)(exs)
    m = enable_aux_losses(apply_uls(copy.deepcopy(base), target_speedup=2), 0.5, 1.0)
    bad = {**batch, "prefix_lengths": batch["prefix_lengths"][:2]}
    with pytest.raises(ValueError, match="one length per row"):
        m(**bad)
    assert m._ulskip_train.uls.active is False
    plain = copy.deepcopy(base)
    torch.testing.assert_close(m.model(input_ids=batch["input_ids"])[0], plain.model(input_ids=batch["input_ids"])[0])
