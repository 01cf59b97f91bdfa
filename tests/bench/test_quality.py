"""The quality study script end to end on the CPU (tiny checkpoint, tiny data): calibrate, fine-tune per
policy, evaluate, resume, report. Its numbers mean nothing here; that it runs and resumes is the point."""
import json
import os

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
