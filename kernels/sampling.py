"""Token sampling on the GPU without a host sync: greedy, temperature, top-k, top-p.

Semantics = ulskip.ops.filter_logits_ref / sample_ref (transformers' warper order: temperature, top-k,
top-p; a draw is argmax(p / E) with E ~ Exp(1) from torch, so a seeded torch.Generator reproduces it;
on the same device and generator state `sample` returns exactly what `sample_ref` returns).

Why torch ops and no Triton kernel here: every step below is already a single device kernel with no
host sync (topk, sort, softmax, cumsum, scatter, exponential_, argmax; temperature/top_k/top_p are
Python numbers fixed per CUDA graph), and the data is small: B x V fp32 (64 x 32000 = 8 MB) is ~2 us per
pass at HBM speed, against a decode step of milliseconds. The one costly piece is the sort for top-p
(tens of us at B=64); a sort-free top-p (bisection on the threshold) would need ~30 passes over the
row and break exact agreement with the reference on ties, so it does not pay either. The noise must
come from torch (seeded generator), which also rules out fusing the race into a Triton kernel with its
own RNG. What we do avoid is any .item()/.cpu()/nonzero/boolean indexing.
For CUDA graphs, register the generator with the graph (torch.cuda.CUDAGraph.register_generator_state)
so replays draw fresh noise.
"""
from __future__ import annotations

import torch

from ._common import check_tensor


def _check(logits, temperature, top_k, top_p, generator=None):
    check_tensor("logits", logits, ndim=2)
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a float >= 0 (0 means greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be a float in (0, 1] (1 disables it), got {top_p!r}")
    if generator is not None and torch.device(generator.device).type != logits.device.type:
        raise ValueError(f"generator is on {generator.device}, logits on {logits.device}; they must match")


def filter_logits(logits, temperature, top_k, top_p):
    """Temperature, top-k, then top-p; filtered entries -inf. [B, V] -> fp32 [B, V] (as the reference)."""
    _check(logits, temperature, top_k, top_p)
    if temperature <= 0:
        raise ValueError("filter_logits needs temperature > 0 (temperature 0 is greedy: use sample)")
    x = logits.float() / temperature
    V = x.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, idx = torch.sort(x, dim=-1, descending=False)
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[:, -1] = False  # always keep the most likely token
        x = x.masked_fill(remove.scatter(1, idx, remove), float("-inf"))
    return x


def sample(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """logits [B, V] -> token ids [B] int64 on logits' device, no host sync.

    temperature == 0 or top_k == 1 is greedy (argmax; no noise is drawn)."""
    _check(logits, temperature, top_k, top_p, generator)
    if temperature == 0 or top_k == 1:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    race = probs / noise
    # A filtered token has p == 0; should E ever be exactly 0, 0/0 = NaN would win argmax: keep it out.
    race = race.masked_fill(probs == 0, -1.0)
    return torch.argmax(race, dim=-1)
