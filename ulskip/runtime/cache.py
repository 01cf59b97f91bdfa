"""Compact KV cache: K and V of the kept layers only (docs/design.md, "The method").

Skipped layers' KV is never read after the prompt, so it is never stored: the cache holds K of L
layers. It is allocated once, statically, for (max_batch_size, max_seq_len), so decode steps have
fixed shapes (CUDA graphs) and no allocation happens inside generation.
"""
from __future__ import annotations

import torch


class CompactKVCache:
    def __init__(self, kept_layers, max_batch_size: int, num_kv_heads: int, max_seq_len: int,
                 head_dim: int, dtype: torch.dtype, device):
        self.kept_layers = list(kept_layers)
        self.slot = {layer: i for i, layer in enumerate(self.kept_layers)}
        shape = (len(self.kept_layers), max_batch_size, num_kv_heads, max_seq_len, head_dim)
        # Zeros, not empty: masked keys get zero attention weight, and 0 * garbage could be NaN.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_needed(num_kept, max_batch_size, num_kv_heads, max_seq_len, head_dim, dtype) -> int:
        """What the cache allocates (K and V), computed before allocating."""
        elt = torch.empty((), dtype=dtype).element_size()
        return 2 * num_kept * max_batch_size * num_kv_heads * max_seq_len * head_dim * elt

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def layer(self, layer: int, batch: int):
        """(k, v) views [batch, Hkv, S, D] of one kept layer (cache rows 0..batch-1), or None for a layer
        that is not cached."""
        i = self.slot.get(layer)
        return None if i is None else (self.k[i, :batch], self.v[i, :batch])

    def reorder_(self, index: torch.Tensor, length: int) -> None:
        """Beam search: row b of the cache becomes old row index[b] (rows 0..len(index)-1); only the
        first `length` positions are live, so only they are copied."""
        n = index.numel()
        self.k[:, :n, :, :length] = self.k[:, index, :, :length]
        self.v[:, :n, :, :length] = self.v[:, index, :, :length]

    @classmethod
    def over(cls, kept_layers, k: torch.Tensor, v: torch.Tensor) -> "CompactKVCache":
        """A cache over given K/V tensors [L, B, Hkv, S, D] (a view of a staging buffer), allocating nothing."""
        cache = cls.__new__(cls)
        cache.kept_layers = list(kept_layers)
        cache.slot = {layer: i for i, layer in enumerate(cache.kept_layers)}
        cache.k, cache.v = k, v
        return cache


class StagingCache:
    """Where prompt passes into chosen rows of a running batch write first (continuous batching): a pass of
    b prompts padded to t tokens writes a contiguous [L, b, Hkv, t, D] view of one flat buffer of `capacity`
    tokens per layer, then each prompt's K/V is copied into its own row of the compact cache. The pass
    itself (and its CUDA graph) always writes rows from 0, so it cannot write the batch's rows directly;
    one flat buffer holds any pass shape of up to `capacity` tokens in the memory of one cache row."""

    def __init__(self, kept_layers, capacity: int, num_kv_heads: int, head_dim: int, dtype, device):
        self.kept_layers, self.capacity = list(kept_layers), capacity
        self.width = num_kv_heads * head_dim
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.k = torch.zeros(len(self.kept_layers), capacity * self.width, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def view(self, b: int, t: int) -> CompactKVCache:
        if b * t > self.capacity:
            raise ValueError(f"a prompt pass of {b} x {t} tokens exceeds the staging buffer ({self.capacity} tokens)")
        shape = (len(self.kept_layers), b, self.num_kv_heads, t, self.head_dim)
        n = b * t * self.width
        return CompactKVCache.over(self.kept_layers, self.k[:, :n].view(shape), self.v[:, :n].view(shape))

