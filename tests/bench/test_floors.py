"""ulskip.bench.floors on the CPU: the GEMM rate and the prompt pass's share of it are computed and written."""
import json

import pytest

from ulskip.bench import floors


def test_floors_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "floors.json"
    assert floors.main(["--batch", "2", "--prompt-len", "16", "--iters", "2", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert set(d["gemms"]) == {"qkv", "o", "gate_up", "down"}
    assert d["gemms"]["gate_up"]["shape"] == [32, 256, 2 * 688]  # tiny-llama: hidden 256, intermediate 688
    assert d["gemm_TFLOPs"] > 0 and d["prompt_pass_ms"] > 0
    assert d["prompt_pass_pct_of_gemm"] == pytest.approx(100 * d["prompt_pass_TFLOPs"] / d["gemm_TFLOPs"])
    assert "of the GEMM rate (target 70%)" in capsys.readouterr().out


def test_floors_refuses_bad_sizes():
    with pytest.raises(SystemExit, match="must be >= 1"):
        floors.main(["--batch", "0"])
