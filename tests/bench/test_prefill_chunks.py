"""ulskip.bench.prefill_chunks on the CPU: the whole pass and the chunks are timed and written."""
import json

import pytest

from ulskip.bench import prefill_chunks


def test_prefill_chunks_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "pc.json"
    prefill_chunks.main(["--length", "40", "--chunk", "16", "--json", str(out)])
    d = json.loads(out.read_text())
    assert d["length"] == 40 and len(d["chunk_ms"]) == 3 and d["whole_ms"] > 0  # chunks of 16, 16, 8
    assert "chunks" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--length", "0"], ["--chunk", "0"], ["--chunk", "-2"]])
def test_prefill_chunks_refuses_bad_sizes(argv):
    with pytest.raises(SystemExit, match="must be >= 1"):
        prefill_chunks.main(argv)
