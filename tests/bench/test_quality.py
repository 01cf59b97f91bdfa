"""The quality study script end to end on the CPU (tiny checkpoint, tiny data): calibrate, fine-tune per
policy, evaluate, resume, report. Its numbers mean nothing here; that it runs and resumes is the point."""
import json
import os
import sys

import pytest

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
            "base-full,ft-full,ee2,sg2,uls2-kd,sd2", "--epochs", "1", "--batch-size", "8", "--no-bf16",
            "--skipdecode-horizon", "4", "--jobs", "2"]
    quality.main(argv)
    for step in ("base-full", "ft-full", "ee2", "sg2", "uls2-kd", "sd2"):
        r = json.load(open(out / step / "eval.json"))
        assert r["records"] == 5 and r["perplexity"] > 1
    assert json.load(open(out / "ee2" / "eval.json"))["settings"]["kept_layers"] == [0, 1]
    assert json.load(open(out / "sd2" / "eval.json"))["settings"]["skipdecode"]["horizon"] == 4
    assert os.path.isfile(out / "block_influence.json") and os.path.isdir(out / "ft-full" / "ckpt")
    capsys.readouterr()
    quality.main(argv)  # resumes: every step is done already
    assert capsys.readouterr().out.count("done already") == 6
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": [
        {"system": "ulskip", "status": "ok", "num_kept": k, "prefill": "full", "batch_size": b,
         "tokens_per_s": 100.0 * 4 / k, "decode_ms_per_step": k / 4} for k in (2, 4) for b in (1, 16)]}))
    md = tmp_path / "q.md"
    quality.main(["report", str(out), "--speed", str(bench), "--md", str(md), "--plot", str(tmp_path / "q.png")])
    table = md.read_text()
    assert table.count("| xx |") == 6 and "paper + distillation" in table and "| early-exit | 2 | 2/4 | full |" in table and "2.00x / 2.00x" in table
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
    rows = [ln for ln in md.read_text().splitlines() if "multi" in ln and ln.startswith("| xx |")]
    assert len(rows) == 3 and all("| paper (multi 1,2,3) |" in r for r in rows)
    # the Table 4 view: one line per policy, a column per speedup (equal best BLEUs are both bold)
    assert "| policy (prefill) | 2x (3 kept) | 3x (2 kept) |" in md.read_text()
    assert row_of(md.read_text(), "| paper (multi 1,2,3) (full) |").endswith("| **20.0** / 30.0 | **30.0** / 30.0 |")
    assert row_of(md.read_text(), "| paper + random draft boundary (full) |").endswith("| **20.0** / 30.0 | - |")
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


def test_steps_run_at_once_after_what_they_need():
    """--jobs N: independent steps overlap (two of them meet at a barrier that only concurrent runs pass),
    a distillation step starts after ft-full and a several-speedups step after its set's first; a failure
    starts nothing new and names every failed and unstarted step."""
    import threading
    meet, order, lock = threading.Barrier(2, timeout=20), [], threading.Lock()

    def run_one(step):
        with lock:
            order.append(("start", step))
        if step in ("ee2", "sg2"):
            meet.wait()  # raises BrokenBarrierError unless both run at once
        with lock:
            order.append(("end", step))

    steps = ["uls2-kd", "multi12-s2", "ft-full", "multi12-s1", "ee2", "sg2"]
    assert quality.step_needs("uls2-kd", steps) == ["ft-full"] and quality.step_needs("multi12-s1", steps) == ["multi12-s2"]
    quality.run_steps(steps, 3, run_one)
    assert sorted(s for e, s in order if e == "end") == sorted(steps)
    assert order.index(("end", "ft-full")) < order.index(("start", "uls2-kd"))
    assert order.index(("end", "multi12-s2")) < order.index(("start", "multi12-s1"))

    order.clear()  # one at a time, the steps still run after what they need, whatever the list's order
    quality.run_steps(["uls2-kd", "ft-full"], 1, lambda step: order.append(step))
    assert order == ["ft-full", "uls2-kd"]

    def failing(step):
        if step == "ft-full":
            raise SystemExit("quality study: ft-full failed")
    with pytest.raises(SystemExit, match=r"ft-full failed\nquality study: not started: uls2-kd"):
        quality.run_steps(["ft-full", "uls2-kd"], 2, failing)


