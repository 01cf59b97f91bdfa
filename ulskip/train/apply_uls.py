"""Make a transformers causal LM train with Unified Layer Skipping semantics (docs/design.md, "The method").

prefill="full" (the paper's): prefix tokens run through all L layers, response tokens through the kept
layers only; at kept layer i a response token attends to the prefix K/V of layer i and to the response
K/V of the skip path, exactly as the engine's compact cache serves them at decode time.
prefill="skip": every token runs through the kept layers only.

How (one pass, exact, and no compute spent on response tokens at skipped layers):
  * kept layer: all tokens, unchanged.
  * skipped layer (prefill="full"): it runs on the first P = max(prefix_lengths) positions only, and its
    output replaces the input where the position is a prefix token of that row:
        h[:, :P] = where(t < prefix_len[b], layer(h[:, :P]), h[:, :P]);  h[:, P:] passes unchanged.
    This is exact because attention is causal: a prefix token never sees a later token, so cutting the
    sequence after P changes nothing for the tokens that keep the layer's output. Rows with a shorter
    prefix waste only their [prefix_len, P) stretch; response-heavy rows cost nothing extra.
  * skipped layer (prefill="skip"): not called at all.
The cut happens in the layer's __call__, outside transformers' gradient checkpointing (which wraps the
layer's forward), so the recomputation in backward sees exactly the cut inputs of the forward.
The prefix of each row is `prefix_lengths` (a [batch] tensor passed to the forward) or, without it, the
position of the row's first label that is not -100 (the first response token); at least 1.
"""
from __future__ import annotations

import torch

from ulskip.schedule import (DYNAMIC_STRATEGIES, SKIPDECODE_HORIZON, check_prefill, layer_speedup, skipdecode,
                             uls_schedule, validate_schedule)
from ulskip.train.patching import install_forward, model_type, patch_model


def decoder_layers(model):
    mt = model_type(model)
    base = getattr(model, model.base_model_prefix)
    return base.h if mt == "bloom" else base.layers


class _ULSContext:
    """What the layers of one model need to know about the forward in flight."""

    def __init__(self, kept, prefill):
        self.kept = set(kept)
        self.prefill = prefill
        self.active = False
        self.p_max = 0
        self.prefix_lengths = None  # [B]
        self.keeps = {}           # J -> (P, [B, P, 1] bool: position t < prefix_len[b] + J), per forward
        self.response_index = None  # packed rows: [B, T] index of each token in its record's response, -1 prefix
        self.seq_len = 0
        self.tuple_out = None     # whether the layers return (hidden, ...) tuples; learned from layer 0

    def begin(self, prefix_lengths, labels, batch, seq_len, device, response_index=None):
        self.seq_len = seq_len
        self.active = True
        self.response_index = None
        if self.prefill == "skip":
            return
        if response_index is not None:  # packed rows (train/data.py PackingCollator)
            ri = torch.as_tensor(response_index, device=device).long()
            if ri.shape != (batch, seq_len):
                raise ValueError(f"response_index must be [batch, seq] = {[batch, seq_len]}, got {list(ri.shape)}")
            self.response_index, self.keeps = ri, {}
            return
        if prefix_lengths is not None:
            pl = torch.as_tensor(prefix_lengths, device=device).reshape(-1).long()
            if pl.numel() != batch:
                raise ValueError(f"prefix_lengths must hold one length per row ({batch}), got shape "
                                 f"{tuple(torch.as_tensor(prefix_lengths).shape)}")
        elif labels is not None:
            resp = labels.to(device) != -100
            first = torch.argmax(resp.int(), dim=1)
            pl = torch.where(resp.any(dim=1), first, torch.full_like(first, seq_len))
        else:  # no way to tell: the whole sequence is prefix (plain full-model forward)
            pl = torch.full((batch,), seq_len, device=device, dtype=torch.long)
        pl = pl.clamp(1, seq_len)
        self.p_max = int(pl.max())
        self.prefix_lengths = pl
        self.keeps = {}

    def keep(self, response_tokens: int):
        """(P, mask): a layer that runs on the prefix and the first `response_tokens` response tokens of each
        row processes positions [0, P) and keeps its output where the mask is set. Packed rows: every
        position runs (P = seq_len; records follow each other, so there is no cut) and the mask picks the
        prefix tokens and the response tokens of index < response_tokens of every record."""
        if self.response_index is not None:
            if response_tokens not in self.keeps:
                self.keeps[response_tokens] = (self.seq_len, (self.response_index < response_tokens).unsqueeze(-1))
            return self.keeps[response_tokens]
        if response_tokens not in self.keeps:
            P = min(self.seq_len, self.p_max + response_tokens)
            pos = torch.arange(P, device=self.prefix_lengths.device)
            mask = (pos[None, :] < (self.prefix_lengths + response_tokens)[:, None]).unsqueeze(-1)
            self.keeps[response_tokens] = (P, mask)
        return self.keeps[response_tokens]

    def end(self):
        self.active = False
        self.prefix_lengths, self.keeps, self.response_index = None, {}, None


