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
            index = os.path.join(path, SAFE_INDEX if os.path.isfile(os.path.join(path, SAFE_INDEX)) else BIN_INDEX)
            try:
                with open(index) as f:
                    data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"checkpoint index {index!r} is not valid JSON: {e}") from None
            wm = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise ValueError(f"checkpoint index {index!r} has no 'weight_map' object (tensor name -> file name)")
            self.where = wm
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
    """The tensors `names`, concatenated along dim 0 (fused projections: their input widths must agree)."""
    parts = [source.get(_resolve(source, n, where)) for n in names]
    for n, t in zip(names[1:], parts[1:]):
        if t.shape[1:] != parts[0].shape[1:]:
            raise ValueError(f"tensor {n!r} in {where} has shape {tuple(t.shape)}, but {names[0]!r} has "
                             f"{tuple(parts[0].shape)}: they are fused along dim 0, so all dims but the first "
                             "must agree (check hidden_size / head_dim in config.json)")
    return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]


def _check_finite(name: str, t: torch.Tensor, where: str, raw: torch.Tensor | None = None) -> None:
    """t (as loaded, in the model dtype) holds only finite values; raw: the checkpoint's tensor, looked at
    only when t does not, to tell a corrupt checkpoint from an overflow of the dtype it is loaded in."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        if raw is not None and raw.is_floating_point() and bool(torch.isfinite(raw).all()):
            raise ValueError(f"tensor {name!r} in {where} holds values (max |w| = {float(raw.abs().max()):.4g}) that "
                             f"overflow {t.dtype}: load it in float32 or bfloat16")
        raise ValueError(f"tensor {name!r} in {where} holds {bad} non-finite values (NaN or inf): the checkpoint "
                         "is corrupt or its training diverged")


def _check_layer_tensors(cls, cfg, source, where) -> None:
    """Tensors of layers the config does not have (num_hidden_layers too small for the weights)."""
    prefix = cls.layer_prefix
    beyond = sorted({int(n[len(p):].split(".", 1)[0]) for n in source.names()
                     for p in (prefix, prefix.split(".", 1)[-1])
                     if n.startswith(p) and n[len(p):].split(".", 1)[0].isdigit()
                     and int(n[len(p):].split(".", 1)[0]) >= cfg.num_layers})
    if beyond:
        raise ValueError(f"{where} holds tensors of layers {beyond[:5]}{'...' if len(beyond) > 5 else ''} but "
                         f"config.json says the model has {cfg.num_layers} layers: the config and the weights "
                         "disagree")


def build_model(cfg, layer_ids, source, dtype: torch.dtype, device, where: str = "the checkpoint"):
    """Instantiate the family's model holding `layer_ids` and fill each parameter from `source` (an object
    with names() and get(name)) as the family's weight map says: concatenated, converted, cast to dtype on
    device, norm weights folded in. One parameter at a time, so peak memory is the model plus one tensor."""
    cls = MODEL_CLASSES[cfg.family]
    _check_layer_tensors(cls, cfg, source, where)
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
            raw, t = t, t.to(device=device, dtype=dtype)
            _check_finite(spec.tensors[0] if len(spec.tensors) == 1 else "+".join(spec.tensors), t, where, raw)
            del raw
        if spec.fold is None:
            shared[spec.tensors] = t
        else:
            g = _read(source, (spec.fold,), where).to(device=device, dtype=dtype)
            _check_finite(spec.fold, g, where)
            t = (t.float() * g.float()).to(dtype)
            _check_finite(f"{spec.tensors[0]} x {spec.fold} (folded)", t, where)
        state[ours] = t
    model.load_state_dict(state, assign=True, strict=True)
    model.init_buffers(device)  # computed tables (rotary, ALiBi) were made on meta: rebuild them
    return model.eval().requires_grad_(False)
