"""The auxiliary losses (ulskip/train/aux_loss.py): skip path + a * full path cross-entropy + b * hidden-state
match, checked against a direct computation on an untouched copy of the model (the full path) and the ULS
model's own forward (the skip path); packed rows equal padded ones; bad weights and combinations refused."""
import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F

from helpers import make_checkpoint, make_tokenizer, make_train_model, records, write_train_data
from ulskip.cli import main
from ulskip.train import apply_uls, patch_model
from ulskip.train import enable_aux_losses
from ulskip.train.aux_loss import hidden_match_loss
from ulskip.train.data import PackedULSDataset, PackingCollator, ULSCollator, encode


def _model(family, seed=5):
    tok = make_tokenizer()
    base = make_train_model(family, num_layers=6, vocab_size=len(tok), seed=seed).float().train()
    with torch.no_grad():  # make the layers matter
        for name, p in base.named_parameters():
            if "norm" not in name and "ln" not in name:
                p.normal_(0, 0.08)
    exs = [encode(tok, r, 256, f"r{i}") for i, r in enumerate(records()[:6])]
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
