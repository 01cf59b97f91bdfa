"""`ulskip train` under faults (ulskip/train/safety.py, the guards in ulskip/train/trainer.py), by class of
fault: a diverging run (non-finite loss, gradient norm or weights), a zero-step run, bad numbers, a missing
model folder, a save cut short (resume from the newest complete checkpoint), an existing output folder;
every expected error is one line `ulskip train: <message>` with exit code 2, --debug raises instead, and
the files are left as stated: a diverged, refused or failed run never leaves a servable model behind."""
import json
import os
import shutil

import pytest
import torch

from helpers import make_checkpoint, records, write_jsonl, write_train_data
from ulskip.cli import main
from ulskip.train import safety

FAST = ["--per-device-train-batch-size", "4", "--warmup-ratio", "0", "--lr-scheduler-type", "constant",
        "--logging-steps", "1", "--seed", "0"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama", num_layers=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_train_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def three_checkpoints(ckpt, data, tmp_path_factory):
    """A finished 3-step run with checkpoint-1..3 (every save complete) and the top-level model."""
    out = str(tmp_path_factory.mktemp("three") / "out")
    assert train(ckpt, data, out, "--max-steps", "3", "--save-steps", "1") == 0
    return out


def train(ckpt, data, out, *extra):
    return main(["train", "--model-name-or-path", ckpt, "--train-file", data, "--output-dir", str(out), *FAST,
                 *extra])


def error_line(capsys) -> str:
    """The one `ulskip train:` line of stderr (tqdm bars of the weight loading may share stderr)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("ulskip train:")]  # (a line of its own)
    lines = [ln for ln in lines if not ln.startswith("ulskip train: warning:")]
    assert len(lines) == 1, err
    return lines[0]


def snapshot(folder):
    """Every path under folder with its size and mtime: 'left exactly as it was'."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for n in dirs + files:
            p = os.path.join(root, n)
            st = os.stat(p)
            out[os.path.relpath(p, folder)] = (st.st_size if n in files else None, st.st_mtime_ns)
    return out


def assert_not_servable(out):
    """No top-level model: the engine refuses the folder (it does not run an old model)."""
    import ulskip

    assert not os.path.exists(os.path.join(out, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        ulskip.Engine.from_pretrained(str(out))


# ------------------------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("case,extra,culprit", [
    # step 1's update (lr 1e30) makes the weights ~1e30: step 2's loss is NaN; stopped before step 2's update
    ("loss", ["--max-steps", "3", "--save-steps", "100"], "the training loss is nan at step 2"),
    # the update of the last step before a save: the checkpoint's probe loss is NaN, nothing is saved
    ("checkpoint", ["--max-steps", "3", "--save-steps", "1"], "after step 1"),
    ("last-step", ["--max-steps", "1"], "after step 1"),
])
def test_diverged_run_saves_nothing(ckpt, data, tmp_path, capsys, case, extra, culprit):
    out = tmp_path / "out"
    assert train(ckpt, data, out, "--learning-rate", "1e30", *extra) == 2
    line = error_line(capsys)
    assert culprit in line and "nan" in line and "diverged" in line and "--learning-rate" in line, line
    assert_not_servable(out)
    assert not safety.list_checkpoints(str(out))  # the only save (step 1) was diverged already
    assert not [n for n in os.listdir(out) if n.startswith(safety.TMP_PREFIX)]


def test_nonfinite_gradient_norm_stops(ckpt, data, tmp_path, capsys, monkeypatch):
    """A finite loss with an infinite gradient: the logged grad_norm (max_grad_norm 1.0, --logging-steps 1)
    stops the run at that step, before its checkpoint save."""
    from ulskip.train import trainer as T

    build = T.build_trainer

    def poisoned(args):
        trainer, model, tok = build(args)
        model.lm_head.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
        return trainer, model, tok

    monkeypatch.setattr(T, "build_trainer", poisoned)
    out = tmp_path / "out"
    assert train(ckpt, data, out, "--max-steps", "2", "--save-steps", "1") == 2
    line = error_line(capsys)
    assert "gradient norm is inf at step 1" in line, line
    assert_not_servable(out)
    assert not safety.list_checkpoints(str(out))


def test_nonfinite_parameter_names_the_tensor():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    assert safety.nonfinite_parameter(model) is None
    with torch.no_grad():
        model[1].bias[2] = float("inf")
    assert safety.nonfinite_parameter(model) == "1.bias"


# ------------------------------------------------------------------------------------------- zero steps
@pytest.mark.parametrize("extra,culprit", [
    (["--num-train-epochs", "0"], "--num-train-epochs 0 trains zero steps"),
    (["--max-steps", "0"], "--max-steps must be >= 1, or -1"),
    (["--max-steps", "-1", "--num-train-epochs", "0.0"], "--num-train-epochs 0 trains zero steps"),
    ("empty-data", "empty file"),
])
def test_zero_step_run_refused(ckpt, tmp_path, capsys, extra, culprit):
    data = str(tmp_path / "d.jsonl")
    write_jsonl(data, records()[:4])
    if extra == "empty-data":
        data = str(tmp_path / "empty.json")
        with open(data, "w") as f:
            f.write("[]")
        extra = []
    out = tmp_path / "out"
    assert train(ckpt, data, out, *extra) == 2
    assert culprit in error_line(capsys)
    assert not out.exists()  # refused before anything was written


# ------------------------------------------------------------------------------------------- bad numbers
@pytest.mark.parametrize("flag,value,allowed", [
    ("--learning-rate", "nan", "a finite number > 0"), ("--learning-rate", "inf", "a finite number > 0"),
    ("--learning-rate", "0", "a finite number > 0"), ("--learning-rate", "-1e-4", "a finite number > 0"),
    ("--weight-decay", "-0.1", "a finite number >= 0"), ("--weight-decay", "nan", "a finite number >= 0"),
    ("--num-train-epochs", "nan", "a finite number"), ("--num-train-epochs", "-1", "a finite number"),
    ("--num-train-epochs", "inf", "a finite number"), ("--max-steps", "-2", ">= 1, or -1"),
    ("--warmup-ratio", "1", "in [0, 1)"), ("--warmup-ratio", "nan", "in [0, 1)"),
    ("--target-speedup", "nan", "a finite number >= 1"),
    ("--dataloader-num-workers", "-1", "an integer >= 0"), ("--save-steps", "0", "an integer >= 1"),
    ("--logging-steps", "0", "an integer >= 1"), ("--save-total-limit", "0", "an integer >= 1"),
    ("--per-device-train-batch-size", "0", "an integer >= 1"),
    ("--gradient-accumulation-steps", "0", "an integer >= 1"),
    ("--block-size", "0", "an integer >= 1"), ("--seed", "-1", "an integer in [0, 2**32)"),
    ("--lr-scheduler-type", "bogus", "one of linear, cosine"),
])
def test_bad_number_refused(ckpt, data, tmp_path, capsys, flag, value, allowed):
    out = tmp_path / "out"
    assert train(ckpt, data, out, f"{flag}={value}") == 2
    line = error_line(capsys)
    assert line.startswith(f"ulskip train: {flag} must be {allowed}"), line
    got = {"-1e-4": "-0.0001", "bogus": "'bogus'"}.get(value, value)
    assert line.endswith(f", got {got}"), line
    assert not out.exists()


@pytest.mark.parametrize("extra", [["--save-steps", "10"], ["--save-total-limit", "2"]])
def test_checkpoint_flags_refused_without_checkpoints(ckpt, data, tmp_path, capsys, extra):
    """--save-strategy no writes no checkpoint-N: a --save-steps or --save-total-limit beside it would be
    ignored silently, so it is refused."""
    out = tmp_path / "out"
    assert train(ckpt, data, out, "--save-strategy", "no", *extra) == 2
    assert error_line(capsys) == (f"ulskip train: {extra[0]} {extra[1]} has no effect with --save-strategy no, "
                                  "which writes no checkpoint-N: give one of the two")
    assert not out.exists()


@pytest.mark.parametrize("flag,value,culprit", [("--dataloader-num-workers", "-1", "num_workers"),
                                                ("--learning-rate", "nan", "learning rate")])
def test_trainer_errors_that_slip_through_are_one_line(ckpt, data, tmp_path, capsys, monkeypatch, flag, value,
                                                       culprit):
    """With our checks off, transformers / torch refuse the value inside trainer.train() (DataLoader,
    optimizer): still one line, exit 2, and no model."""
    monkeypatch.setattr(safety, "check_args", lambda args: None)
    out = tmp_path / "out"
    assert train(ckpt, data, out, "--max-steps", "2", flag, value) == 2
    line = error_line(capsys)
    assert "before its first step" in line and culprit in line.lower(), line
    assert_not_servable(out)


def test_bad_flag_syntax_is_one_line(ckpt, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train(ckpt, data, tmp_path / "out", "--learning-rate", "fast")
    assert e.value.code == 2
    line = error_line(capsys)
    assert "--learning-rate" in line and "'fast'" in line, line


def test_every_flag_states_its_default():
    import argparse

    from ulskip.cli import train as cli_train

    p = argparse.ArgumentParser()
    cli_train.add_arguments(p)
    for a in p._actions:
        if a.dest != "help":
            assert ("default" in (a.help or "")) != a.required, a.option_strings  # required: no default


# ------------------------------------------------------------------------------------------- model folder
@pytest.mark.parametrize("case", ["missing", "no-config", "file"])
def test_model_folder_must_be_local_checkpoint(data, tmp_path, capsys, case):
    path = tmp_path / "model"
    if case == "no-config":
        path.mkdir()
        (path / "tokenizer.json").write_text("{}")
    elif case == "file":
        path.write_text("not a folder")
    out = tmp_path / "out"
    assert train(str(path), data, out) == 2
    line = error_line(capsys)
    assert f"--model-name-or-path {str(path)!r}" in line and "local checkpoint folder" in line, line
    assert {"missing": "no such folder", "no-config": "no config.json", "file": "not a folder"}[case] in line
    assert "repo" not in line.lower()  # not taken for a Hub repo id
    assert not out.exists()


# ------------------------------------------------------------------------------------------- interrupted save
@pytest.mark.parametrize("damage,problem", [
    ("trainer_state.json", "missing trainer_state.json"),
    ("model.safetensors", "missing the model weights"),
    ("optimizer.pt", "missing optimizer.pt"),
    ("scheduler.pt", "missing scheduler.pt"),
    ("cut:trainer_state.json", "trainer_state.json is cut short"),
    ("shard", "missing weight shard model-00002-of-00002.safetensors"),
])
def test_checkpoint_problems(three_checkpoints, tmp_path, damage, problem):
    c = tmp_path / "checkpoint-3"
    shutil.copytree(os.path.join(three_checkpoints, "checkpoint-3"), c)
    c = str(c)
    assert safety.checkpoint_problems(c) == [] and safety.is_complete_checkpoint(c)
    if damage.startswith("cut:"):
        path = tmp_path / "checkpoint-3" / damage[4:]
        path.write_text(path.read_text()[: len(path.read_text()) // 2])
    elif damage == "shard":
        os.remove(os.path.join(c, "model.safetensors"))
        with open(os.path.join(c, "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                      "b": "model-00002-of-00002.safetensors"}}, f)
        (tmp_path / "checkpoint-3" / "model-00001-of-00002.safetensors").write_bytes(b"x")
    else:
        os.remove(os.path.join(c, damage))
    problems = safety.checkpoint_problems(c)
    assert len(problems) == 1 and problems[0].startswith(problem), problems
    assert not safety.is_complete_checkpoint(c)


def test_resume_latest_skips_partial_checkpoint(ckpt, data, three_checkpoints, tmp_path, capsys):
    out = str(tmp_path / "out")
    shutil.copytree(three_checkpoints, out)
    os.remove(os.path.join(out, "checkpoint-3", "trainer_state.json"))     # killed while saving step 3
    os.makedirs(os.path.join(out, safety.TMP_PREFIX + "checkpoint-4", "checkpoint-4"))  # and a temp folder
    assert train(ckpt, data, out, "--max-steps", "4", "--save-steps", "1", "--resume-from-checkpoint", "latest") == 0
    err = capsys.readouterr().err
    assert f"skipping the partial {os.path.join(out, 'checkpoint-3')}" in err and "resuming from checkpoint-2" in err
    for n in (3, 4):  # step 3 saved again (complete), step 4 new
        assert safety.is_complete_checkpoint(os.path.join(out, f"checkpoint-{n}"))
    with open(os.path.join(out, "checkpoint-4", "trainer_state.json")) as f:
        assert json.load(f)["global_step"] == 4
    assert not [n for n in os.listdir(out) if n.startswith(safety.TMP_PREFIX)]
    import ulskip
    assert ulskip.Engine.from_pretrained(out).kept_layers == [0, 3]


def test_resume_when_every_checkpoint_is_partial(ckpt, data, three_checkpoints, tmp_path, capsys):
    out = str(tmp_path / "out")
    shutil.copytree(three_checkpoints, out)
    for n in (1, 2, 3):
        os.remove(os.path.join(out, f"checkpoint-{n}", "optimizer.pt"))
    before = snapshot(out)
    assert train(ckpt, data, out, "--max-steps", "4", "--resume-from-checkpoint", "latest") == 2
    line = error_line(capsys)
    assert "no complete checkpoint" in line and "checkpoint-1: missing optimizer.pt" in line, line
    assert "checkpoint-3" in line
    assert train(ckpt, data, out, "--max-steps", "4", "--resume-from-checkpoint",
                 os.path.join(out, "checkpoint-2")) == 2
    assert "checkpoint-2': not a complete checkpoint (missing optimizer.pt)" in error_line(capsys)
    assert snapshot(out) == before


def test_kill_during_save_leaves_no_partial_checkpoint(ckpt, data, tmp_path, monkeypatch):
    """Checkpoints are written into a temporary folder and renamed: a save that dies after the weights
    (here: an exception in place of the optimizer state of step 2) leaves checkpoint-1 and no checkpoint-2;
    resuming latest continues from checkpoint-1 and clears the leftover."""
    from transformers import Trainer

    out = str(tmp_path / "out")
    real = Trainer._save_optimizer_and_scheduler

    def dies_at_step_2(self, output_dir):
        if self.state.global_step == 2:
            assert not os.path.exists(os.path.join(out, "checkpoint-2"))  # written elsewhere meanwhile
            raise RuntimeError("killed while saving")
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", dies_at_step_2)
    with pytest.raises(RuntimeError, match="killed while saving"):
        train(ckpt, data, out, "--max-steps", "3", "--save-steps", "1")
    assert safety.list_checkpoints(out) == [os.path.join(out, "checkpoint-1")]
    assert safety.is_complete_checkpoint(os.path.join(out, "checkpoint-1"))
    assert_not_servable(out)
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", real)
    assert train(ckpt, data, out, "--max-steps", "3", "--save-steps", "1", "--resume-from-checkpoint", "latest") == 0
    assert [os.path.basename(c) for c in safety.list_checkpoints(out)] == ["checkpoint-3", "checkpoint-2",
                                                                          "checkpoint-1"]
    assert not [n for n in os.listdir(out) if n.startswith(safety.TMP_PREFIX)]
    args = torch.load(os.path.join(out, "checkpoint-2", "training_args.bin"), weights_only=False)
    assert args.output_dir == out  # the temporary folder does not leak into the saved arguments


def test_save_total_limit_keeps_newest_complete(ckpt, data, tmp_path):
    out = str(tmp_path / "out")
    assert train(ckpt, data, out, "--max-steps", "3", "--save-steps", "1", "--save-total-limit", "2") == 0
    assert sorted(os.listdir(out)) == sorted(["checkpoint-2", "checkpoint-3", "config.json", "generation_config.json",
                                              "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                              "training_args.bin"])


# ------------------------------------------------------------------------------------------- existing output
def test_existing_output_refused_and_untouched(ckpt, data, three_checkpoints, tmp_path, capsys):
    out = str(tmp_path / "out")
    shutil.copytree(three_checkpoints, out)
    before = snapshot(out)
    assert train(ckpt, data, out, "--max-steps", "2", "--prefill", "skip") == 2
    line = error_line(capsys)
    assert f"--output-dir {out!r} is not empty" in line and "--overwrite-output-dir" in line, line
    assert snapshot(out) == before
    # bad data is found while building the data set, before --overwrite-output-dir removes anything
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prefix": "question :"}])
    assert train(ckpt, bad, out, "--max-steps", "2", "--overwrite-output-dir") == 2
    assert f"{bad}, line 1" in error_line(capsys)
    assert snapshot(out) == before
    # overwrite + resume from the folder would delete what it resumes
    assert train(ckpt, data, out, "--overwrite-output-dir", "--resume-from-checkpoint", "latest") == 2
    assert "--overwrite-output-dir would delete" in error_line(capsys)
    # the model folder itself
    assert train(ckpt, data, ckpt, "--overwrite-output-dir") == 2
    assert "is the --model-name-or-path folder" in error_line(capsys)
    assert snapshot(out) == before


def test_overwrite_removes_old_model_before_training(ckpt, data, three_checkpoints, tmp_path, monkeypatch):
    from ulskip.train import trainer as T

    out = str(tmp_path / "out")
    shutil.copytree(three_checkpoints, out)
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("mine")
    seen = {}
    real_train = T.train

    def spy(trainer, resume):
        seen["at_start"] = sorted(os.listdir(out))
        return real_train(trainer, resume)

    monkeypatch.setattr(T, "train", spy)
    assert train(ckpt, data, out, "--max-steps", "2", "--prefill", "skip", "--overwrite-output-dir") == 0
    assert seen["at_start"] == ["notes.txt"]  # old model, tokenizer and checkpoints gone before step 1
    assert sorted(safety.list_checkpoints(out)) == [os.path.join(out, "checkpoint-2")]
    import ulskip
    assert ulskip.Engine.from_pretrained(out).prefill_mode == "skip"


def test_failing_second_run_cannot_serve_first_model(ckpt, data, three_checkpoints, tmp_path, capsys):
    out = str(tmp_path / "out")
    shutil.copytree(three_checkpoints, out)
    assert train(ckpt, data, out, "--max-steps", "3", "--prefill", "skip", "--learning-rate", "1e30",
                 "--overwrite-output-dir") == 2
    assert "diverged" in error_line(capsys)
    assert_not_servable(out)
    assert not safety.list_checkpoints(out)


# ------------------------------------------------------------------------------------------- --debug
def test_debug_raises_with_traceback(ckpt, data, tmp_path, capsys):
    with pytest.raises(safety.TrainError, match="--learning-rate must be a finite number > 0"):
        train(ckpt, data, tmp_path / "out", "--learning-rate", "nan", "--debug")
    with pytest.raises(safety.DivergedError, match="at step 2"):
        train(ckpt, data, tmp_path / "out2", "--learning-rate", "1e30", "--max-steps", "3", "--debug")
    assert "ulskip train:" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- publish
def test_publish_replaces_old_model_files_last_config(tmp_path):
    out, tmp = tmp_path / "out", tmp_path / "out" / safety.TMP_MODEL
    tmp.mkdir(parents=True)
    for n in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp / n).write_text("new")
    for n in ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
              "model.safetensors.index.json", "tokenizer.json", "notes.txt"):
        (out / n).write_text("old")
    safety.publish(str(tmp), str(out))
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "notes.txt", "tokenizer.json"]
    assert (out / "config.json").read_text() == "new" and (out / "notes.txt").read_text() == "old"
