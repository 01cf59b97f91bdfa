"""Tiny random Hugging Face checkpoints made by the tests (nothing is downloaded), and a reference
for layer skipping built only from transformers (DESIGN.md §1 / issue 2)."""
from __future__ import annotations

import copy
import inspect

import torch
from transformers import (BloomConfig, BloomForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

FAMILIES = ("llama", "mistral", "qwen2", "bloom")
VOCAB = 101


def make_hf_model(family: str, num_layers: int = 6, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=None, bos_token_id=1, pad_token_id=0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**{**common, **overrides}))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**{**common, "sliding_window": None, **overrides}))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**{**common, "num_key_value_heads": 1, **overrides}))
    elif family == "bloom":
        model = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=num_layers, n_head=4,
                                             eos_token_id=None, bos_token_id=1, pad_token_id=0, **overrides))
    else:
        raise ValueError(family)
    # Random init of HF is small; widen the weights so different layers give clearly different logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and "ln" not in name:
                p.normal_(0, 0.08)
    return model.eval()


def save(model, path):
    model.save_pretrained(path)
    return str(path)


def _layers(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def _cache_kw(model):
    """transformers renamed `past_key_values` to `cache` (5.2x); the H200 has 5.17."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _out_cache(out):
    return getattr(out, "cache", None) or out.past_key_values


def reduced_copy(model, kept):
    """A copy of the model whose layer list holds only the kept layers (renumbered for the cache)."""
    m = copy.deepcopy(model)
    layers = torch.nn.ModuleList([_layers(m)[i] for i in kept])
    for j, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None) or layer.self_attention
        attn.layer_idx = j
    if hasattr(m, "transformer"):
        m.transformer.h = layers
        m.config.n_layer = len(kept)
    else:
        m.model.layers = layers
        m.config.num_hidden_layers = len(kept)
        if getattr(m.config, "layer_types", None):
            m.config.layer_types = [m.config.layer_types[i] for i in kept]
    return m


@torch.no_grad()
def reference_decode(model, prompt, kept, steps, prefill="full"):
    """Greedy ULS decode from transformers alone: the prompt through all layers (prefill="full") with a
    cache, keep the kept layers' entries, decode with the reduced copy. Returns (tokens, logits/step)."""
    small = reduced_copy(model, kept)
    ids = torch.tensor([prompt])
    if prefill == "full":
        out = model(ids, use_cache=True)
        cache = DynamicCache()
        for j, i in enumerate(kept):
            layer = _out_cache(out).layers[i]
            cache.update(layer.keys, layer.values, j)
    else:
        out = small(ids, use_cache=True)
        cache = _out_cache(out)
    logits = out.logits[0, -1].float()
    tokens, scores = [], []
    for t in range(steps):
        scores.append(logits)
        nxt = int(logits.argmax())
        tokens.append(nxt)
        if t == steps - 1:
            break
        pos = len(prompt) + t
        o = small(torch.tensor([[nxt]]), use_cache=True, position_ids=torch.tensor([[pos]]),
                  attention_mask=torch.ones(1, pos + 1, dtype=torch.long), **{_cache_kw(small): cache})
        cache, logits = _out_cache(o), o.logits[0, -1].float()
    return tokens, scores


def uls_reference_model(model, kept):
    """A transformers model that generates with ULS semantics (prefill="full"), for transformers' own
    generate() (beam search included): the reduced copy, whose prompt pass is delegated to the full
    model, keeping only the kept layers' cache entries in the cache object generate() handed in."""
    small = reduced_copy(model, kept)
    decode = small.forward

    def forward(input_ids=None, **kw):
        key = next((k for k in ("cache", "past_key_values") if kw.get(k) is not None), None)
        cache = kw.get(key) if key else None
        if cache is None or cache.get_seq_length() > 0:
            return decode(input_ids=input_ids, **kw)
        full_kw = {k: v for k, v in kw.items() if k not in (key, "use_cache")}
        out = model(input_ids=input_ids, use_cache=True, **full_kw)
        for j, i in enumerate(kept):
            layer = _out_cache(out).layers[i]
            cache.update(layer.keys, layer.values, j)
        out[_out_key(out)] = cache
        return out

    small.forward = forward
    return small


def _out_key(out):
    return "cache" if "cache" in out else "past_key_values"
