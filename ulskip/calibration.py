"""Block Influence (ShortGPT, Men et al. 2024) per decoder layer, the scores of the "shortgpt" strategy.

BI_i = 1 - mean over tokens of cos(x_i, y_i), x_i the hidden state entering layer i and y_i the one
leaving it, on calibration text: a layer that barely turns the hidden state is the first to drop. The
scores come from a plain transformers forward (hooks on the decoder layers), every layer run, on whole
records (prefix + text), padding excluded.
"""
from __future__ import annotations

import json
import math
import os

import torch

FORMAT = "ulskip-block-influence/1"


@torch.no_grad()
def block_influence(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 8) -> list[float]:
    """model: a transformers Llama/Mistral/Qwen2/Bloom causal LM; input_ids, attention_mask [N, T] (right
    padding). Returns BI per layer (fp64 accumulation over every non-pad token)."""
    from ulskip.train.apply_uls import decoder_layers

    layers = decoder_layers(model)
    sums = [0.0] * len(layers)
    count = 0
    mask = None

    def hook(i):
        def fn(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)  # [B, T]
            sums[i] += float((cos * mask).sum())
        return fn
    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        dev = next(model.parameters()).device
        for s in range(0, input_ids.shape[0], batch_size):
            ids, am = input_ids[s:s + batch_size].to(dev), attention_mask[s:s + batch_size].to(dev)
            mask = am.double()
            count += int(am.sum())
            model(input_ids=ids, attention_mask=am, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("no calibration tokens (every record is empty)")
    return [1.0 - x / count for x in sums]


def calibrate(checkpoint: str, data_files: list[str], num_records: int = 256, max_tokens: int = 256,
              device=None, batch_size: int = 8) -> dict:
    """Block Influence of a checkpoint folder's layers on the first `num_records` records of the data files
    (json/jsonl {"prefix", "text"}), each cut to `max_tokens` tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ulskip.train.data import iter_records

    for name, v in (("num_records", num_records), ("max_tokens", max_tokens), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    texts = []
    for f in data_files:
        for _, rec in iter_records(f):
            texts.append(rec["prefix"] + rec["text"])
            if len(texts) == num_records:
                break
        if len(texts) == num_records:
            break
    tok = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
    scores = block_influence(model, enc["input_ids"], enc["attention_mask"], batch_size)
    return {"format": FORMAT, "checkpoint": os.path.abspath(checkpoint), "data": [os.path.abspath(f) for f in data_files],
            "records": len(texts), "tokens": int(enc["attention_mask"].sum()), "max_tokens": max_tokens,
            "num_layers": len(scores), "block_influence": scores}


def read_block_influence(path: str, num_layers: int | None = None) -> list[float]:
    """The scores of a file `ulskip calibrate` wrote, checked against the model's layer count."""
    try:
        with open(path) as f:
            d = json.load(f)
    except OSError as e:
        raise ValueError(f"calibration file {path!r} cannot be read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"calibration file {path!r} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT or not isinstance(d.get("block_influence"), list):
        raise ValueError(f"calibration file {path!r} was not written by `ulskip calibrate` (format {FORMAT})")
    scores = d["block_influence"]
    if num_layers is not None and len(scores) != num_layers:
        raise ValueError(f"calibration file {path!r} scores {len(scores)} layers, the model has {num_layers}")
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in scores):
        raise ValueError(f"calibration file {path!r} holds non-finite scores")
    return [float(x) for x in scores]
