"""ulskip.bench.train_vs_trainer on the CPU with a tiny checkpoint: every config trains, the timed stretch and
its token counts are what the module says (one collated batch per step, real tokens only), the FLOPs formula
matches a hand count, and bad flags are refused. Timings are not asserted."""
import json

import pytest
import torch

from helpers import make_checkpoint, write_train_data
from ulskip.bench import train_vs_trainer as tvt


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama", num_layers=4)
    data = write_train_data(tmp_path_factory.mktemp("data"))
    return ckpt, data


def test_every_config_runs_and_counts_real_tokens(setup, tmp_path, capsys):
    ckpt, data = setup
    out = tmp_path / "tvt.json"
    assert tvt.main(["--model", ckpt, "--train-file", data, "--cpu", "--steps", "4", "--warmup", "1",
                     "--trainer-batch-size", "2", "--block-size", "64", "--configs",
                     "trainer,uls1-padded,uls2-packed8", "--json", str(out)]) == 0
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"trainer", "uls1-padded", "uls2-packed8"}
    for r in rows.values():
        # batch i is step i's; the data loader collates one more ahead (it looks for the end)
        assert r["batches"] in (4, 5) and r["steps_timed"] == 3 and r["seconds"] > 0
        assert r["tokens"] == r["prefix_tokens"] + r["response_tokens"] and r["response_tokens"] > 0
        assert r["model_tflops_per_s"] > 0
    # one record per row: 2 records x 3 timed steps; the packed rows carry several records each
    assert rows["trainer"]["kept_layers"] == 4 and rows["uls2-packed8"]["kept_layers"] == 2
    assert rows["uls2-packed8"]["tokens"] > 2 * rows["uls1-padded"]["tokens"]
    table = capsys.readouterr().out
    assert "x trainer" in table and "uls2-packed8" in table


def test_random_init_keeps_config_and_tokenizer(setup, tmp_path):
    """--random-init: the folder's config and tokenizer, other (seeded) weights; the run uses that copy."""
    from transformers import AutoModelForCausalLM

    _, data = setup
    ckpt = make_checkpoint(tmp_path / "c", "llama", num_layers=4, seed=3)  # not the seed the copy draws with
    copy = tvt.random_checkpoint(ckpt, str(tmp_path / "r"))
    a = AutoModelForCausalLM.from_pretrained(ckpt)
    b = AutoModelForCausalLM.from_pretrained(copy)
    assert a.config.to_dict()["num_hidden_layers"] == b.config.to_dict()["num_hidden_layers"]
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)
    out = tmp_path / "r.json"
    assert tvt.main(["--model", ckpt, "--train-file", data, "--cpu", "--steps", "3", "--warmup", "1",
                     "--trainer-batch-size", "2", "--block-size", "64", "--configs", "trainer", "--random-init",
                     "--json", str(out)]) == 0
    assert json.loads(out.read_text())["meta"]["weights"] == "random (seed 0)"


def test_model_flops_by_hand():
    class C:
        hidden_size, intermediate_size, num_hidden_layers = 8, 16, 4
        num_attention_heads, num_key_value_heads, vocab_size = 2, 1, 10
    # per token and layer, forward: 2 x (q 8x8 + k,v 2 x 8x4 + o 8x8 + gate/up/down 3 x 8x16) = 2 x 576
    layer, head = 2 * 576, 2 * 80
    assert tvt.model_flops(C, kept=2, prefix_tokens=5, response_tokens=3) == 3 * ((5 * 4 + 3 * 2) * layer + 3 * head)


def test_missing_model_or_data_is_one_line(setup, tmp_path):
    ckpt, data = setup
    for argv, message in ((["--model", str(tmp_path / "none"), "--train-file", data], "--model"),
                          (["--model", ckpt, "--train-file", str(tmp_path / "none.jsonl")], "matches no files")):
        with pytest.raises(SystemExit) as e:
            tvt.main([*argv, "--cpu", "--steps", "2", "--warmup", "1"])
        assert str(e.value).startswith("train_vs_trainer: ") and message in str(e.value)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["--configs", "trainer,hf"], "--configs: unknown ['hf']"),
    (["--steps", "5", "--warmup", "5"], "--steps (5) must exceed --warmup (5)"),
    (["--warmup", "0"], "--warmup must be at least 1"),
    (["--trainer-batch-size", "0"], "--trainer-batch-size must be at least 1"),
    (["--peak-tflops", "-5"], "--peak-tflops must be a positive number"),
    (["--peak-tflops", "0"], "--peak-tflops must be a positive number"),
])
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        tvt.parse(["--model", "m", "--train-file", "d", *argv])
    assert message in capsys.readouterr().err


def test_cpu_refused_when_a_gpu_is_visible(setup, monkeypatch):
    """--cpu with a CUDA device visible: `ulskip train` would put the uls configs on the GPU (timed with no sync)
    while the trainer row runs on the CPU; refused before anything runs."""
    ckpt, data = setup
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit, match="CUDA_VISIBLE_DEVICES"):
        tvt.main(["--model", ckpt, "--train-file", data, "--cpu", "--steps", "3", "--warmup", "1",
                  "--trainer-batch-size", "2", "--block-size", "64", "--configs", "uls1-padded"])
