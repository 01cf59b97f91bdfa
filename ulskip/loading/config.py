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


def check_config(cfg: ModelConfig, where: str) -> ModelConfig:
    """Hyper-parameters a model cannot run with, each named with its value (before any weight is read)."""
    def bad(field, value, allowed):
        raise ValueError(f"{where}: {field}={value!r} is not a valid value ({allowed})")
    for field, value in (("vocab_size", cfg.vocab_size), ("hidden_size", cfg.hidden_size),
                         ("intermediate_size", cfg.intermediate_size), ("num_layers", cfg.num_layers),
                         ("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads), ("head_dim", cfg.head_dim),
                         ("max_position_embeddings", cfg.max_position_embeddings)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            bad("num_hidden_layers" if field == "num_layers" else field, value, "a positive integer")
    if cfg.family == "bloom" and cfg.hidden_size % cfg.num_heads:
        bad("n_head", cfg.num_heads, f"a divisor of hidden_size={cfg.hidden_size}")
    if cfg.num_heads % cfg.num_kv_heads:
        bad("num_key_value_heads", cfg.num_kv_heads, f"a divisor of num_attention_heads={cfg.num_heads}")
    if isinstance(cfg.norm_eps, bool) or not isinstance(cfg.norm_eps, (int, float)) or not 0 < cfg.norm_eps < 1:
        bad("rms_norm_eps" if cfg.family == "llama" else "layer_norm_epsilon", cfg.norm_eps, "a number in (0, 1)")
    if cfg.sliding_window is not None and (isinstance(cfg.sliding_window, bool) or not isinstance(cfg.sliding_window, int)
                                           or cfg.sliding_window < 1):
        bad("sliding_window", cfg.sliding_window, "null or a positive integer")
    check_section(cfg.ulskip, cfg.num_layers, where)
    return cfg


def check_section(section, num_layers: int, where: str) -> None:
    """The `ulskip` section `ulskip train` writes: kept_layers (non-empty), num_layers equal to the model's,
    prefill and strategy known. The schedule itself is validated when it is planned (ulskip.schedule)."""
    if section is None:
        return
    from ulskip.schedule import DYNAMIC_STRATEGIES, PREFILL_MODES
    from ulskip.schedule import STRATEGIES as STATIC
    if not isinstance(section, dict):
        raise ValueError(f"{where}: the 'ulskip' section must be an object with kept_layers, num_layers, "
                         f"prefill, strategy; got {type(section).__name__} {section!r}")
    kept = section.get("kept_layers")
    if not isinstance(kept, list) or not kept:
        raise ValueError(f"{where}: ulskip.kept_layers must be a non-empty list of layer indices, got {kept!r}")
    n = section.get("num_layers", num_layers)
    if n != num_layers:
        raise ValueError(f"{where}: ulskip.num_layers={n!r} but the model has {num_layers} layers "
                         "(the section was written for another model)")
    if section.get("prefill", "full") not in PREFILL_MODES:
        raise ValueError(f"{where}: ulskip.prefill={section.get('prefill')!r}; allowed: {', '.join(PREFILL_MODES)}")
    known = STATIC + DYNAMIC_STRATEGIES + ("custom",)
    if section.get("strategy", "paper") not in known:
        raise ValueError(f"{where}: ulskip.strategy={section.get('strategy')!r}; allowed: {', '.join(known)}")


def load_config(path: str) -> ModelConfig:
    """Read config.json of a local checkpoint folder (never touches the network)."""
    read_config_json(path)  # clear errors for a missing folder/file or an unknown family
    from transformers import AutoConfig
    try:
        hf = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001  (a field transformers refuses; its validators raise their own types)
        raise ValueError(f"{os.path.join(path, 'config.json')}: transformers cannot read it: {e}") from None
    return check_config(from_hf(hf), os.path.join(path, "config.json"))

