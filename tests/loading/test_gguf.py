"""`ulskip convert`: a tiny GGUF written here -> a safetensors folder, checked value for value."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from ulskip.cli import main

# gguf is a test dependency (pyproject's test extra; .ci/run checks it imports), so CI never skips these;
# the GPU machine has no gguf, and its `-m gpu` run must still collect this file.
gguf = pytest.importorskip("gguf")

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r"]


def vocab():
    """A byte-level BPE vocabulary: the 256 byte symbols, a few merges, then the control tokens."""
    tokens = list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES] + SPECIALS
    types = [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS)) + [gguf.TokenType.CONTROL] * len(SPECIALS)
    return tokens, types


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab()[0]), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # norms away from 1 and larger weights, so a swapped or dropped tensor shows in the logits
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf.py reorders q/k rows from HF's rotate-half to interleaved rope pairs
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def q8_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Q8_0 blocks, the values they dequantize to): exercises the same dequantization path as a real file."""
    q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    return q, gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(w.shape)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_llama_gguf(path, model: LlamaForCausalLM, skip=()) -> None:
    """Write `model` as llama.cpp would; the MLP matrices go in Q8_0 and `model` gets their dequantized values.
    Tensors named in `skip` are left out."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(c.vocab_size)
    tokens, types = vocab()
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_chat_template(CHAT_TEMPLATE)

    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])  # no output.weight: tied
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(c.num_hidden_layers):
        for hf, name in GGUF_NAMES.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if f"blk.{i}.{name}.weight" in skip:
                continue
            if hf == "self_attn.q_proj":
                t = llama_cpp_permute(t, c.num_attention_heads)
            elif hf == "self_attn.k_proj":
                t = llama_cpp_permute(t, c.num_key_value_heads)
            if hf.startswith("mlp."):
                q, deq = q8_0(t)
                with torch.no_grad():
                    model.get_parameter(f"model.layers.{i}.{hf}.weight").copy_(torch.from_numpy(deq))
                w.add_tensor(f"blk.{i}.{name}.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                w.add_tensor(f"blk.{i}.{name}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_other_gguf(path, arch: str) -> None:
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(expected model, GGUF path, converted folder, CLI stdout) -- converted once for the module."""
    root = tmp_path_factory.mktemp("gguf")
    model = tiny_llama()
    path = root / "tiny.gguf"
    write_llama_gguf(path, model)
    out = root / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["convert", str(path), str(out)])
    assert rc == 0
    return model, path, out, buf.getvalue()


def leftovers(parent, name):
    return sorted(p for p in os.listdir(parent) if p.startswith(name))


def test_convert_writes_plain_folder(converted):
    model, _, out, stdout = converted
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= files
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 2 and cfg["num_key_value_heads"] == 2
    assert cfg["tie_word_embeddings"] is True and cfg["eos_token_id"] == vocab()[0].index("<|im_end|>")
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert "lm_head.weight" not in keys  # tied: saved once
    assert keys == set(model.state_dict()) - {"lm_head.weight"}
    assert stdout.strip() == f"wrote {out}: {len(keys)} tensors, F32, architecture llama, with tokenizer"
    assert leftovers(out.parent, "out") == ["out"]  # no .tmp-/.old- sibling left


def test_converted_logits_match_written_weights(converted):
    """q/k went through llama.cpp's permutation and back, the Q8_0 matrices through dequantization."""
    model, _, out, _ = converted
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.tensor([[5, 71, 200, 3, 99, 260, 17, 42]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_converted_tokenizer_has_chat_template(converted):
    _, _, out, _ = converted
    tok = AutoTokenizer.from_pretrained(str(out))
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    tokens = vocab()[0]
    assert tok.convert_ids_to_tokens(tok.encode("<|im_start|>hello", add_special_tokens=False)) == \
        ["<|im_start|>", "hello"]
    assert tok.eos_token_id == tokens.index("<|im_end|>")


def test_convert_dtype_and_overwrite(converted, tmp_path):
    _, path, _, _ = converted
    out = tmp_path / "bf16"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main(["convert", str(path), str(out), "--dtype", "bfloat16", "--overwrite"]) == 0
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert leftovers(tmp_path, "bf16") == ["bf16"]


def test_convert_bad_input(converted, tmp_path):
    _, path, _, _ = converted
    out = tmp_path / "out"

    def fails(argv, *culprits):
        with pytest.raises(SystemExit) as e:
            main(["convert", *argv])
        msg = str(e.value.code)
        assert msg.startswith("ulskip convert:"), msg
        for c in culprits:
            assert c in msg, msg
        assert not out.exists() and not leftovers(tmp_path, "out")

    fails([str(tmp_path / "missing.gguf"), str(out)], "missing.gguf", "does not exist")
    (tmp_path / "notgguf.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    fails([str(tmp_path / "notgguf.gguf"), str(out)], "notgguf.gguf", "not a GGUF")
    for arch in ("gpt2", "phi3"):
        write_other_gguf(tmp_path / f"{arch}.gguf", arch)
        fails([str(tmp_path / f"{arch}.gguf"), str(out)], f"'{arch}'", "llama, mistral, qwen2")
    fails([str(path), str(out), "--dtype", "fp8"], "'fp8'", "auto, float32, bfloat16, float16")
    # fails while converting, after the temporary folder exists: it must go too
    write_llama_gguf(tmp_path / "holey.gguf", tiny_llama(), skip={"blk.1.ffn_up.weight"})
    fails([str(tmp_path / "holey.gguf"), str(out)], "holey.gguf", "model.layers.1.mlp.up_proj.weight")

    # an existing non-empty folder is refused without --overwrite, and left as it was
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["convert", str(path), str(out)])
    assert str(e.value.code).startswith("ulskip convert:") and str(out) in str(e.value.code)
    assert "--overwrite" in str(e.value.code)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert leftovers(tmp_path, "out") == ["out"]
