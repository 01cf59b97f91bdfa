"""Drawing the next token from logits on the device, without a host sync.

The same torch ops on every device: each step is one device kernel already (topk, sort, softmax,
cumsum, exponential_, argmax) and the noise must come from a seeded torch.Generator, so a Triton kernel
would not pay. Known cost: top-p sorts the vocabulary, ~0.45-0.57 ms per step on an H200
(bench/results/kernel_bench_h200.md), which a sort-free threshold search could remove.
"""
from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering as transformers' warpers do: filtered
    entries become -inf. logits: [B, V] -> fp32 [B, V]."""
    logits = logits.float() / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(1, idx, remove), float("-inf"))
    return logits


def sample(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None) -> torch.Tensor:
    """Token ids [B] (int64) from logits [B, V]; temperature 0 or top_k 1 is greedy."""
    if temperature == 0 or top_k == 1:
        return torch.argmax(logits, dim=-1)
    return draw(probabilities(logits, temperature, top_k, top_p), generator)


def probabilities(logits, temperature=1.0, top_k=0, top_p=1.0) -> torch.Tensor:
    """The distribution sample() draws from: fp32 [B, V], filtered entries 0."""
    return torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)


def draw(weights: torch.Tensor, generator=None) -> torch.Tensor:
    """One index per row of non-negative weights [B, V] (need not sum to 1), without a host sync:
    argmax(w / E), E ~ Exp(1), is a draw proportional to w."""
    noise = torch.empty_like(weights).exponential_(1, generator=generator)
    # a filtered token has w == 0; should E ever be exactly 0, 0/0 = NaN would win argmax: keep it out
    return torch.argmax((weights / noise).masked_fill(weights == 0, -1.0), dim=-1)
