"""The plain / ZeRO-2 / ZeRO-3 comparison script on the CPU: the token counter, the report's arithmetic, a plain
run end to end (DeepSpeed is not a test dependency: its runs are checked only where it is installed). The
numbers mean nothing here; that the metrics are written and read back is the point."""
import json
import os
import sys

import pytest

from helpers import make_checkpoint, records, write_jsonl
from ulskip.bench import deepspeed_compare as dc


def test_counting_collator_counts_records_and_packed_rows():
    seen = []
    c = dc.CountingCollator(lambda feats: seen.append(feats) or "batch")
    a, b = {"input_ids": [1, 2, 3, 4], "prefix_length": 3}, {"input_ids": [1, 5], "prefix_length": 1}
    assert c([a, b]) == "batch" and seen == [[a, b]]
    c([[a, b], [b]])  # packed rows: lists of records
    assert c.tokens == [6, 8] and c.response_tokens == [2, 3]


def _metrics(losses, tokens_per_s=100.0):
    hist = [{"loss": v, "step": s} for s, v in losses.items()] + [{"train_runtime": 9.0, "step": max(losses)}]
    return {"deepspeed": None, "steps": max(losses), "log_history": hist, "peak_mem_GiB": 1.5, "peak_reserved_GiB": 2.0,
            "timed": {"from_step": 2, "to_step": max(losses), "tokens_per_s": tokens_per_s, "steps_per_s": 1.0}}


def test_compare_reports_the_largest_loss_gap_on_common_steps(tmp_path, capsys):
    runs = {"plain": _metrics({5: 2.0, 10: 1.5}), "zero2": _metrics({5: 2.01, 10: 1.47}, 90.0),
            "zero3": _metrics({5: 2.0, 10: 1.5, 15: 9.0})}  # step 15: not logged by plain, not compared
    for name, m in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(m))
    rows = dc.report(str(tmp_path), ["plain", "zero2", "zero3", "missing"], str(tmp_path / "compare.json"))
    by = {r["run"]: r for r in rows}
    assert by["plain"]["max_abs_loss_diff"] is None and by["plain"]["final_loss"] == 1.5
    assert by["zero2"]["max_abs_loss_diff"] == pytest.approx(0.03) and by["zero2"]["steps_compared"] == 2
    assert by["zero3"]["max_abs_loss_diff"] == 0 and by["zero3"]["final_loss"] == 9.0
    assert by["zero2"]["tokens_per_s"] == 90.0 and by["zero2"]["train_runtime_s"] == 9.0
    out = capsys.readouterr().out
    assert "| zero2 | 1 | 10 | 1.4700 | 0.0300 (2) | 90 | - | 1.00 | 1.50 (2.00) |" in out and "no metrics for missing" in out
    saved = json.load(open(tmp_path / "compare.json"))
    assert saved["meta"]["missing"] == ["missing"] and saved["losses"]["zero2"] == {"5": 2.01, "10": 1.47}


