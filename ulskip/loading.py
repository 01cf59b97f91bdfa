"""Weights from a local Hugging Face checkpoint folder (or a live transformers model) into our models.

Only the tensors the model needs are read: with prefill="skip" the skipped layers' weights are never
touched (safetensors reads tensors lazily; .bin files are memory-mapped).
"""
from __future__ import annotations

import json
import os

import torch

from ulskip.models import MODEL_CLASSES

SAFE_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"


class CheckpointTensors:
    """name -> tensor over the files of a checkpoint folder: one safetensors file, sharded safetensors
    with an index, or pytorch_model.bin (single or sharded)."""

    def __init__(self, path: str):
        self.path = path
        self._open = {}
        if os.path.isfile(os.path.join(path, SAFE_INDEX)) or os.path.isfile(os.path.join(path, BIN_INDEX)):
            index = SAFE_INDEX if os.path.isfile(os.path.join(path, SAFE_INDEX)) else BIN_INDEX
            with open(os.path.join(path, index)) as f:
                self.where = json.load(f)["weight_map"]
        else:
            single = [f for f in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(path, f))]
            if not single:
                raise FileNotFoundError(f"no weights in {path!r}: expected model.safetensors, {SAFE_INDEX}, "
                                        f"pytorch_model.bin or {BIN_INDEX}")
            self.where = {name: single[0] for name in self._file(single[0]).keys()}

    def _file(self, fname: str):
        if fname not in self._open:
            full = os.path.join(self.path, fname)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"weight file {full!r} named by the checkpoint index is missing")
            try:
                if fname.endswith(".safetensors"):
                    from safetensors import safe_open
                    self._open[fname] = safe_open(full, framework="pt", device="cpu")
                else:
                    self._open[fname] = torch.load(full, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # truncated or corrupt file: name it
                raise ValueError(f"weight file {full!r} is unreadable (truncated or corrupt?): {e}") from None
        return self._open[fname]

    def names(self):
        return self.where.keys()

    def get(self, name: str) -> torch.Tensor:
        f = self._file(self.where[name])
        try:
            return f.get_tensor(name) if hasattr(f, "get_tensor") else f[name]
        except Exception as e:
            raise ValueError(f"tensor {name!r} could not be read from "
                             f"{os.path.join(self.path, self.where[name])!r} (truncated?): {e}") from None


def _resolve(source, name: str, where: str) -> str:
    """Find `name` in the source, allowing checkpoints saved without the top module prefix
    (e.g. Bloom's original `h.0...` instead of `transformer.h.0...`)."""
    names = source.names()
    if name in names:
        return name
    short = name.split(".", 1)[1] if "." in name else name
    if short in names:
        return short
    raise ValueError(f"tensor {name!r} is missing from {where}")


def build_model(cfg, layer_ids, source, dtype: torch.dtype, device, where: str = "the checkpoint"):
    """Instantiate the family's model holding `layer_ids` and fill it from `source` (an object with
    names() and get(name)), casting to dtype on device."""
    cls = MODEL_CLASSES[cfg.family]
    with torch.device("meta"):
        model = cls(cfg, layer_ids)
    convert = getattr(cls, "convert", None)
    state, loaded = {}, {}
    for ours, p in model.named_parameters(remove_duplicate=False):
        hf = tuple(cls.hf_names(cfg, ours))
        if hf not in loaded:  # tied weights are read once and shared
            parts = [source.get(_resolve(source, n, where)) for n in hf]
            t = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
            t = convert(cfg, ours, t) if convert else t
            if t.shape != p.shape:
                raise ValueError(f"tensor {hf[0]!r} in {where} has shape {tuple(t.shape)}, "
                                 f"expected {tuple(p.shape)} from config.json")
            loaded[hf] = t.to(device=device, dtype=dtype)
        state[ours] = loaded[hf]
    model.load_state_dict(state, assign=True, strict=True)
    state.clear()
    loaded.clear()  # the model holds the only references now, so folding frees each tensor it replaces
    if hasattr(model, "fold_norms"):  # norm weights into the next projection (models/llama.py)
        model.fold_norms()
    model.init_buffers(device)  # computed tables (rotary, ALiBi) were made on meta: rebuild them
    return model.eval().requires_grad_(False)
