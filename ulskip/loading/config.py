"""Model hyper-parameters, read from a Hugging Face config (config.json or a transformers config object).

One dataclass for every supported family; family-specific switches are plain fields so the model code
never looks at the raw Hugging Face config again.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

# model_type in config.json -> our model family
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "bloom": "bloom"}
SUPPORTED = ", ".join(sorted(FAMILIES))


@dataclass
class ModelConfig:
    model_type: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False           # Qwen2, Llama(attention_bias), Bloom
    o_bias: bool = False             # Llama(attention_bias), Bloom
    mlp_bias: bool = False           # Llama(mlp_bias), Bloom
    residual_post_norm: bool = False  # Bloom's apply_residual_connection_post_layernorm
    sliding_window: int | None = None  # Mistral / Qwen2 (use_sliding_window): keys older are masked
    torch_dtype: torch.dtype | None = None
    hf_config: object = field(default=None, repr=False, compare=False)  # for rope scaling functions
    ulskip: dict | None = None       # the section written by `ulskip train`, if any


def read_config_json(path: str) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path!r} does not exist")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json in checkpoint folder {path!r}")
    with open(file) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from None
    check_model_type(raw.get("model_type"), file)
    return raw


def check_model_type(model_type, where: str) -> None:
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r} in {where}; supported: {SUPPORTED}")


def from_hf(hf_config) -> ModelConfig:
    """Build a ModelConfig from a transformers config object of a supported family."""
    mt = getattr(hf_config, "model_type", None)
    check_model_type(mt, "the model config")
    c = hf_config
    dtype = getattr(c, "dtype", None) or getattr(c, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    common = dict(model_type=mt, family=FAMILIES[mt], vocab_size=c.vocab_size, hf_config=c,
                  torch_dtype=dtype, ulskip=getattr(c, "ulskip", None))
    if mt == "bloom":
        heads = c.n_head
        return ModelConfig(**common, hidden_size=c.hidden_size, intermediate_size=4 * c.hidden_size,
                           num_layers=c.n_layer, num_heads=heads, num_kv_heads=heads,
                           head_dim=c.hidden_size // heads, norm_eps=c.layer_norm_epsilon,
                           max_position_embeddings=1 << 30,  # ALiBi: no learned position limit
                           tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True,
                           residual_post_norm=bool(c.apply_residual_connection_post_layernorm))
    heads = c.num_attention_heads
    attention_bias = bool(getattr(c, "attention_bias", False))
    return ModelConfig(**common, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                       num_layers=c.num_hidden_layers, num_heads=heads,
                       num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                       head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                       norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
                       tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
                       qkv_bias=attention_bias or mt == "qwen2", o_bias=attention_bias,
                       mlp_bias=bool(getattr(c, "mlp_bias", False)),
                       sliding_window=getattr(c, "sliding_window", None))


def load_config(path: str) -> ModelConfig:
    """Read config.json of a local checkpoint folder (never touches the network)."""
    read_config_json(path)  # clear errors for a missing folder/file or an unknown family
    from transformers import AutoConfig
    return from_hf(AutoConfig.from_pretrained(path, local_files_only=True))

