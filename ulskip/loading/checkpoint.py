"""Weights from a local Hugging Face checkpoint folder (or a live transformers model) into our models.

Only the tensors the model needs are read: with prefill="skip" the skipped layers' weights are never
touched (safetensors reads tensors lazily; .bin files are memory-mapped). What each runtime tensor is
built from is the family's weight map (`weight_source` in ulskip/models/).
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


class StateDictTensors:
    """The same names()/get() view over a live model's state dict (Engine.from_hf_model)."""

    def __init__(self, state: dict):
        self.state = state

    def names(self):
        return self.state.keys()

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]


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


def _read(source, names, where):
    parts = [source.get(_resolve(source, n, where)) for n in names]
    return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]


def build_model(cfg, layer_ids, source, dtype: torch.dtype, device, where: str = "the checkpoint"):
    """Instantiate the family's model holding `layer_ids` and fill each parameter from `source` (an object
    with names() and get(name)) as the family's weight map says: concatenated, converted, cast to dtype on
    device, norm weights folded in. One parameter at a time, so peak memory is the model plus one tensor."""
    cls = MODEL_CLASSES[cfg.family]
    with torch.device("meta"):
        model = cls(cfg, layer_ids)
    state, shared = {}, {}
    for ours, p in model.named_parameters(remove_duplicate=False):
        spec = cls.weight_source(cfg, ours)
        t = shared.get(spec.tensors)  # tied weights (Bloom's head) are read once and shared
        if t is None:
            t = _read(source, spec.tensors, where)
            t = spec.convert(t) if spec.convert else t
            if t.shape != p.shape:
                raise ValueError(f"tensor {spec.tensors[0]!r} in {where} has shape {tuple(t.shape)}, "
                                 f"expected {tuple(p.shape)} from config.json")
            t = t.to(device=device, dtype=dtype)
        if spec.fold is None:
            shared[spec.tensors] = t
        else:
            g = _read(source, (spec.fold,), where).to(device=device, dtype=dtype)
            t = (t.float() * g.float()).to(dtype)
        state[ours] = t
    model.load_state_dict(state, assign=True, strict=True)
    model.init_buffers(device)  # computed tables (rotary, ALiBi) were made on meta: rebuild them
    return model.eval().requires_grad_(False)
