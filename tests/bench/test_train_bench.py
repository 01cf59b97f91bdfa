"""ulskip.bench.train's model FLOPs (for MFU) and a CPU smoke run."""
import argparse

import pytest

from ulskip.bench import train


def args(**kw):
    base = dict(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=100, seq=8, batch=2,
                prefix_frac=0.5, speedup=2.0)
    base.update(kw)
    return argparse.Namespace(**base)


def test_model_flops_by_hand():
    a = args()
    layer = 2 * (64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128)
    attn_full = 4 * 64 * 36 * 4  # 36 causal pairs of 8 tokens, 4 layers
    head = 2 * 64 * 100 * 4      # the 4 response tokens
    assert train.model_flops_per_step(a, "hf") == pytest.approx(3 * 2 * (8 * 4 * layer + attn_full + head))
    # ULS 2x keeps 2 of 4 layers for the 4 response tokens: 4 x 4 + 4 x 2 = 24 (token, layer) pairs
    assert train.model_flops_per_step(a, "uls") == pytest.approx(3 * 2 * (24 * layer + attn_full * 24 / 32 + head))


def test_cpu_run_reports_mfu(capsys, tmp_path):
    out = tmp_path / "t.json"
    assert train.main(["--device", "cpu", "--hidden", "64", "--intermediate", "128", "--layers", "2", "--heads", "4",
                       "--kv-heads", "2", "--vocab", "128", "--seq", "16", "--batch", "2", "--steps", "1",
                       "--warmup", "1", "--modes", "hf", "--peak-tflops", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| MFU |" in text and "%" in text.splitlines()[-1]