def test_several_gpus_count_every_rank_and_scale_against_the_baseline(tmp_path, capsys):
    """Rank 0 counts its own batches: the all-GPU tokens/s is that times the world size, and the scaling
    efficiency is it over world size x the one-GPU run's."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    (one / "plain.json").write_text(json.dumps(_metrics({5: 2.0}, 100.0)))
    (two / "plain.json").write_text(json.dumps({**_metrics({5: 2.0}, 90.0), "world_size": 2}))
    (two / "zero3.json").write_text(json.dumps({**_metrics({5: 2.0}, 50.0), "world_size": 2}))  # no baseline run
    rows = {r["run"]: r for r in dc.report(str(two), ["plain", "zero3"], None, str(one))}
    assert rows["plain"]["tokens_per_s"] == 180.0 and rows["plain"]["scaling_efficiency"] == pytest.approx(0.9)
    assert rows["zero3"]["tokens_per_s"] == 100.0 and rows["zero3"]["scaling_efficiency"] is None
    assert "| plain | 2 | 5 | 2.0000 | - | 180 | 90% |" in capsys.readouterr().out


def test_bad_gpus_and_baseline_are_refused(tmp_path):
    base = ["run", "--model", "m", "--train-file", "d.jsonl", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="--gpus must be an integer >= 1, got 0"):
        dc.main(base + ["--gpus", "0"])
    with pytest.raises(SystemExit, match="--baseline .* is not a folder"):
        dc.main(base + ["--baseline", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="--baseline .* is not a folder"):
        dc.main(["report", str(tmp_path), "--baseline", str(tmp_path / "none")])


def test_deepspeed_runs_go_through_torchrun():
    class A:
        timed_from, model, train_file, target_speedup, max_steps, batch_size = 10, "m", "d.jsonl", 2.0, 100, 8
        lr, block_size, logging_steps, seed, bf16, packing = 2e-4, 512, 5, 0, True, True
    plain = dc.train_command("plain", None, A, "p.json", "w/plain")
    zero3 = dc.train_command("zero3", "z3.json", A, "z.json", "w/zero3")
    assert plain[:4] == [sys.executable, "-m", "ulskip.bench.deepspeed_compare", "train"] and "--deepspeed" not in plain
    assert zero3[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--nproc_per_node" in zero3
    assert zero3[zero3.index("--deepspeed") + 1] == "z3.json"
    # the same fine-tune apart from the launcher, the config and where it writes
    same = {"z.json": "p.json", "w/zero3": "w/plain"}
    assert plain[plain.index("--metrics"):] == [same.get(x, x) for x in zero3[zero3.index("--metrics"):]]
    A.gpus = 2  # DDP: the plain run goes through torchrun too, every run on 2 processes
    ddp, zero2 = dc.train_command("plain", None, A, "p.json", "w/plain"), dc.train_command("zero2", "z2.json", A, "z.json", "w")
    for cmd in (ddp, zero2):
        assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
        assert cmd[cmd.index("--nproc_per_node") + 1] == "2"
    assert "--deepspeed" not in ddp and zero2[zero2.index("--deepspeed") + 1] == "z2.json"


def _run(tmp_path, runs):
    ckpt = make_checkpoint(tmp_path / "ckpt", "llama", num_layers=4)
    write_jsonl(tmp_path / "train.jsonl", records() * 4)
    out = tmp_path / "out"
    rc = dc.main(["run", "--model", ckpt, "--train-file", str(tmp_path / "train.jsonl"), "--out", str(out),
                  "--work", str(tmp_path / "work"), "--runs", runs, "--max-steps", "6", "--timed-from", "2",
                  "--logging-steps", "2", "--batch-size", "2", "--lr", "1e-3", "--block-size", "64", "--no-bf16"])
    return rc, out


def test_plain_run_writes_metrics_and_the_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    rc, out = _run(tmp_path, "plain")
    assert rc == 0, open(out / "plain.log").read()[-3000:]
    m = json.load(open(out / "plain.json"))
    assert m["steps"] == 6 and m["deepspeed"] is None and m["optimizer"][-1].startswith("AdamW")
    assert sorted(dc.losses(m)) == [2, 4, 6] and m["timed"]["from_step"] == 2 and m["timed"]["to_step"] == 6
    assert 0 < m["timed"]["response_tokens"] < m["timed"]["tokens"] and m["timed"]["tokens_per_s"] > 0
    rows = json.load(open(out / "compare.json"))["rows"]
    assert [r["run"] for r in rows] == ["plain"] and rows[0]["final_loss"] == dc.losses(m)[6]
    assert os.path.isfile(tmp_path / "work" / "plain" / "config.json")  # the model goes to --work, not --out
    assert "| plain | 1 | 6 |" in capsys.readouterr().out


def test_zero2_and_zero3_match_plain_in_fp32(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    rc, out = _run(tmp_path, "plain,zero2,zero3")
    assert rc == 0, "\n".join(open(out / f"{r}.log").read()[-2000:] for r in ("plain", "zero2", "zero3"))
    rows = {r["run"]: r for r in json.load(open(out / "compare.json"))["rows"]}
    for r in ("zero2", "zero3"):
        assert rows[r]["steps_compared"] == 3 and rows[r]["max_abs_loss_diff"] < 1e-4


def test_ddp_on_two_cpu_processes_against_the_one_process_baseline(tmp_path, monkeypatch):
    """--gpus 2 through the real launcher: two gloo processes on the CPU train the plain run as DDP; the
    metrics record the world size and the report scales against the one-process baseline."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rc, one = _run(tmp_path, "plain")
    assert rc == 0, open(one / "plain.log").read()[-3000:]
    ckpt, data, two = str(tmp_path / "ckpt"), str(tmp_path / "train.jsonl"), tmp_path / "two"
    rc = dc.main(["run", "--model", ckpt, "--train-file", data, "--out", str(two), "--work", str(tmp_path / "work2"),
                  "--runs", "plain", "--max-steps", "6", "--timed-from", "2", "--logging-steps", "2", "--batch-size",
                  "2", "--lr", "1e-3", "--block-size", "64", "--no-bf16", "--gpus", "2", "--baseline", str(one)])
    assert rc == 0, open(two / "plain.log").read()[-3000:]
    m = json.load(open(two / "plain.json"))
    assert m["world_size"] == 2 and m["steps"] == 6 and sorted(dc.losses(m)) == [2, 4, 6]
    row = json.load(open(two / "compare.json"))["rows"][0]
    assert row["world_size"] == 2 and row["scaling_efficiency"] > 0
    assert row["tokens_per_s"] == pytest.approx(2 * m["timed"]["tokens_per_s"])
