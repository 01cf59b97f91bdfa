"""The dtype a checkpoint runs in when none is given: fp32 on the CPU (the exactness reference); on a GPU
its own fp16/bf16, and bf16 for an fp32 checkpoint (fp16 where the GPU lacks bf16), as vLLM's "auto"."""
import contextlib

import pytest
import torch

from ulskip import Engine
from ulskip.runtime import engine as engine_module
from ulskip.runtime.engine import default_dtype
from helpers import make_checkpoint

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda as a GPU with or without bf16 would answer, on a machine without one."""
    state = {"bf16": True}
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: state["bf16"])
    return state


@pytest.mark.parametrize("saved", [torch.float32, torch.float16, torch.bfloat16, None])
def test_cpu_runs_float32(saved):
    assert default_dtype(saved, CPU) is torch.float32


def test_gpu_keeps_half_checkpoints_and_halves_float32(fake_gpu):
    assert default_dtype(torch.float16, GPU) is torch.float16
    assert default_dtype(torch.bfloat16, GPU) is torch.bfloat16
    assert default_dtype(torch.float32, GPU) is torch.bfloat16   # what `ulskip train` saves
    assert default_dtype(None, GPU) is torch.bfloat16            # config without torch_dtype
    fake_gpu["bf16"] = False                                     # e.g. a V100: fp16, not emulated bf16
    with pytest.warns(UserWarning, match="has no bf16: this float32 checkpoint runs in fp16"):
        assert default_dtype(torch.float32, GPU) is torch.float16
    assert default_dtype(torch.bfloat16, GPU) is torch.bfloat16  # asked for by the checkpoint itself


def test_from_pretrained_uses_the_rule_and_an_explicit_dtype_wins(tmp_path, monkeypatch):
    path = make_checkpoint(tmp_path / "ckpt", "llama", num_layers=2)
    seen = []
    real = engine_module.default_dtype
    monkeypatch.setattr(engine_module, "default_dtype", lambda d, dev: seen.append((d, dev.type)) or real(d, dev))
    assert Engine.from_pretrained(path, device="cpu", max_seq_len=32).dtype is torch.float32
    assert seen == [(torch.float32, "cpu")]
    assert Engine.from_pretrained(path, device="cpu", dtype="bf16", max_seq_len=32).dtype is torch.bfloat16
    assert len(seen) == 1  # an explicit dtype is not second-guessed
