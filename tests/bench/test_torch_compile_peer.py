"""The compiled-PyTorch peer of `ulskip bench` (--systems torch-compile): the project's reference model under
torch.compile gives the engine's tokens, and its ops really are the references (no Triton)."""
import torch

from helpers import make_hf_model
from ulskip import Engine
from ulskip.bench.sweep import TorchCompileSystem
from ulskip.cli import main
from ulskip.kernels import backend


def test_compiled_reference_model_gives_the_engine_tokens():
    hf = make_hf_model("llama", num_layers=6)
    prompts = [[1, 17, 33, 5], [4, 8]]
    ref = Engine.from_hf_model(hf, target_speedup=2, max_batch_size=2, max_seq_len=32).generate(
        prompts, max_new_tokens=6).sequences
    peer = TorchCompileSystem(hf, [0, 3, 5], "full", 2, 32, torch.device("cpu"))
    assert peer.generate(prompts, 6).sequences == ref
    assert peer.generate(prompts, 6).sequences == ref  # the compiled step, replayed
    assert isinstance(peer.engine._decode_eager, type(torch.compile(lambda x: x)))  # compiled, not eager
    before = backend.enabled()
    with backend.reference_ops():
        assert not backend.enabled()
    assert backend.enabled() == before


def test_bench_torch_compile_row(tmp_path):
    import json
    out = tmp_path / "b.json"
    assert main(["bench", "--model", "tiny-llama", "--systems", "torch-compile", "--target-speedups", "2",
                 "--batch-sizes", "1", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1", "--no-progress",
                 "--json", str(out)]) == 0
    (row,) = json.load(open(out))["rows"]
    assert row["system"] == "torch-compile" and row["status"] == "ok" and row["num_kept"] == 4
    assert "torch.compile" in row["note"]
