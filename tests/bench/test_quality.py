"""The quality study script end to end on the CPU (tiny checkpoint, tiny data): calibrate, fine-tune per
policy, evaluate, resume, report. Its numbers mean nothing here; that it runs and resumes is the point."""
import json
import os
import sys

from helpers import make_checkpoint, records, write_jsonl
from ulskip.bench import quality


def test_study_runs_resumes_and_reports(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt", "llama", num_layers=4)
    data = tmp_path / "data-xx"
    data.mkdir()
    recs = [{**r, "reference": r["text"]} for r in records()]
    write_jsonl(data / "train.jsonl", recs * 2)
    write_jsonl(data / "test.jsonl", recs[:5])
    out = tmp_path / "study"
    argv = ["run", "--model", ckpt, "--data", str(data), "--out", str(out), "--steps",
            "base-full,ft-full,ee2,sg2,uls2-kd", "--epochs", "1", "--batch-size", "8", "--no-bf16"]
    quality.main(argv)
    for step in ("base-full", "ft-full", "ee2", "sg2", "uls2-kd"):
        r = json.load(open(out / step / "eval.json"))
        assert r["records"] == 5 and r["perplexity"] > 1
    assert json.load(open(out / "ee2" / "eval.json"))["settings"]["kept_layers"] == [0, 1]
    assert os.path.isfile(out / "block_influence.json") and os.path.isdir(out / "ft-full" / "ckpt")
    capsys.readouterr()
    quality.main(argv)  # resumes: every step is done already
    assert capsys.readouterr().out.count("done already") == 5
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": [
        {"system": "ulskip", "status": "ok", "num_kept": k, "prefill": "full", "batch_size": b,
         "tokens_per_s": 100.0 * 4 / k, "decode_ms_per_step": k / 4} for k in (2, 4) for b in (1, 16)]}))
    md = tmp_path / "q.md"
    quality.main(["report", str(out), "--speed", str(bench), "--md", str(md), "--plot", str(tmp_path / "q.png")])
    table = md.read_text()
    assert table.count("| xx |") == 5 and "paper + distillation" in table and "| early-exit | 2 | 2/4 | full |" in table and "2.00x / 2.00x" in table
    assert os.path.getsize(tmp_path / "q.png") > 0


def _recording_run(calls):
    """A stand-in for quality._run that records each command: train makes an empty checkpoint, eval writes
    a result whose BLEU is 10 x the step's speedup (2 for a step that evaluates the checkpoint's own)."""
    from ulskip import uls_schedule

    def run(cmd, log):
        calls.append(cmd)
        assert cmd[:3] == [sys.executable, "-m", "ulskip.cli"]
        if cmd[3] == "train":
            ckpt = cmd[cmd.index("--output-dir") + 1]
            os.makedirs(ckpt, exist_ok=True)
            open(os.path.join(ckpt, "config.json"), "w").write("{}")
        else:
            s = float(cmd[cmd.index("--target-speedup") + 1]) if "--target-speedup" in cmd else 2.0
            with open(cmd[cmd.index("--json") + 1], "w") as f:
                json.dump({"bleu": 10 * s, "chrf": 30.0, "perplexity": 2.0,
                           "settings": {"kept_layers": uls_schedule(6, s), "num_layers": 6}}, f)
        return 1.5
    return run


def test_multi_speedup_steps_train_once_and_report(tmp_path, monkeypatch, capsys):
    """multi123-s1/-s2/-s3: one `ulskip train --target-speedups 1,2,3` into STUDY/multi123/ckpt, then each
    step evaluates that checkpoint with its own --target-speedup; resuming skips both, and the report names
    the policy "paper (multi 1,2,3)". The commands are recorded, not run (the real ones run in the test above)."""
    calls = []
    monkeypatch.setattr(quality, "_run", _recording_run(calls))
    out = tmp_path / "study"
    argv = ["run", "--model", "m", "--data", str(tmp_path / "data-xx"), "--out", str(out), "--steps",
            "multi123-s1,multi123-s2,multi123-s3,uls2-db", "--no-bf16"]
    quality.main(argv)
    train = [c for c in calls if c[3] == "train"]
    ckpt = str(out / "multi123" / "ckpt")
    assert len(train) == 2 and train[1][-2:] == ["--draft-boundary", "random"]
    assert train[0][train[0].index("--target-speedups") + 1] == "1,2,3"
    assert "--target-speedup" not in train[0] and train[0][train[0].index("--output-dir") + 1] == ckpt
    evals = [c for c in calls if c[3] == "eval"][:3]
    assert [(c[4], c[c.index("--target-speedup") + 1]) for c in evals] == [(ckpt, "1"), (ckpt, "2"), (ckpt, "3")]
    for s in (1, 2, 3):
        step = json.load(open(out / f"multi123-s{s}" / "step.json"))
        assert step["multi"] == [1, 2, 3] and step["target_speedup"] == s and step["train_s"] == 1.5
    os.remove(out / "multi123-s2" / "eval.json")  # one eval lost: evaluated again, not trained again
    calls.clear()
    quality.main(argv)
    assert [c[3] for c in calls] == ["eval"] and capsys.readouterr().out.count("done already") == 3
    md = tmp_path / "q.md"
    quality.main(["report", str(out), "--md", str(md)])
    rows = [ln for ln in md.read_text().splitlines() if "multi" in ln]
    assert len(rows) == 3 and all("| paper (multi 1,2,3) |" in r for r in rows)
    assert "| 2 | 3/6 | full | 20.0 |" in rows[1] and "| paper + random draft boundary | 2 |" in md.read_text()
    assert quality.multi_set("multi123-s2") == "multi123" and quality.multi_set("uls2-skip") is None


def test_auxiliary_loss_steps(tmp_path, monkeypatch):
    """uls2-aux and multi12aux-s1/-s2 train with the auxiliary-loss flags (once for the set) and report as
    their own policies. Commands recorded, not run."""
    calls = []
    monkeypatch.setattr(quality, "_run", _recording_run(calls))
    out = tmp_path / "study"
    quality.main(["run", "--model", "m", "--data", str(tmp_path / "data-xx"), "--out", str(out), "--steps",
                  "multi12aux-s1,multi12aux-s2,uls2-aux", "--no-bf16"])
    train = [c for c in calls if c[3] == "train"]
    assert len(train) == 2 and all(c[-4:] == quality.AUX_ARGS for c in train)
    assert train[0][train[0].index("--target-speedups") + 1] == "1,2"
    assert json.load(open(out / "multi12aux-s2" / "step.json"))["variant"] == quality.AUX_ARGS
    md = tmp_path / "q.md"
    quality.main(["report", str(out), "--md", str(md)])
    text = md.read_text()
    assert text.count("| paper (multi 1,2) + auxiliary losses |") == 2
    assert "| paper + auxiliary losses | 2 |" in text
    # multi12db: the several-speedups set with a random draft boundary (packed rows allowed), its own label
    calls.clear()
    quality.main(["run", "--model", "m", "--data", str(tmp_path / "data-xx"), "--out", str(out), "--steps",
                  "multi12db-s1,multi12db-s2", "--no-bf16", "--packing"])
    train = [c for c in calls if c[3] == "train"]
    assert len(train) == 1 and train[0][-2:] == quality.DB_ARGS and "--packing" in train[0]
    quality.main(["report", str(out), "--md", str(md)])
    assert md.read_text().count("| paper (multi 1,2) + random draft boundary |") == 2
