"""Review of the fifth session's runtime/bench changes: what the default-dtype rule (engine.default_dtype: an
fp32 checkpoint runs in bf16 on a GPU) means for the callers that relied on the old default, and the
speculative bench's incremental JSON."""
import argparse
import contextlib
import json

import torch

from helpers import make_checkpoint, records, write_jsonl
from ulskip import Engine
from ulskip.bench import quality, speculative


def test_quality_study_names_its_eval_dtype():
    """--no-bf16 evaluates in fp32 and the default in bf16, whatever the engine's own default would be."""
    for bf16, want in ((False, "fp32"), (True, "bf16")):
        ev = quality.eval_args(argparse.Namespace(bf16=bf16, paper_decode=False))
        assert ev[ev.index("--dtype") + 1] == want


def test_from_pretrained_on_a_fake_gpu_picks_bf16_for_an_fp32_checkpoint(tmp_path, monkeypatch):
    """The rule as from_pretrained applies it to a saved fp32 checkpoint (config dtype float32), without a
    GPU: default_dtype is asked with the checkpoint's dtype and a cuda device."""
    from ulskip.runtime import engine as engine_module
    path = make_checkpoint(tmp_path / "ckpt", "llama", num_layers=2)
    assert json.load(open(f"{path}/config.json")).get("dtype", json.load(open(f"{path}/config.json"))
                                                          .get("torch_dtype")) == "float32"
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert engine_module.default_dtype(engine_module.load_config(path).torch_dtype,
                                       torch.device("cuda", 0)) is torch.bfloat16


def test_speculative_real_meta_records_the_engine_default_dtype(tmp_path):
    """No --dtype: meta.dtype is what the engine ran (float32 on the CPU), never null."""
    ckpt = make_checkpoint(tmp_path / "ckpt", "llama", num_layers=4)
    write_jsonl(tmp_path / "test.jsonl", records()[:2])
    out = tmp_path / "real.json"
    assert speculative.main(["real", "--model", ckpt, "--data", str(tmp_path / "test.jsonl"), "--batch-sizes", "1",
                             "--draft-speedups", "2", "--num-draft-tokens", "2", "--max-new-tokens", "4",
                             "--device", "cpu", "--json", str(out), "--quiet-warnings", "--max-seq-len", "64"]) == 0
    meta = json.load(open(out))["meta"]
    assert meta["dtype"] == "float32" and meta["complete"] is True
    assert Engine.from_pretrained(ckpt, device="cpu", max_seq_len=32).dtype is torch.float32
