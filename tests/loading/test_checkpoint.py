"""Checkpoint formats, dtypes, tokenizers, and clear errors for bad checkpoints."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from ulskip import Engine
from helpers import make_hf_model, save

PROMPT = [1, 17, 33, 5]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = make_hf_model("llama")
    path = save(model, tmp_path_factory.mktemp("llama"))
    return model, path, Engine.from_pretrained(path, max_seq_len=32).generate([PROMPT], max_new_tokens=6)


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_sharded_safetensors(tmp_path, family):
    model = make_hf_model(family)
    ref = Engine.from_pretrained(save(model, tmp_path / "single"), max_seq_len=32).generate([PROMPT], max_new_tokens=6)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    assert len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    out = Engine.from_pretrained(str(tmp_path / "sharded"), max_seq_len=32).generate([PROMPT], max_new_tokens=6)
    assert out.sequences == ref.sequences


def test_bin_checkpoint(tmp_path, llama):
    model, path, ref = llama
    d = tmp_path / "bin"
    d.mkdir()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, d / "pytorch_model.bin")
    with open(os.path.join(path, "config.json")) as f:
        (d / "config.json").write_text(f.read())
    assert Engine.from_pretrained(str(d), max_seq_len=32).generate([PROMPT], max_new_tokens=6).sequences == ref.sequences


@pytest.mark.parametrize("dtype", ["fp16", "bf16", torch.float32])
def test_dtypes(llama, dtype):
    model, path, ref = llama
    eng = Engine.from_pretrained(path, dtype=dtype, max_seq_len=32)
    assert eng.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype, torch.float32)
    out = eng.generate([PROMPT], max_new_tokens=3, output_scores=True)
    assert len(out.sequences[0]) == 3 and torch.isfinite(out.scores[0]).all()


def test_prefill_skip_never_reads_skipped_layers(tmp_path, llama):
    """A checkpoint that lacks the skipped layers' tensors still loads with prefill="skip"."""
    model, path, _ = llama
    tensors = load_file(os.path.join(path, "model.safetensors"))
    kept = [0, 5]
    slim = {k: v for k, v in tensors.items() if ".layers." not in k or int(k.split(".")[2]) in kept}
    d = tmp_path / "slim"
    d.mkdir()
    save_file(slim, d / "model.safetensors", metadata={"format": "pt"})
    (d / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    skip = Engine.from_pretrained(str(d), target_speedup=3, prefill="skip", max_seq_len=32)
    full_ckpt = Engine.from_pretrained(path, target_speedup=3, prefill="skip", max_seq_len=32)
    assert skip.generate([PROMPT], max_new_tokens=5).sequences == full_ckpt.generate([PROMPT], max_new_tokens=5).sequences
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.1\.[a-z_.]+' is missing from .*slim"):
        Engine.from_pretrained(str(d), target_speedup=3, prefill="full", max_seq_len=32)


def test_truncated_weights_name_the_file(tmp_path, llama):
    model, path, _ = llama
    d = tmp_path / "trunc"
    d.mkdir()
    data = open(os.path.join(path, "model.safetensors"), "rb").read()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    (d / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    with pytest.raises(ValueError, match="model.safetensors.*(truncated|unreadable)"):
        Engine.from_pretrained(str(d), max_seq_len=32)


def test_missing_shard_and_missing_weights(tmp_path, llama):
    model, path, _ = llama
    d = tmp_path / "shards"
    model.save_pretrained(d, max_shard_size="40KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    os.remove(d / victim)
    with pytest.raises(FileNotFoundError, match=victim):
        Engine.from_pretrained(str(d), max_seq_len=32)
    e = tmp_path / "empty"
    e.mkdir()
    (e / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    with pytest.raises(FileNotFoundError, match="no weights"):
        Engine.from_pretrained(str(e))


def test_unknown_family_and_missing_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*bloom, llama, mistral, qwen2"):
        Engine.from_pretrained(str(tmp_path))
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Engine.from_pretrained(str(tmp_path / "noconfig"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Engine.from_pretrained(str(tmp_path / "missing"))


def _write_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(90)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)


def test_string_prompts_need_a_tokenizer(tmp_path, llama):
    model, path, _ = llama
    with pytest.raises(ValueError, match="string prompts need a tokenizer"):
        Engine.from_pretrained(path, max_seq_len=32).generate(["w1 w2"], max_new_tokens=2)
    d = tmp_path / "withtok"
    model.save_pretrained(d)
    _write_tokenizer(d)
    eng = Engine.from_pretrained(str(d), max_seq_len=32)
    ids = eng.tokenizer("w5 w6 w7")["input_ids"]
    by_text = eng.generate(["w5 w6 w7"], max_new_tokens=4)
    assert by_text.sequences == eng.generate([ids], max_new_tokens=4).sequences
    assert isinstance(by_text.texts[0], str)
