"""Models for `ulskip bench`: named shapes with random weights, Hugging Face copies with layers removed,
and the byte accounting behind the roofline (docs/design.md, "Speed model").

Nothing here times anything; ulskip/bench/sweep.py drives the sweep.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch

# ----------------------------------------------------------------------------------------------------
# Named shapes. Real architectures' sizes, random weights, built on the device: no download ever.
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    family: str                  # transformers config class: llama | mistral | qwen2 | bloom
    kwargs: dict = field(default_factory=dict)
    max_positions: int | None = None   # longest prompt + generation the bench accepts
    note: str = ""


SHAPES: dict[str, Shape] = {
    "llama-2-7b": Shape("llama", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False), 4096,
        "Llama-2-7B shape (MHA, 32 layers)"),
    "llama-3-8b": Shape("llama", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False), 8192,
        "Llama-3-8B shape (GQA 8 kv heads, 128256 vocab, rope_theta 5e5)"),
    "mistral-7b": Shape("mistral", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
        rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False), 32768,
        "Mistral-7B-v0.2 shape (GQA 8 kv heads, no sliding window)"),
    "qwen2-7b": Shape("qwen2", dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False, tie_word_embeddings=False),
        32768, "Qwen2-7B shape (qkv bias, GQA 4 kv heads, 152064 vocab, 28 layers)"),
    "bloom-7b1": Shape("bloom", dict(
        vocab_size=250880, hidden_size=4096, n_layer=30, n_head=32, layer_norm_epsilon=1e-5,
        tie_word_embeddings=True), 2048,
        "BLOOM-7b1 shape (ALiBi, LayerNorm, tied 250880 vocab, 30 layers); 2048 = its training length"),
    "tiny-llama": Shape("llama", dict(
        vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False), 1024,
        "tiny Llama for CPUs (8 layers, hidden 256, GQA 2 kv heads)"),
    "tiny-qwen2": Shape("qwen2", dict(
        vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-6, rope_theta=10000.0, use_sliding_window=False, tie_word_embeddings=False),
        1024, "tiny Qwen2 for CPUs (qkv bias)"),
    "tiny-bloom": Shape("bloom", dict(
        vocab_size=2048, hidden_size=256, n_layer=8, n_head=4, layer_norm_epsilon=1e-5,
        tie_word_embeddings=True), 1024, "tiny BLOOM for CPUs (ALiBi, tied embeddings)"),
}
GPU_DEFAULT_MODEL = "llama-2-7b"
CPU_DEFAULT_MODEL = "tiny-llama"


def make_config(name: str):
    """transformers config for a named shape (cheap: no weights)."""
    import transformers
    shape = SHAPES[name]
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "bloom": transformers.BloomConfig}[shape.family]
    cfg = cls(**shape.kwargs)
    # Random-weight models have no tokenizer; fixed special ids keep generate() from warning.
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 0
    return cfg


def resolve_model(model: str):
    """(config, max_positions, description) for a named shape or a local checkpoint folder.

    Raises ValueError naming the known shapes. Reads config.json only: nothing is allocated.
    """
    if model in SHAPES:
        return make_config(model), SHAPES[model].max_positions, SHAPES[model].note
    if os.path.isdir(model):
        from transformers import AutoConfig
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ValueError(f"--model {model!r}: folder has no config.json")
        cfg = AutoConfig.from_pretrained(model, local_files_only=True)
        max_pos = None
        for key in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
            if isinstance(getattr(cfg, key, None), int):
                max_pos = getattr(cfg, key)
                break
        return cfg, max_pos, f"checkpoint {model}"
    raise ValueError(f"--model {model!r} is neither a known shape nor a checkpoint folder; "
                     f"known shapes: {', '.join(SHAPES)}")


def num_layers(cfg) -> int:
    return int(cfg.get_text_config().num_hidden_layers)


def kv_bytes_per_token_per_layer(cfg, dtype: torch.dtype) -> int:
    """K and V bytes one token adds to one layer's cache: 2 * kv_heads * head_dim * element size."""
    cfg = cfg.get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@torch.no_grad()
def random_init_(model, seed: int, std: float = 0.02) -> None:
    """Random weights in place on the model's device (normal(0, std); norm weights 1, norm biases 0).

    Fast on a GPU: one normal_ kernel per tensor. Tied tensors are written twice and stay tied.
    """
    gen_device = next(model.parameters()).device
    g = torch.Generator(device=gen_device).manual_seed(seed)
    for name, p in model.named_parameters():
        lname = name.lower()
        is_norm = "norm" in lname or ".ln_" in lname or lname.startswith("ln_")
        if p.ndim == 1 and is_norm:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            p.normal_(0.0, std, generator=g)


def build_hf_model(model: str, device: torch.device, dtype: torch.dtype, seed: int = 0,
                   attn_implementation: str | None = None):
    """The Hugging Face model: random weights built directly on `device` for a shape, or a local
    checkpoint folder (local_files_only). Returns an eval-mode model without grads."""
    from transformers import AutoModelForCausalLM
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if model in SHAPES:
        cfg = make_config(model)
        torch.manual_seed(seed)
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype, **extra)
        random_init_(hf, seed)
    else:
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, local_files_only=True, **extra)
        hf = hf.to(device)
    hf.eval().requires_grad_(False)
    return hf


