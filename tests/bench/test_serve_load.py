"""The serving load test runs end to end on the CPU (tiny model): every request answered in full."""
import json

import pytest

from ulskip.bench.serve_load import main


def test_serve_load_smoke(tmp_path):
    out = tmp_path / "load.json"
    rc = main(["--model", "tiny-llama", "--concurrency", "1,3", "--max-batch-size", "2", "--requests", "6",
               "--prompt-len", "4:12", "--output-len", "3:9", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["concurrency"] for r in rows] == [1, 3]
    for r in rows:
        assert r["answered"] == r["requests"] == 6 and r["http_errors"] == 0 and r["cut_or_duplicated"] == 0
        assert r["generated_tokens"] >= 6 * 3 and r["tokens_per_s"] > 0 and r["ttft_p50_ms"] > 0
    # 3 clients on 2 rows: one waits, and the rows ran together (more than one token per decode step)
    assert rows[1]["static_batch"] == 2 and rows[1]["tokens_per_decode_step"] > 1.2


@pytest.mark.parametrize("argv,match", [(["--prefill-chunk", "0"], "--prefill-chunk must be >= 1, got 0"),
                                        (["--prompt-len", "9:3"], "LO <= HI")])
def test_serve_load_refuses_bad_values(argv, match):
    with pytest.raises(SystemExit, match=match):
        main(argv)