def test_reuse_checkpoints_evaluates_another_studys_fine_tunes(tmp_path, monkeypatch):
    """--reuse-checkpoints: the steps' trained checkpoints of an earlier study are evaluated (here with the
    paper's decode settings) and not trained again; the step keeps the earlier recipe; a missing one is one
    clear line. Commands recorded, not run."""
    calls = []
    monkeypatch.setattr(quality, "_run", _recording_run(calls))
    first, again = tmp_path / "greedy", tmp_path / "beam"
    base = ["run", "--model", "m", "--data", str(tmp_path / "data-xx"), "--no-bf16", "--steps", "ft-full,uls2-full"]
    quality.main(base + ["--out", str(first), "--lr", "3e-4"])
    calls.clear()
    quality.main(base + ["--out", str(again), "--paper-decode", "--reuse-checkpoints", str(first), "--jobs", "2"])
    assert [c[3] for c in calls] == ["eval", "eval"] and all("--paper-decode" in c for c in calls)
    assert sorted(c[4] for c in calls) == [str(first / "ft-full" / "ckpt"), str(first / "uls2-full" / "ckpt")]
    step = json.load(open(again / "uls2-full" / "step.json"))
    assert step["reused_from"] == str(first / "uls2-full" / "ckpt")
    assert step["train_args"][step["train_args"].index("--learning-rate") + 1] == "0.0003"
    with pytest.raises(SystemExit, match=r"uls2-full was fine-tuned on .*data-xx, not --data .*data-yy"):
        quality.main(["run", "--model", "m", "--data", str(tmp_path / "data-yy"), "--no-bf16", "--steps", "uls2-full",
                      "--out", str(tmp_path / "y"), "--reuse-checkpoints", str(first)])
    with pytest.raises(SystemExit, match="has no trained ee2"):
        quality.main(base[:-1] + ["ee2", "--out", str(tmp_path / "x"), "--reuse-checkpoints", str(first)])
    with pytest.raises(SystemExit, match="--jobs must be at least 1, got 0"):
        quality.main(base + ["--out", str(again), "--jobs", "0"])
    with pytest.raises(SystemExit, match="is not a folder"):
        quality.main(base + ["--out", str(again), "--reuse-checkpoints", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="named twice"):
        quality.main(base[:-1] + ["ee2,ee2", "--out", str(again)])


def test_report_names_recipe_and_decoding_and_skipdecode_budget(tmp_path, monkeypatch):
    """Rows of other recipes or decode settings are labelled and measured against the full fine-tune of their
    own recipe and decoding; a SkipDecode row shows (and is timed at) the layers its decode steps ran."""
    calls = []
    monkeypatch.setattr(quality, "_run", _recording_run(calls))
    data = str(tmp_path / "data-xx")
    quality.main(["run", "--model", "m", "--data", data, "--out", str(tmp_path / "a"), "--no-bf16",
                  "--steps", "ft-full,uls2-full,sd2", "--skipdecode-horizon", "18"])
    sd_train = next(c for c in calls if c[3] == "train" and "skipdecode" in c)
    assert sd_train[sd_train.index("--skipdecode-horizon") + 1] == "18"
    quality.main(["run", "--model", "m", "--data", data, "--out", str(tmp_path / "b"), "--no-bf16", "--lr", "4e-4",
                  "--epochs", "4", "--steps", "ft-full,uls2-full"])
    # the recorded eval gives BLEU 20 everywhere; make the 4-epoch full fine-tune 40, and sd2 a SkipDecode result
    ev = json.load(open(tmp_path / "b" / "ft-full" / "eval.json"))
    json.dump({**ev, "bleu": 40.0}, open(tmp_path / "b" / "ft-full" / "eval.json", "w"))
    ev = json.load(open(tmp_path / "a" / "sd2" / "eval.json"))
    ev["settings"].update(skipdecode={"max_depth": 4, "min_depth": 2, "horizon": 64}, kept_layers=[2, 3, 4, 5])
    json.dump({**ev, "decode_layers_per_step": 3.6}, open(tmp_path / "a" / "sd2" / "eval.json", "w"))
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": [
        {"system": "ulskip", "status": "ok", "num_kept": k, "prefill": "full", "batch_size": b,
         "tokens_per_s": 600.0 / k, "decode_ms_per_step": k / 6} for k in (3, 4, 6) for b in (1, 16)]}))
    md = tmp_path / "q.md"
    quality.main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--speed", str(bench), "--md", str(md),
                  "--plot", str(tmp_path / "q.png")])
    lines = md.read_text().splitlines()
    row = lambda *parts: row_of(md.read_text(), *parts)  # noqa: E731
    assert "| 100% |" in row("| paper | 2 |", "2 ep, lr 1e-4") and "| 50% |" in row("| paper | 2 |", "4 ep, lr 4e-4")
    assert "| 3.6/6 avg |" in row("| skipdecode |") and "| 1.50x / 1.50x |" in row("| skipdecode |")
    assert all(ln.endswith("| greedy |") for ln in lines[2:] if ln.startswith("| xx |"))
    # a step run again in a later folder: its row is the later run's, and the earlier one is listed
    import shutil
    shutil.copytree(tmp_path / "a" / "uls2-full", tmp_path / "c" / "uls2-full")
    ev = json.load(open(tmp_path / "c" / "uls2-full" / "eval.json"))
    json.dump({**ev, "bleu": 25.0}, open(tmp_path / "c" / "uls2-full" / "eval.json", "w"))
    quality.main(["report", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"), "--md", str(md)])
    text = md.read_text()
    assert "| 25.0 |" in row_of(text, "| paper | 2 |", "2 ep, lr 1e-4") and text.count("2 ep, lr 1e-4, 32 records | greedy |") == 3
    assert f"xx uls2-full (2 ep, lr 1e-4, 32 records, greedy) BLEU 20.00 in {tmp_path / 'a'}, 25.00 in {tmp_path / 'c'}" in text
    assert quality.recipe_name(None) == "-" and quality.decode_name({"num_beams": 4, "no_repeat_ngram_size": 3}) == \
        "beam 4, no-repeat 3"


def row_of(table: str, *parts: str) -> str:
    """The one line of a report table that holds every part."""
    (line,) = [ln for ln in table.splitlines() if all(p in ln for p in parts)]
    return line
