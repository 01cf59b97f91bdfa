"""What every model family shares: the family interface, the weight map, the step context, attention
dispatch, and the layer loop.

A model holds only the layers it was loaded with (all L for prefill="full", the kept ones for
prefill="skip"); the caller names which layers a forward runs, so one object serves the full prompt
pass and the skip-path decode steps. A family declares, per parameter, which checkpoint tensors it is
built from (`weight_source`); the loader (ulskip.loading.checkpoint) builds the runtime tensors from that
map, fused and folded, so the modules declare only what their forward uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ulskip import ops

if TYPE_CHECKING:  # the cache belongs to the runtime, which imports the models, not the other way
    from ulskip.runtime.cache import CompactKVCache


@dataclass(frozen=True)
class WeightSource:
    """How one runtime parameter is built from checkpoint tensors (Hugging Face names):
    concat(tensors, dim 0) -> convert (a family's relayout, e.g. Bloom's per-head qkv) -> cast to the
    model dtype -> times the norm weight `fold` along the input dim (a norm folded into the projection
    after it: rms_norm(h, g) @ W^T = rms_norm(h) @ (W * g)^T, one rounding of W * g in the model dtype)."""
    tensors: tuple[str, ...]
    fold: str | None = None
    convert: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class Step:
    positions: torch.Tensor                 # [B, T] absolute positions of the new tokens
    cache: CompactKVCache | None            # kept layers write (and in decode, read) here
    decode: bool                            # new tokens attend over the cache (T = 1, or a verify pass)
    cos: torch.Tensor | None = None         # [B, T, D] rotary tables (Llama family)
    sin: torch.Tensor | None = None
    slopes: torch.Tensor | None = None      # [Hq] ALiBi slopes (Bloom)
    seq_lens: torch.Tensor | None = None    # decode: [B] keys visible to the last new token (position + 1)
    chunk: bool = False                     # prompt pass in pieces: attend over the whole cache row by position


def attention(q, k, v, step: Step, layer: int, scale: float, slopes=None, rope: bool = True) -> torch.Tensor:
    """q: [B, T, Hq, D], k, v: [B, T, Hkv, D], before rotary (rope=False: none, Bloom). A cached layer
    writes its k/v into the compact cache; decode attends over the cache, the prompt pass over its own
    keys. -> [B, T, Hq*D]"""
    B, T, Hq, D = q.shape
    kv = step.cache.layer(layer, B) if step.cache is not None else None
    if step.decode:  # one fused kernel rotates q and k and writes k, v into the cache
        q = ops.rotary_cache_write(q, k, v, step.cos, step.sin, kv[0], kv[1], step.positions, rotary=rope)
        if T == 1:
            return ops.decode_attention(q[:, 0], kv[0], kv[1], step.seq_lens, scale, slopes).reshape(B, 1, Hq * D)
        # a speculative verify pass: T consecutive new tokens per sequence, causal among themselves
        return ops.verify_attention(q, kv[0], kv[1], step.seq_lens, scale, slopes).reshape(B, T, Hq * D)
    if rope:
        q, k = ops.rotary(q, step.cos, step.sin), ops.rotary(k, step.cos, step.sin)
    if kv is not None:
        ops.cache_write(kv[0], kv[1], k, v, step.positions)
    if step.chunk:
        return chunk_attention(q, kv[0], kv[1], step.positions, scale, slopes).reshape(B, T, Hq * D)
    return prefill_attention(q, k, v, scale, slopes).reshape(B, T, Hq * D)


def prefill_attention(q, k, v, scale, slopes=None):
    """Causal self-attention of a prompt that starts at position 0 (right padding is harmless: pads
    come after every real token). Through torch's SDPA, which picks flash/memory-efficient kernels."""
    return _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, slopes).transpose(1, 2)