def _cut(name, v, T, P):
    """Keep the first P of T positions of a layer kwarg."""
    if v is None or P == T or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, tuple) and name == "position_embeddings":  # (cos, sin) [B or 1, T, D]
        return tuple(x[..., :P, :] for x in v)
    if not torch.is_tensor(v):
        if name == "attention_mask":
            raise ValueError(f"apply_uls cannot cut an attention mask of type {type(v).__name__}; use the "
                             "'sdpa' or 'eager' attention implementation")
        return v
    if name == "attention_mask":
        if v.dim() == 4:              # [B, 1, T, T]
            return v[..., :P, :P]
        if v.dim() == 2:              # [B, T] (flash attention's padding mask)
            return v[:, :P]
    elif name in ("position_ids", "alibi"):
        return v[..., :P]             # [B, T] / [B*H, 1, T]
    elif name == "cache_position":
        return v[:P]
    elif v.dim() == 0:                # e.g. num_items_in_batch, passed down by the Trainer
        return v
    raise ValueError(f"apply_uls does not know how to cut the layer argument {name!r} of shape "
                     f"{tuple(v.shape)}")


class _ULSLayerMixin:
    """Mixed into each decoder layer's class (same name, same parameters) by apply_uls."""

    def __call__(self, hidden_states, *args, **kwargs):
        ctx: _ULSContext = self._ulskip_ctx
        if not ctx.active or hidden_states.shape[1] != ctx.seq_len:
            return super().__call__(hidden_states, *args, **kwargs)
        # _ulskip_runs: None = every token runs this layer (a kept layer); J = the prefix and the first J
        # response tokens run it (0 for a skipped layer; SkipDecode's lower layers: J > 0)
        if self._ulskip_runs is None:
            out = super().__call__(hidden_states, *args, **kwargs)
            ctx.tuple_out = isinstance(out, tuple)
            return out
        if ctx.prefill == "skip":
            return (hidden_states, None) if ctx.tuple_out else hidden_states
        if args:
            raise ValueError("apply_uls expects the decoder layer's arguments after hidden_states by name")
        T = hidden_states.shape[1]
        P, keep = ctx.keep(self._ulskip_runs)
        cut = {k: _cut(k, v, T, P) for k, v in kwargs.items()}
        h_in = hidden_states[:, :P]
        out = super().__call__(h_in, **cut)
        h_out = out[0] if isinstance(out, tuple) else out
        h = torch.where(keep, h_out, h_in)
        if P < T:
            h = torch.cat([h, hidden_states[:, P:]], dim=1)
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h


_CLASSES: dict = {}


def _uls_class(cls):
    if issubclass(cls, _ULSLayerMixin):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (_ULSLayerMixin, cls), {"__module__": cls.__module__,
                                                                   "__qualname__": cls.__qualname__})
    return _CLASSES[cls]


def apply_uls(model, target_speedup=None, strategy: str = "paper", prefill: str = "full", schedule=None,
              fused_kernels: bool = False, layer_seed: int = 0, block_influence=None,
              skipdecode_horizon: int = SKIPDECODE_HORIZON):
    """Prepare `model` (a transformers Llama/Mistral/Qwen2/Bloom causal LM) for ULS fine-tuning, in place.

    The kept layers are `schedule` if given, else `uls_schedule(L, target_speedup, strategy)` (any layer
    policy of ulskip.schedule; shortgpt takes block_influence, random layer_seed, skipdecode its depths'
    horizon). Records
    {kept_layers, num_layers, target_speedup, strategy, prefill} in `model.config.ulskip`, so
    save_pretrained writes it into config.json (the engine's default schedule). With prefill="skip" the
    skipped layers never run, so their parameters are frozen (requires_grad=False; DDP needs every
    trainable parameter used). `fused_kernels=True` also calls `patch_model(model)`. Returns the model.
    """
    check_prefill(prefill)
    layers = decoder_layers(model)
    L = len(layers)
    dynamic = None
    if schedule is not None:
        kept = validate_schedule(L, schedule)
        if target_speedup is None:
            target_speedup = layer_speedup(L, kept)
        strategy = "custom"
    else:
        if target_speedup is None:
            raise ValueError("apply_uls needs target_speedup (or an explicit schedule)")
        if strategy in DYNAMIC_STRATEGIES:
            if prefill != "full":
                raise ValueError("skipdecode runs the prompt through all layers: prefill must be 'full'")
            dynamic = skipdecode(L, target_speedup, skipdecode_horizon)
            kept = dynamic.union
        else:
            kept = uls_schedule(L, target_speedup, strategy, seed=layer_seed, block_influence=block_influence)
    ctx = _ULSContext(kept, prefill)
    # a skipped layer must return what the layer class returns; learned from the first kept layer that runs,
    # but with prefill="skip" the first layers may all be skipped (random, shortgpt): Bloom's blocks return
    # tuples, the Llama family's layers a tensor (transformers 5)
    ctx.tuple_out = model_type(model) == "bloom"
    for i, layer in enumerate(layers):
        layer.__class__ = _uls_class(type(layer))
        layer._ulskip_ctx = ctx
        layer._ulskip_runs = dynamic.response_tokens(i) if dynamic else (None if i in ctx.kept else 0)
        if prefill == "skip" and i not in ctx.kept:
            for p in layer.parameters():
                p.requires_grad_(False)
    state = install_forward(model)
    state.uls = ctx
    model.config.ulskip = {"kept_layers": list(kept), "num_layers": L,
                           "target_speedup": float(target_speedup), "strategy": strategy,
                           "prefill": prefill}
    if dynamic is not None:
        model.config.ulskip["skipdecode"] = dynamic.as_dict()
    if fused_kernels:
        patch_model(model)
    return model
