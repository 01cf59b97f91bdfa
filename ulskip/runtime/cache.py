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

    def layer(self, layer: int, batch: int, start: int = 0):
        """(k, v) views [batch, Hkv, S, D] of one kept layer (cache rows start..start+batch-1), or None for
        a layer that is not cached."""
        i = self.slot.get(layer)
        return None if i is None else (self.k[i, start:start + batch], self.v[i, start:start + batch])

    def reorder_(self, index: torch.Tensor, length: int) -> None:
        """Beam search: row b of the cache becomes old row index[b] (rows 0..len(index)-1); only the
        first `length` positions are live, so only they are copied."""
        n = index.numel()
        self.k[:, :n, :, :length] = self.k[:, index, :, :length]
        self.v[:, :n, :, :length] = self.v[:, index, :, :length]
