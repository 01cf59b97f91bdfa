"""Bad input and --jobs edge cases of the quality study script: each refused in one line before anything
runs, or reported with the other failures. Commands recorded, not run."""
import json
import os
import sys
import time

import pytest

from ulskip.bench import quality


def _recorder(calls, train_s=0.0):
    """A stand-in for quality._run: train makes an empty checkpoint (after train_s seconds), eval a result."""
    def run(cmd, log):
        calls.append(cmd)
        assert cmd[:3] == [sys.executable, "-m", "ulskip.cli"]
        if cmd[3] == "train":
            time.sleep(train_s)
            ckpt = cmd[cmd.index("--output-dir") + 1]
            os.makedirs(ckpt, exist_ok=True)
            with open(os.path.join(ckpt, "config.json"), "w") as f:
                f.write("{}")
        else:
            with open(cmd[cmd.index("--json") + 1], "w") as f:
                json.dump({"bleu": 20.0, "chrf": 30.0, "perplexity": 2.0,
                           "settings": {"kept_layers": [0, 1, 2], "num_layers": 6}}, f)
        return 1.0
    return run


def _base(tmp_path, *steps):
    return ["run", "--model", "m", "--data", str(tmp_path / "data-xx"), "--no-bf16", "--steps", ",".join(steps)]


@pytest.mark.parametrize("horizon", ["0", "1", "-3"])
def test_skipdecode_horizon_below_two_is_refused_up_front(tmp_path, monkeypatch, horizon):
    """0 used to be dropped silently (the steps trained with horizon 64); 1 failed inside `ulskip train`."""
    calls = []
    monkeypatch.setattr(quality, "_run", _recorder(calls))
    out = tmp_path / "study"
    with pytest.raises(SystemExit, match=f"--skipdecode-horizon must be an integer >= 2 .*got {horizon}$"):
        quality.main(_base(tmp_path, "sd2") + ["--out", str(out), "--skipdecode-horizon", horizon])
    assert calls == [] and not out.exists()


def test_steps_naming_no_step_is_refused(tmp_path):
    out = tmp_path / "study"
    with pytest.raises(SystemExit, match="--steps ' , ' names no step"):
        quality.main(_base(tmp_path) + ["--steps", " , ", "--out", str(out)])
    assert not out.exists()


def test_reuse_is_checked_before_any_step_runs(tmp_path, monkeypatch):
    """A reused step whose study has its checkpoint but no step.json (its eval never ran), or a several-speedups
    step, is one line before anything runs (a traceback, or after the earlier steps ran, before); an earlier
    study's step.json without "variant" is reused."""
    calls = []
    monkeypatch.setattr(quality, "_run", _recorder(calls))
    first = tmp_path / "first"
    for s in ("ee2", "sg2"):
        os.makedirs(first / s / "ckpt")
        (first / s / "ckpt" / "config.json").write_text("{}")
    (first / "ee2" / "step.json").write_text(json.dumps({"name": "ee2", "train_args": ["--learning-rate", "1"]}))
    again = tmp_path / "again"
    reuse = ["--out", str(again), "--reuse-checkpoints", str(first)]
    with pytest.raises(SystemExit, match=r"has no trained sg2 \(.*sg2/step.json missing\)$"):
        quality.main(_base(tmp_path, "ee2", "sg2") + reuse)
    with pytest.raises(SystemExit, match=r"does not take several-speedups steps \(multi12-s1\)"):
        quality.main(_base(tmp_path, "ee2", "multi12-s1") + reuse)
    assert calls == [] and not again.exists()
    quality.main(_base(tmp_path, "ee2") + reuse + ["--jobs", "2"])
    step = json.loads((again / "ee2" / "step.json").read_text())
    assert [c[3] for c in calls] == ["eval"] and step["variant"] == [] and step["train_args"] == ["--learning-rate", "1"]


def test_run_steps_reports_every_failure_whatever_its_kind():
    """--jobs N: a step's own error (not a SystemExit) used to escape at once, losing the other failures and
    the list of steps never started."""
    def one(step):
        if step == "ee2":
            raise FileNotFoundError("no such file: x/step.json")
        if step == "sg2":
            time.sleep(0.2)
            raise SystemExit("quality study: sg2 failed")
    with pytest.raises(SystemExit) as e:
        quality.run_steps(["ee2", "sg2", "rnd2"], 2, one)
    assert str(e.value).splitlines() == ["quality study: step ee2 failed: FileNotFoundError: no such file: x/step.json",
                                         "quality study: sg2 failed", "quality study: not started: rnd2"]


def test_several_speedups_set_trains_once_when_its_first_step_was_done(tmp_path, monkeypatch):
    """--jobs N: the set's first step done earlier and its checkpoint gone (removed for disk space): the set's
    other steps start at once, and used to train the shared checkpoint twice into the same folder."""
    calls = []
    monkeypatch.setattr(quality, "_run", _recorder(calls, train_s=0.3))
    out = tmp_path / "study"
    os.makedirs(out / "multi123-s1")
    (out / "multi123-s1" / "eval.json").write_text("{}")
    quality.main(_base(tmp_path, "multi123-s1", "multi123-s2", "multi123-s3") + ["--out", str(out), "--jobs", "3"])
    assert [c[3] for c in calls].count("train") == 1 and [c[3] for c in calls].count("eval") == 2


def test_report_refuses_what_holds_no_results(tmp_path):
    """An empty folder (or the parent of the study folders) used to give an empty table and plot, rc 0; a
    missing folder or a file, a traceback."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    md = tmp_path / "q.md"
    with pytest.raises(SystemExit, match=f"no results in {tmp_path / 'empty'} "):
        quality.main(["report", str(tmp_path / "empty"), "--md", str(md), "--plot", str(tmp_path / "q.png")])
    with pytest.raises(SystemExit, match=f"not a folder: {tmp_path / 'nowhere'}, {tmp_path / 'file'}$"):
        quality.main(["report", str(tmp_path / "nowhere"), str(tmp_path / "file")])
    assert not md.exists() and not (tmp_path / "q.png").exists()


def test_report_refuses_a_missing_speed_file(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(quality, "_run", _recorder(calls))
    quality.main(_base(tmp_path, "ee2") + ["--out", str(tmp_path / "s")])
    with pytest.raises(SystemExit, match=r"report --speed: no such file: .*nope.json"):
        quality.main(["report", str(tmp_path / "s"), "--speed", str(tmp_path / "nope.json")])