def chunk_attention(q, k_cache, v_cache, positions, scale, slopes=None):
    """A chunk of a prompt pass in pieces: q [B, T, Hq, D] at `positions` [B, T] over the whole cache rows
    [B, Hkv, S, D] (the chunk's own K/V written first), key j visible to a query at position p when j <= p.
    Shapes do not depend on where the chunk starts, so one CUDA graph per chunk length serves every chunk."""
    j = torch.arange(k_cache.shape[2], device=q.device)
    visible = (j.view(1, 1, -1) <= positions.unsqueeze(-1)).unsqueeze(1)  # [B, 1, T, S]
    return _attend(q.transpose(1, 2), k_cache, v_cache, scale, slopes, visible).transpose(1, 2)


def _attend(q, k, v, scale, slopes=None, visible=None):
    """SDPA of q [B, Hq, T, D] over k, v [B, Hkv, S, D] (GQA: each KV head repeated for its query heads).
    visible: bool [B or 1, 1, T, S] (None: causal from position 0, flash attention where no ALiBi);
    ALiBi adds slope_h * j for key position j."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if visible is None:
        if slopes is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        j = torch.arange(q.shape[2], device=q.device)
        visible = (j.view(1, -1) <= j.view(-1, 1)).view(1, 1, q.shape[2], q.shape[2])
    mask = visible
    if slopes is not None:
        bias = slopes.to(q.device).view(1, -1, 1, 1) * torch.arange(k.shape[2], device=q.device).view(1, 1, 1, -1).float()
        mask = bias.masked_fill(~visible, float("-inf")).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class DecoderLM(nn.Module):
    """The layer loop; a family subclasses it and provides the five methods below and layer_prefix."""
    layer_prefix: str = ""  # checkpoint name prefix of the decoder layers ("model.layers."), then "<i>."

    def __init__(self, cfg, layer_ids):
        super().__init__()
        self.cfg = cfg
        self.layer_ids = sorted(layer_ids)
        self.layers = nn.ModuleDict({str(i): self.make_layer(cfg) for i in self.layer_ids})

    # ------------------------------------------------------------------ the family interface
    @staticmethod
    def make_layer(cfg) -> nn.Module:
        """One decoder layer: forward(x, stats, step, layer_index) -> (x, stats)."""
        raise NotImplementedError

    @staticmethod
    def weight_source(cfg, name: str) -> WeightSource:
        """Our parameter name -> the checkpoint tensors it is built from."""
        raise NotImplementedError

    def init_buffers(self, device) -> None:
        """Computed tables (rotary frequencies, ALiBi slopes), after the weights are in place."""
        raise NotImplementedError

    def embed(self, tokens, step: "Step") -> torch.Tensor:
        """tokens [B, T] -> the residual stream [B, T, H]; may fill per-step tables into `step`."""
        raise NotImplementedError

    def head(self, x, stats) -> torch.Tensor:
        """Last hidden state [B, H] (and its norm statistics or None) -> logits [B, V]."""
        raise NotImplementedError

    def forward(self, tokens, step: Step, run_layers, last_index=None, all_logits: bool = False) -> torch.Tensor:
        """tokens: [B, T]. Runs `run_layers` in order; returns fp32 logits [B, V] of the token at
        last_index[b] (decode: the only token), or with all_logits those of every token, [B, T, V]."""
        missing = [i for i in run_layers if str(i) not in self.layers]
        if missing:
            raise ValueError(f"layers {missing} were not loaded (loaded: {self.layer_ids})")
        x = self.embed(tokens, step)
        stats = None  # what the layers pass along with the stream (Llama: norm statistics; Bloom: None)
        for i in run_layers:
            x, stats = self.layers[str(i)](x, stats, step, i)
        if all_logits:
            B, T, H = x.shape
            flat = None if stats is None else stats.reshape(B * T, -1)
            return self.head(x.reshape(B * T, H), flat).float().view(B, T, -1)
        if last_index is not None:
            rows = torch.arange(x.shape[0], device=x.device)
            x = x[rows, last_index].unsqueeze(1)
            stats = None if stats is None else stats[rows, last_index].unsqueeze(1)
        return self.head(x[:, -1], None if stats is None else stats[:, -1]).float()
