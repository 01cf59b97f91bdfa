"""A checkpoint whose config and weights disagree, whose weights are corrupt or non-finite, whose
hyper-parameters are impossible, or whose `ulskip` section does not fit the model is refused with one
clear error naming the file, the tensor or the field: never a wrong model served silently."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import make_hf_model, save
from ulskip import Engine


@pytest.fixture()
def ckpt(tmp_path):
    return save(make_hf_model("llama", num_layers=4), tmp_path / "ckpt")


def _edit_config(path, **fields):
    file = os.path.join(path, "config.json")
    cfg = json.load(open(file))
    cfg.update(fields)
    json.dump(cfg, open(file, "w"))


def _edit_weights(path, fn):
    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    fn(state)
    save_file(state, file)


def _nan(name):
    return lambda s: s.__setitem__(name, torch.full_like(s[name], float("nan")))


FAULTS = {
    # config / weights mismatch
    "zero layers": (lambda p: _edit_config(p, num_hidden_layers=0), r"num_hidden_layers=0 is not a valid value"),
    "fewer layers than the weights": (lambda p: _edit_config(p, num_hidden_layers=2),
                                      r"holds tensors of layers \[2, 3\] but config.json says the model has 2 layers"),
    "more layers than the weights": (lambda p: _edit_config(p, num_hidden_layers=6),
                                     r"tensor 'model.layers.4.*' is missing"),
    "k_proj of the wrong width": (lambda p: _edit_weights(p, lambda s: s.__setitem__(
        "model.layers.1.self_attn.k_proj.weight", torch.zeros(32, 48))),
        r"tensor 'model.layers.1.self_attn.k_proj.weight' .* has shape \(32, 48\), but 'model.layers.1.self_attn.q_proj.weight'"),
    "down_proj of the wrong shape": (lambda p: _edit_weights(p, lambda s: s.__setitem__(
        "model.layers.2.mlp.down_proj.weight", torch.zeros(64, 95))),
        r"tensor 'model.layers.2.mlp.down_proj.weight' .* has shape \(64, 95\), expected \(64, 96\)"),
    # corruption and non-finite values
    "NaN in a projection": (lambda p: _edit_weights(p, _nan("model.layers.3.mlp.up_proj.weight")),
                            r"model.layers.3.mlp.gate_proj.weight\+model.layers.3.mlp.up_proj.weight' .* non-finite"),
    "inf in a norm": (lambda p: _edit_weights(p, lambda s: s["model.layers.0.input_layernorm.weight"].__setitem__(
        0, float("inf"))), r"tensor 'model.layers.0.input_layernorm.weight' .* 1 non-finite"),
    "NaN in the embedding": (lambda p: _edit_weights(p, _nan("model.embed_tokens.weight")),
                             r"tensor 'model.embed_tokens.weight' .* non-finite"),
    "index not JSON": (lambda p: open(os.path.join(p, "model.safetensors.index.json"), "w").write("{oops"),
                       r"model.safetensors.index.json' is not valid JSON"),
    "index without weight_map": (lambda p: open(os.path.join(p, "model.safetensors.index.json"), "w").write(
        '{"metadata": {}}'), r"has no 'weight_map' object"),
    # impossible hyper-parameters
    "negative eps": (lambda p: _edit_config(p, rms_norm_eps=-1.0), r"rms_norm_eps=-1.0 is not a valid value"),
    "zero eps": (lambda p: _edit_config(p, rms_norm_eps=0.0), r"rms_norm_eps=0.0 is not a valid value"),
    "eps of the wrong type": (lambda p: _edit_config(p, rms_norm_eps="small"), r"config.json.*rms_norm_eps"),
    "kv heads not dividing": (lambda p: _edit_config(p, num_key_value_heads=3), r"num_key_value_heads=3"),
    # the ulskip section against the model
    "section a string": (lambda p: _edit_config(p, ulskip="2x"), r"'ulskip' section must be an object"),
    "section without layers": (lambda p: _edit_config(p, ulskip={"kept_layers": [], "num_layers": 4}),
                               r"ulskip.kept_layers must be a non-empty list"),
    "section of another model": (lambda p: _edit_config(p, ulskip={"kept_layers": [0, 7], "num_layers": 8}),
                                 r"ulskip.num_layers=8 but the model has 4 layers"),
    "section bad prefill": (lambda p: _edit_config(p, ulskip={"kept_layers": [0, 3], "prefill": "half"}),
                            r"ulskip.prefill='half'"),
    "section bad strategy": (lambda p: _edit_config(p, ulskip={"kept_layers": [0, 3], "strategy": "magic"}),
                             r"ulskip.strategy='magic'"),
    "section layers out of range": (lambda p: _edit_config(p, ulskip={"kept_layers": [0, 9], "num_layers": 4}),
                                    r"distinct layer indices in \[0, 3\]"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_bad_checkpoint_is_refused(ckpt, fault):
    make, match = FAULTS[fault]
    make(ckpt)
    with pytest.raises(ValueError, match=match):
        Engine.from_pretrained(ckpt, max_seq_len=16)


def test_bad_checkpoint_via_the_cli_is_one_line(ckpt, capsys):
    from ulskip.cli import main
    _edit_weights(ckpt, _nan("model.norm.weight"))
    with pytest.raises(SystemExit) as e:
        main(["generate", ckpt, "--prompt-ids", "1,2", "--max-new-tokens", "2"])
    assert "model.norm.weight" in str(e.value) and "non-finite" in str(e.value)


def test_live_model_is_checked_too():
    model = make_hf_model("llama", num_layers=4)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.o_proj.weight.* non-finite"):
        Engine.from_hf_model(model, max_seq_len=16)
    model.config.ulskip = "yes"
    with pytest.raises(ValueError, match="the model's config: the 'ulskip' section must be an object"):
        Engine.from_hf_model(make_hf_model("llama", num_layers=4, ulskip="yes"), max_seq_len=16)


def test_bloom_heads_must_divide_the_hidden_size(tmp_path):
    path = save(make_hf_model("bloom", num_layers=2), tmp_path / "b")
    _edit_config(path, n_head=3)
    with pytest.raises(ValueError, match=r"n_head=3 is not a valid value \(a divisor of hidden_size=64\)"):
        Engine.from_pretrained(path, max_seq_len=16)


def test_fp16_overflow_is_named_as_such(ckpt):
    _edit_weights(ckpt, lambda s: s["model.layers.0.mlp.down_proj.weight"].__setitem__((0, 0), 1e6))
    with pytest.raises(ValueError, match=r"down_proj.weight' .* \(max \|w\| = 1e\+06\) that overflow torch.float16"):
        Engine.from_pretrained(ckpt, max_seq_len=16, dtype="fp16", device="cpu")
    Engine.from_pretrained(ckpt, max_seq_len=16, dtype="fp32", device="cpu")  # fine in fp32