# ----------------------------------------------------------------------------------------------------
# Hugging Face with the skipped layers removed (the users' alternative), sharing the weights.
# ----------------------------------------------------------------------------------------------------


def decoder_layers_path(hf) -> str:
    """Dotted path of the decoder-layer ModuleList (model.layers, transformer.h, ...)."""
    n = num_layers(hf.config)
    for name, mod in hf.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and name:
            return name
    raise ValueError(f"cannot find the {n} decoder layers in {type(hf).__name__}")


def _shallow_clone(mod: torch.nn.Module) -> torch.nn.Module:
    """A new module object sharing parameter and buffer tensors but with its own attributes and child
    table, so attributes (layer_idx, config) and children can change without touching the original."""
    c = copy.copy(mod)
    c._modules = dict(mod._modules)
    c._parameters = dict(mod._parameters)
    c._buffers = dict(mod._buffers)
    for attr in ("_compiled_call", "_last_compile_config", "_previous_max_cache_length"):
        c.__dict__.pop(attr, None)
    return c


def _deep_shallow_clone(mod: torch.nn.Module) -> torch.nn.Module:
    c = _shallow_clone(mod)
    for k, child in mod._modules.items():
        if child is not None:
            c._modules[k] = _deep_shallow_clone(child)
    return c


def skip_layers_copy(hf, kept: list[int]):
    """A copy of `hf` whose decoder ModuleList holds only the kept layers (weights shared, no memory
    copied): config.num_hidden_layers = len(kept), config.layer_types sliced, and every attention
    module's layer_idx renumbered 0..K-1 so Hugging Face's caches index the right slot.
    The original model keeps working unchanged."""
    path = decoder_layers_path(hf).split(".")
    cfg = copy.deepcopy(hf.config)
    cfg.num_hidden_layers = len(kept)
    if isinstance(getattr(cfg, "layer_types", None), (list, tuple)):
        cfg.layer_types = [cfg.layer_types[i] for i in kept]

    top = _shallow_clone(hf)
    top.config = cfg
    top.generation_config = copy.deepcopy(hf.generation_config)
    parent = top
    for part in path[:-1]:                        # e.g. "model" of model.layers
        child = _shallow_clone(parent._modules[part])
        if hasattr(child, "config"):
            child.config = cfg
        parent._modules[part] = child
        parent = child
    old = parent._modules[path[-1]]
    layers = []
    for new_idx, i in enumerate(kept):
        layer = _deep_shallow_clone(old[i])
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_idx
        layers.append(layer)
    parent._modules[path[-1]] = torch.nn.ModuleList(layers)
    return top


# ----------------------------------------------------------------------------------------------------
# Roofline accounting (docs/design.md, "Speed model")
# ----------------------------------------------------------------------------------------------------


@dataclass
class ByteCounts:
    layer_bytes: list[int]      # parameter bytes of each decoder layer
    head_bytes: int             # LM head weight (the embedding matrix when tied)
    other_bytes: int            # final norm and any other non-embedding, non-layer parameters
    kv_token_layer_bytes: int   # K+V bytes per token per layer


def byte_counts(hf, dtype: torch.dtype) -> ByteCounts:
    """What one decode step must read, split by part, from the model's actual parameters."""
    layers = hf.get_submodule(decoder_layers_path(hf))
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    layer_bytes = [nbytes(layer.parameters()) for layer in layers]
    head = hf.get_output_embeddings().weight
    emb = hf.get_input_embeddings().weight
    seen = {id(p) for layer in layers for p in layer.parameters()} | {id(head), id(emb)}
    other = nbytes(p for p in hf.parameters() if id(p) not in seen)
    return ByteCounts(layer_bytes, head.numel() * head.element_size(), other,
                      kv_bytes_per_token_per_layer(hf.config, dtype))


def decode_step_bytes(counts: ByteCounts, layers_run: list[int], batch: int, prompt_len: int,
                      new_tokens: int) -> dict:
    """Bytes one decode step reads, averaged over the generated steps.

    The first new token comes from the prefill; decode step j = 1..N-1 attends over P + j cached
    tokens (K and V of each layer that runs, for each sequence), so the mean context is P + N/2.
    Weights (layers that run + LM head + final norm) are read once per step, whatever the batch.
    """
    weights = sum(counts.layer_bytes[i] for i in layers_run) + counts.head_bytes + counts.other_bytes
    mean_ctx = prompt_len + new_tokens / 2
    kv = batch * len(layers_run) * counts.kv_token_layer_bytes * mean_ctx
    return {"weight_bytes": weights, "kv_bytes": kv, "bytes": weights + kv, "mean_context": mean_ctx}


def roofline(step_bytes: float, bandwidth_Bps: float, batch: int, decode_step_s: float | None) -> dict:
    """Roofline step time, roofline tokens/s, achieved GB/s and % of roofline for a measured step."""
    t_roof = step_bytes / bandwidth_Bps
    out = {"roofline_step_ms": t_roof * 1e3, "roofline_tokens_per_s": batch / t_roof,
           "achieved_GBps": None, "pct_roofline": None}
    if decode_step_s and decode_step_s > 0:
        out["achieved_GBps"] = step_bytes / decode_step_s / 1e9
        out["pct_roofline"] = 100.0 * t_roof / decode_step_s
    return out
