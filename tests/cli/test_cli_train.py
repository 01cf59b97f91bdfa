"""`ulskip train` end to end on CPU (tiny random Llama, a tokenizer trained on the test's own text, a
small real-text prefix/response data set): the loss falls, frozen embeddings stay unchanged, the saved
folder runs in the engine with the trained schedule, resuming works, bad data gets clear errors; and the
training forward's logits equal the engine's decode logits (train/infer consistency)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from helpers import (make_checkpoint, make_tokenizer, make_train_model as make_model, read_log_losses, records,
                     write_train_data)
from ulskip.cli import main

COMMON = ["--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--warmup_ratio", "0",
          "--lr_scheduler_type", "constant", "--logging_steps", "5", "--seed", "0"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama", num_layers=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_train_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(ckpt, data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out"))
    rc = main(["train", "--model_name_or_path", ckpt, "--train_file", data, "--output_dir", out,
               "--target_speedup", "2", "--max_steps", "40", "--save_steps", "20", *COMMON])
    assert rc == 0
    return out


def test_loss_falls_and_checkpoint(trained, ckpt):
    losses = read_log_losses(trained)
    assert len(losses) == 8 and losses[-1] < 0.6 * losses[0], losses
    cfg = json.load(open(os.path.join(trained, "config.json")))
    assert cfg["ulskip"] == {"kept_layers": [0, 3], "num_layers": 4, "target_speedup": 2.0, "strategy": "paper",
                             "prefill": "full"}
    assert os.path.exists(os.path.join(trained, "tokenizer.json"))
    before, after = load_file(os.path.join(ckpt, "model.safetensors")), load_file(os.path.join(trained, "model.safetensors"))
    emb = "model.embed_tokens.weight"
    assert torch.equal(before[emb], after[emb])                      # --freeze_emb (default true)
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])  # untied head trains
    assert not torch.equal(before["model.layers.1.mlp.up_proj.weight"], after["model.layers.1.mlp.up_proj.weight"])


def test_engine_runs_trained_schedule(trained):
    import ulskip
    eng = ulskip.Engine.from_pretrained(trained)
    assert eng.kept_layers == [0, 3] and eng.prefill_mode == "full"
    tok = make_tokenizer()
    out = eng.generate([tok(records()[0]["prefix"])["input_ids"]], max_new_tokens=6)
    assert tok.decode(out.sequences[0][:5]) in {r["text"] for r in records()}  # it learned the data's form


def test_ulskip_generate_runs_trained_schedule(trained, capsys):
    assert main(["generate", trained, "--prompt", records()[0]["prefix"], "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kept_layers"] == [0, 3] and out["prefill"] == "full" and isinstance(out["texts"][0], str)

def _model_whose_layers_matter(family):
    """A 6-layer tiny model with weights N(0, 0.08) (HF's small init makes skipped layers look alike)."""
    model = make_model(family, num_layers=6, vocab_size=64, seed=7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and "ln" not in name:
                p.normal_(0, 0.08)
    return model


def _assert_training_logits_equal_scores(m, prefix, resp, scores, row):
    """The training forward of m over prefix + resp, at the response positions, == the engine's decode
    scores of batch row `row` (one [rows, V] tensor per generated token)."""
    assert len(resp) == len(scores)  # no early stop: every step is compared
    ids = torch.tensor([prefix + resp])
    labels = torch.full_like(ids, -100)
    labels[0, len(prefix):] = ids[0, len(prefix):]
    with torch.no_grad():
        logits = m(input_ids=ids, labels=labels).logits[0]
    for k in range(len(resp)):
        assert torch.allclose(logits[len(prefix) - 1 + k], scores[k][row].float(), atol=1e-4), (row, k)


@pytest.mark.parametrize("family,prefill", [("llama", "full"), ("llama", "skip"), ("bloom", "full"),
                                            ("bloom", "skip")])
def test_train_infer_consistency(tmp_path, family, prefill):
    """Training forward logits at the response positions == the engine's decode scores, for a response
    that is the engine's own greedy output."""
    import ulskip
    from transformers import AutoModelForCausalLM
    from ulskip.train import apply_uls

    model = _model_whose_layers_matter(family)
    apply_uls(model, target_speedup=2, prefill=prefill)
    model.save_pretrained(tmp_path)
    eng = ulskip.Engine.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert eng.kept_layers == [0, 3, 5] and eng.prefill_mode == prefill
    prefix = [1, 7, 9, 11, 13, 20, 5]
    n = 6
    out = eng.generate([prefix], max_new_tokens=n, output_scores=True)
    resp = out.sequences[0]
    assert len(resp) == n and len(out.scores) == n
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    apply_uls(m, schedule=m.config.ulskip["kept_layers"], prefill=m.config.ulskip["prefill"])
    _assert_training_logits_equal_scores(m, prefix, resp, out.scores, 0)


def test_resume_from_checkpoint(ckpt, data, tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    args = ["train", "--model_name_or_path", ckpt, "--train_file", data, "--save_steps", "4", *COMMON]
    assert main([*args, "--output_dir", straight, "--max_steps", "8"]) == 0
    assert main([*args, "--output_dir", resumed, "--max_steps", "4"]) == 0
    assert main([*args, "--output_dir", resumed, "--max_steps", "8", "--resume_from_checkpoint", "latest"]) == 0
    state = json.load(open(os.path.join(resumed, "checkpoint-8", "trainer_state.json")))
    assert state["global_step"] == 8
    a, b = load_file(os.path.join(straight, "model.safetensors")), load_file(os.path.join(resumed, "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def _err(capsys):
    return capsys.readouterr().err


def test_bad_data_errors(ckpt, tmp_path, capsys):
    def run(pattern, *extra):
        return main(["train", "--model_name_or_path", ckpt, "--train_file", pattern, "--output_dir",
                     str(tmp_path / "o"), *extra])

    assert run(str(tmp_path / "nothing*.jsonl")) == 2
    assert "matches no files" in _err(capsys)
    bad = tmp_path / "missing.jsonl"
    bad.write_text(json.dumps(records()[0]) + "\n\n" + json.dumps({"prefix": "question :"}) + "\n")
    assert run(str(bad)) == 2
    err = _err(capsys)
    assert f"{bad}, line 3" in err and "'text'" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert run(str(empty)) == 2
    assert f"{empty}: empty file" in _err(capsys)
    empty_json = tmp_path / "empty.json"
    empty_json.write_text("[]")
    assert run(str(empty_json)) == 2
    assert f"{empty_json}: empty file" in _err(capsys)
    long = tmp_path / "long.json"
    long.write_text(json.dumps([records()[0], {"prefix": "question : where is rome ?", "text": "rome " * 40}]))
    assert run(str(long), "--block_size", "32") == 2
    err = _err(capsys)
    assert f"{long}, record 2" in err and "longer than --block_size 32" in err
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(records()[0]) + "\n{oops\n")
    assert run(str(broken)) == 2
    assert f"{broken}, line 2: not valid JSON" in _err(capsys)
    assert run(str(bad), "--streaming") == 2
    assert "--max-steps" in _err(capsys)


@pytest.mark.gpu
def test_train_bf16_fused_gpu(ckpt, data, tmp_path):
    out = str(tmp_path / "out")
    assert main(["train", "--model_name_or_path", ckpt, "--train_file", data, "--output_dir", out, "--max_steps",
                 "30", "--save_steps", "30", "--bf16", "--use_fused_kernels", "--gradient_checkpointing",
                 *COMMON]) == 0
    losses = read_log_losses(out)
    assert all(l == l for l in losses) and losses[-1] < 0.7 * losses[0], losses


def test_flags_take_dashes_and_the_underscore_spellings():
    """One flag style (--target-speedup) everywhere; `ulskip train` keeps transformers' and the paper's
    underscore spellings as aliases, so their commands run as they are."""
    import argparse

    from ulskip.cli import train

    def parse(*argv):
        p = argparse.ArgumentParser()
        train.add_arguments(p)
        return vars(p.parse_args(argv))
    dashed = parse("--model-name-or-path", "m", "--train-file", "d.jsonl", "--output-dir", "o",
                   "--target-speedup", "3", "--per-device-train-batch-size", "2", "--use-fused-kernels")
    under = parse("--model_name_or_path", "m", "--train_file", "d.jsonl", "--output_dir", "o",
                  "--target_speedup", "3", "--per_device_train_batch_size", "2", "--use_fused_kernels")
    assert dashed == under
    assert dashed["target_speedup"] == 3.0 and dashed["per_device_train_batch_size"] == 2
    assert dashed["use_fused_kernels"] is True


@pytest.mark.parametrize("family,prefill,strategy", [("llama", "full", "early-exit"), ("llama", "skip", "random"),
                                                     ("bloom", "full", "shortgpt"), ("llama", "full", "even"),
                                                     ("bloom", "skip", "random")])  # random seed 3: [1, 4, 5]
def test_train_infer_consistency_of_every_policy(tmp_path, family, prefill, strategy):
    """The baseline layer policies run through the same two paths as ULS: the training forward's logits
    at the response positions == the engine's decode scores of a checkpoint saved with that policy (its
    ulskip section), also where the policy keeps neither end layer."""
    import ulskip
    from transformers import AutoModelForCausalLM
    from ulskip.train import apply_uls

    model = _model_whose_layers_matter(family)
    kw = dict(target_speedup=2, strategy=strategy, prefill=prefill, layer_seed=3,
              block_influence=[0.5, 0.1, 0.9, 0.2, 0.8, 0.3])
    kept = ulskip.uls_schedule(6, 2, strategy, seed=3, block_influence=kw["block_influence"])
    assert len(kept) == 3 and (strategy == "even" or kept != [0, 3, 5])
    apply_uls(model, **kw)
    model.save_pretrained(tmp_path)
    eng = ulskip.Engine.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert eng.kept_layers == kept and eng.prefill_mode == prefill
    prefix, n = [1, 7, 9, 11, 13, 20, 5], 6
    out = eng.generate([prefix], max_new_tokens=n, output_scores=True)
    resp = out.sequences[0]
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert m.config.ulskip["strategy"] == strategy and m.config.ulskip["kept_layers"] == kept
    apply_uls(m, **kw)
    _assert_training_logits_equal_scores(m, prefix, resp, out.scores, 0)


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_train_infer_consistency_of_skipdecode(tmp_path, family):
    """SkipDecode, whose depth changes per response position: the training forward (each layer runs on
    the prefix and on the first response tokens that reach it) == the engine's decode scores, step for
    step through the changing layer sets, for a checkpoint saved with it."""
    import ulskip
    from transformers import AutoModelForCausalLM
    from ulskip.schedule import SkipDecode
    from ulskip.train import apply_uls

    model = _model_whose_layers_matter(family)
    apply_uls(model, target_speedup=2, strategy="skipdecode", skipdecode_horizon=4)  # a short response sees
    model.save_pretrained(tmp_path)                                                  # every depth
    eng = ulskip.Engine.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert eng.skipdecode == SkipDecode(6, 4, 2, 4) and eng.kept_layers == [2, 3, 4, 5]
    assert [list(eng.step_layers(j)) for j in (0, 1, 2, 3, 7)] == [[2, 3, 4, 5], [3, 4, 5], [3, 4, 5], [4, 5], [4, 5]]
    prefix, n = [1, 7, 9, 11, 13, 20, 5], 7
    out = eng.generate([prefix, prefix[:4]], max_new_tokens=n, output_scores=True)
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    apply_uls(m, target_speedup=2, strategy="skipdecode", skipdecode_horizon=4)
    for b, p in enumerate([prefix, prefix[:4]]):
        _assert_training_logits_equal_scores(m, p, out.sequences[b], out.scores, b)
    # and the depth schedule mattered: the static ULS schedule gives other scores
    static = ulskip.Engine.from_pretrained(str(tmp_path), target_speedup=2, dtype=torch.float32)
    assert not torch.allclose(static.generate([prefix], max_new_tokens=n, output_scores=True).scores[5][0],
                              out.scores[5][0], atol=1e-3)


def test_train_with_packing(ckpt, data, tmp_path, capsys):
    """--packing: fewer, fuller rows; the loss falls and the folder runs in the engine like any other."""
    import ulskip
    out = str(tmp_path / "packed")
    assert main(["train", "--model-name-or-path", ckpt, "--train-file", data, "--output-dir", out, "--packing",
                 "--block-size", "64", "--target-speedup", "2", "--max-steps", "30", "--save-steps", "30",
                 *COMMON]) == 0
    losses = read_log_losses(out)
    assert losses[-1] < 0.7 * losses[0], losses
    assert any(n.startswith("checkpoint-") for n in os.listdir(out))  # the Trainer's, at the last step
    eng = ulskip.Engine.from_pretrained(out, dtype=torch.float32)
    assert eng.kept_layers == [0, 3] and len(eng.generate([[1, 5, 7]], max_new_tokens=3).sequences[0]) == 3
    # a random draft boundary on packed rows, with several speedups (the self-speculative recipe)
    db = tmp_path / "packed-db"
    assert main(["train", "--model-name-or-path", ckpt, "--train-file", data, "--output-dir", str(db), "--packing",
                 "--block-size", "64", "--target-speedups", "1,2", "--draft-boundary", "random", "--max-steps", "4",
                 "--save-strategy", "no", *COMMON]) == 0
    # --save-strategy no: the final model alone (a study of many fine-tunes keeps 1/3 of the disk)
    assert not [n for n in os.listdir(db) if n.startswith("checkpoint-")] and (db / "model.safetensors").is_file()
    section = json.loads((db / "config.json").read_text())["ulskip"]
    assert section["draft_boundary"] == "random" and section["target_speedups"] == [1, 2]
    assert main(["train", "--model-name-or-path", ckpt, "--train-file", data, "--output-dir", str(tmp_path / "s"),
                 "--packing", "--streaming", "--max-steps", "2"]) == 2
    assert "cannot be combined with --streaming" in capsys.readouterr().err
    bloom = make_checkpoint(tmp_path / "bloom", "bloom", num_layers=2)
    assert main(["train", "--model-name-or-path", bloom, "--train-file", data, "--output-dir", str(tmp_path / "b"),
                 "--packing", "--max-steps", "2"]) == 2
    assert "--packing needs a Llama-family model" in capsys.readouterr().err


def test_train_several_speedups_resumes_with_the_same_draws(ckpt, data, tmp_path, monkeypatch, capsys):
    """--target-speedups 1,2: config.json holds the set, every micro-batch's draw is keyed by (optimizer
    step, micro-batch), a resumed run repeats the uninterrupted run's draws and weights, and the engine runs
    the default (largest) schedule or, asked, another one of the set."""
    import ulskip
    from ulskip.train.apply_uls import SpeedupDraw

    keys = []
    advance = SpeedupDraw.advance
    monkeypatch.setattr(SpeedupDraw, "advance", lambda self: keys.append(advance(self)) or keys[-1])
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    args = ["train", "--model-name-or-path", ckpt, "--train-file", data, "--target-speedups", "1,2",
            "--speedup_weights", "1,1", "--speedup-draw", "micro-batch", "--gradient-accumulation-steps", "2",
            "--save-steps", "2", *COMMON]
    assert main([*args, "--output-dir", straight, "--max-steps", "4"]) == 0
    assert "trained for speedups 1, 2 (default 2)" in capsys.readouterr().out
    assert keys == [(s, m) for s in range(4) for m in range(2)]  # the callback's counter; eval probes draw none
    drawn = [SpeedupDraw([1.0, 2.0], [1.0, 1.0], mode="micro-batch", seed=0).speedup_at(*k) for k in keys]
    assert set(drawn) == {1.0, 2.0}, drawn
    cfg = json.load(open(os.path.join(straight, "config.json")))
    assert cfg["ulskip"] == {"kept_layers": [0, 3], "num_layers": 4, "target_speedup": 2.0, "strategy": "paper",
                             "prefill": "full", "target_speedups": [1.0, 2.0], "speedup_weights": [1.0, 1.0],
                             "schedules": {"1": [0, 1, 2, 3], "2": [0, 3]}, "speedup_draw": "micro-batch"}
    keys.clear()
    assert main([*args, "--output-dir", resumed, "--max-steps", "2"]) == 0
    keys.clear()
    assert main([*args, "--output-dir", resumed, "--max-steps", "4", "--resume-from-checkpoint", "latest"]) == 0
    assert keys == [(s, m) for s in (2, 3) for m in range(2)]
    a, b = load_file(os.path.join(straight, "model.safetensors")), load_file(os.path.join(resumed, "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert ulskip.Engine.from_pretrained(straight).kept_layers == [0, 3]
    assert ulskip.Engine.from_pretrained(straight, target_speedup=1).kept_layers == [0, 1, 2, 3]
    # resuming it under another set of schedules is refused
    capsys.readouterr()
    assert main(["train", "--model-name-or-path", ckpt, "--train-file", data, "--output-dir", resumed,
                 "--max-steps", "6", "--resume-from-checkpoint", "latest", *COMMON]) == 2
    err = capsys.readouterr().err
    assert "was trained with target_speedups [1.0, 2.0], this run's flags give None" in err, err


@pytest.mark.parametrize("extra,message", [
    (["--target-speedups", "1,x"], "--target-speedups must be comma-separated numbers (e.g. 1,2,3), got '1,x'"),
    (["--target-speedups", "1,nan"], "--target-speedups must be comma-separated finite numbers >= 1"),
    (["--target-speedups", "0.5,2"], "--target-speedups must be comma-separated finite numbers >= 1"),
    (["--target-speedups", "2,1,2"], "--target-speedups must be distinct speedups (each listed once), got '2,1,2'"),
    (["--target-speedups", "1,2", "--speedup-weights", "1"], "--speedup-weights must be one weight per "
                                                             "--target-speedups value (2), got '1'"),
    (["--target-speedups", "1,2", "--speedup-weights", "1,-1"], "--speedup-weights must be comma-separated "
                                                                "finite numbers >= 0"),
    (["--target-speedups", "1,2", "--speedup-weights", "0,0"], "--speedup-weights must be weights not all 0"),
    (["--speedup-weights", "1,1"], "--speedup-weights weigh the --target-speedups: give --target-speedups too"),
    (["--target-speedup", "3", "--target-speedups", "1,2"], "--target-speedup 3 is not one of --target-speedups 1,2"),
    (["--target-speedups", "1,2", "--strategy", "skipdecode"], "--strategy skipdecode trains one per-position"),
    (["--draft-boundary", "random", "--prefill", "skip"], "--draft-boundary random moves where"),
    (["--target-speedups", "1,3"], "target_speedup must be in [1, 2] for 4 layers"),  # the schedule's own check
    (["--speedup-draw", "micro-batch"], "--speedup-draw micro-batch needs --target-speedups with at least two"),
    (["--target-speedups", "2", "--speedup-weights", "5"], "--speedup-weights 5 needs --target-speedups with at"),
])
def test_several_speedups_bad_flags(ckpt, data, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["train", "--model-name-or-path", ckpt, "--train-file", data, "--output-dir", str(out),
                 "--max-steps", "1", *extra]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ulskip train:")]
    assert len(lines) == 1 and message in lines[0], lines
    assert not out.exists()


def test_several_speedups_flag_spellings():
    import argparse

    from ulskip.cli import train
    from ulskip.train.safety import speedup_flags

    p = argparse.ArgumentParser()
    train.add_arguments(p)
    need = ["--model-name-or-path", "m", "--train-file", "d", "--output-dir", "o"]
    dashed = p.parse_args([*need, "--target-speedups", "3,1", "--speedup-weights", "1,2", "--speedup-draw",
                           "micro-batch", "--draft-boundary", "random"])
    under = p.parse_args([*need, "--target_speedups", "3,1", "--speedup_weights", "1,2", "--speedup_draw",
                          "micro-batch", "--draft_boundary", "random"])
    assert vars(dashed) == vars(under) and speedup_flags(dashed) == ([3.0, 1.0], [1.0, 2.0])
    assert speedup_flags(p.parse_args(need)) == ([2.0], None)  # no flag: 2x, as before
    assert speedup_flags(p.parse_args([*need, "--target-speedup", "3"])) == ([3.0], None)
    assert speedup_flags(p.parse_args([*need, "--target-speedup", "1", "--target-speedups", "1,2"]))[0] == [1.0, 2.0]
