"""The speculative bench script end to end on the CPU: a real-checkpoint run (acceptance, identity to the
all-layers baseline), a cost run on a named shape projected at that acceptance, and `ulskip bench
--systems speculative`. Their numbers mean nothing here; that they run and report consistently is the point."""
import json

import pytest

from helpers import make_checkpoint, records, write_jsonl
from ulskip.bench import speculative
from ulskip.cli import main


def test_real_and_cost_runs(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt", "llama", num_layers=4)
    write_jsonl(tmp_path / "test.jsonl", records()[:6])
    real = tmp_path / "real.json"
    assert speculative.main(["real", "--model", ckpt, "--data", str(tmp_path / "test.jsonl"), "--batch-sizes", "1,4",
                             "--draft-speedups", "2", "--num-draft-tokens", "2,3", "--max-new-tokens", "8",
                             "--device", "cpu", "--dtype", "fp32", "--json", str(real), "--quiet-warnings", "--max-seq-len", "128"]) == 0
    result = json.load(open(real))
    assert result["meta"]["complete"] is True and result["meta"]["dtype"] == "float32"  # what ran
    rows = result["rows"]
    spec = [r for r in rows if r["system"] == "speculative"]
    assert len(spec) == 4 and all(r["identical_sequences"] == r["sequences"] == 6 for r in spec)  # fp32: exact
    base = [r for r in rows if r["system"] == "all layers"]
    assert [r["identical_to_first_batch"] for r in base] == [6, 6]  # fp32 greedy: batch-invariant
    assert all(1 <= r["tokens_per_verify"] <= r["num_draft_tokens"] + 1 for r in spec)
    cost = tmp_path / "cost.json"
    assert speculative.main(["cost", "--model", "tiny-llama", "--device", "cpu", "--dtype", "fp32", "--batch-sizes", "1,4",
                             "--draft-speedups", "2", "--num-draft-tokens", "2,3", "--prompt-len", "8",
                             "--new-tokens", "12", "--acceptance", str(real), "--json", str(cost)]) == 0
    crow = [r for r in json.load(open(cost))["rows"] if r["system"] == "speculative"]
    assert len(crow) == 4 and all(r["ms_per_round"] > 0 and r["projected_speedup"] > 0 for r in crow)
    capsys.readouterr()
    assert speculative.main(["project", "--cost", str(cost), "--acceptance", str(real)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + 4 and all(line.endswith("x |") for line in table[2:])  # every row projected


def test_real_keeps_finished_rows_when_stopped(tmp_path, monkeypatch):
    """A run its time limit kills (the H200's stage timeout) keeps the rows it finished, marked incomplete."""
    ckpt = make_checkpoint(tmp_path / "ckpt", "llama", num_layers=4)
    write_jsonl(tmp_path / "test.jsonl", records()[:4])
    real, calls, generate = tmp_path / "real.json", [], speculative._generate

    def stop_on_the_fifth(*a, **kw):  # warm-up + 2 repeats of all layers, then the first speculative row's 3
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return generate(*a, **kw)
    monkeypatch.setattr(speculative, "_generate", stop_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        speculative.main(["real", "--model", ckpt, "--data", str(tmp_path / "test.jsonl"), "--batch-sizes", "2",
                          "--draft-speedups", "2", "--num-draft-tokens", "2", "--max-new-tokens", "4", "--device",
                          "cpu", "--dtype", "fp32", "--json", str(real), "--quiet-warnings", "--max-seq-len", "64"])
    result = json.load(open(real))
    assert result["meta"]["complete"] is False
    assert [r["system"] for r in result["rows"]] == ["all layers"]
    with pytest.warns(UserWarning, match="stopped before its end"):  # read as an acceptance file
        assert speculative._tokens_per_verify(str(real)) == {}


def test_bench_speculative_system(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(["bench", "--model", "tiny-llama", "--systems", "ulskip,speculative", "--target-speedups", "1,2",
               "--batch-sizes", "2", "--prompt-len", "8", "--new-tokens", "6", "--repeats", "1", "--no-progress",
               "--num-draft-tokens", "3", "--json", str(out)])
    assert rc == 0
    rows = json.load(open(out))["rows"]
    spec = [r for r in rows if r["system"] == "speculative"]
    assert [r["target_speedup"] for r in spec] == [2.0] and spec[0]["status"] == "ok"  # no draft at 1x
    assert spec[0]["speculative"]["num_draft_tokens"] == 3 and "tokens per verify pass" in spec[0]["note"]
    for argv, msg in [(["--systems", "speculative", "--num-draft-tokens", "16"], "--num-draft-tokens must be in [1, 15], got 16"),
                      (["--systems", "ulskip", "--num-draft-tokens", "3"], "--num-draft-tokens is for --systems speculative"),
                      (["--systems", "speculative", "--target-speedups", "1"], "needs a --target-speedups value > 1"),
                      (["--systems", "speculative", "--strategy", "even"], "drafts with the paper's schedule")]:
        assert main(["bench", "--model", "tiny-llama", *argv]) == 2
        assert msg in capsys.readouterr().err, argv
