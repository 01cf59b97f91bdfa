"""CUDA graphs for the decode step (and the speculative verify pass) and for short prompt passes,
captured on first use, then replayed.

A decode step of a 7B model is a few hundred small kernels; launched one by one from Python they cost
more than the weights take to stream at batch 1. Every sequence shares the schedule, so the step is a
static program: capture it once per batch-size bucket (and layer set: one for a static schedule, one per
depth for SkipDecode) with static token/position buffers and logits; then each step is two small copies
and one replay.

A short prompt pass is launch-bound the same way (~20 kernels per layer from Python: ~20 ms for a
128-token prompt of a 7B model, where reading the weights takes ~4 ms), so prompt passes of up to
PREFILL_GRAPH_TOKENS padded tokens are graphs too, one per (batch bucket, length bucket). Longer ones
run eagerly: there the GEMMs take longer than the launches, and a graph per shape would only cost memory.
"""
from __future__ import annotations

import gc

import torch

# batch bucket x length bucket up to which the prompt pass is a graph. By FLOP count, 512 tokens of a 7B
# model are ~10 ms of GEMMs on an H200, less than the eager launches (23.7 ms measured at 128 tokens), so
# however much of a pass this size is padding (batch and length round up separately), the replay wins.
PREFILL_GRAPH_TOKENS = 512
MIN_PREFILL_BUCKET = 16


def buckets(max_batch_size: int) -> list[int]:
    out, b = [], 1
    while b < max_batch_size:
        out.append(b)
        b *= 2
    return out + [max_batch_size]


def _batch_bucket(sizes: list[int], n: int) -> int:
    return next(s for s in sizes if s >= n)


def length_bucket(n: int, max_seq_len: int) -> int:
    """The padded length of n prompt tokens in a graph (a prompt pass or a chunk): a power of two, at
    least MIN_PREFILL_BUCKET, at most max_seq_len."""
    return min(max(MIN_PREFILL_BUCKET, 1 << (n - 1).bit_length()), max_seq_len)


def prefill_bucket(n: int, length: int, max_batch_size: int, max_seq_len: int,
                   max_tokens: int = PREFILL_GRAPH_TOKENS) -> tuple[int, int] | None:
    """(batch bucket, padded length) of the graph that runs n prompts of up to `length` tokens, or None
    when the padded pass exceeds max_tokens (it then runs eagerly). Lengths round up to a power of two
    (at least MIN_PREFILL_BUCKET, at most max_seq_len), so few shapes are ever captured."""
    b = _batch_bucket(buckets(max_batch_size), n)
    t = length_bucket(length, max_seq_len)
    return (b, t) if b * t <= max_tokens else None


def _capture(fn, args, pool, device):
    """Warm up off the default stream (Triton compiles, cuBLAS picks kernels), then capture fn(*args).
    Python's cyclic GC is off during the capture: a collection there can free an old engine's graphs, and
    destroying a graph while a stream captures invalidates the capture (seen as a cuBLAS failure)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(*args)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool):
            out = fn(*args)
    finally:
        if collecting:
            gc.enable()
    return graph, out


class DecodeGraphs:
    """Decode steps (tokens [n]: one new token per sequence) and speculative verify passes (tokens [n, T]:
    T new tokens per sequence from positions[b] on), a graph per (batch bucket, T, layer set)."""

    def __init__(self, step_fn, max_batch_size: int, max_seq_len: int, device):
        self.step_fn, self.device = step_fn, device
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.sizes = buckets(max_batch_size)
        self.graphs = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.buffers = {}  # T (None: decode) -> static tokens [max_batch, (T)], positions [max_batch]

    def _buffers(self, T):
        if T not in self.buffers:
            shape = (self.max_batch_size,) if T is None else (self.max_batch_size, T)
            self.buffers[T] = (torch.zeros(shape, dtype=torch.long, device=self.device),
                               torch.zeros(self.max_batch_size, dtype=torch.long, device=self.device))
        return self.buffers[T]

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, layers: tuple) -> torch.Tensor:
        """One step of `layers` (a graph per batch bucket and layer set: one set for a static schedule)."""
        n = tokens.shape[0]
        T = None if tokens.ndim == 1 else tokens.shape[1]
        b = _batch_bucket(self.sizes, n)
        key = (b, T, tuple(layers))
        tok, pos = self._buffers(T)
        if key not in self.graphs:
            # The warm-up really runs: it writes K/V at the last cache positions of every row of the bucket,
            # which a live sequence writes before it reads them, so they never leak into attention.
            pos[:b].fill_(self.max_seq_len - (T or 1))
            self.graphs[key] = _capture(self.step_fn, (tok[:b], pos[:b], tuple(layers)), self.pool, self.device)
        graph, logits = self.graphs[key]
        # padding rows decode token 0 from position 0 into cache rows no sequence uses
        tok[n:b].zero_()
        pos[n:b].zero_()
        tok[:n].copy_(tokens)
        pos[:n].copy_(positions)
        graph.replay()
        return logits[:n]


class PrefillGraphs:
    """Prompt passes that fit prefill_bucket(): right-padded to the bucket's shape, replayed."""

    def __init__(self, prefill_fn, max_batch_size: int, max_seq_len: int, device):
        self.prefill_fn, self.device = prefill_fn, device
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.graphs = {}  # (b, t) -> (graph, static tokens [b, t], static lengths [b], static logits [b, V])
        self.pool = torch.cuda.graph_pool_handle()  # shared by the prefill graphs: one runs at a time

    def fits(self, n: int, length: int) -> bool:
        return prefill_bucket(n, length, self.max_batch_size, self.max_seq_len) is not None

    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens [n, T] right-padded prompts, lengths [n] -> logits [n, V] (the graph's static buffer:
        valid until the next prompt pass). Padding runs after every real token (causal attention: no
        real token sees it) and writes cache rows / positions that no live sequence reads before it
        writes them itself; the same holds for the capture's warm-up runs."""
        n, T = tokens.shape
        key = prefill_bucket(n, T, self.max_batch_size, self.max_seq_len)
        if key is None:
            raise ValueError(f"{n} prompts of {T} tokens exceed the prefill graphs' bucket limit "
                             f"({PREFILL_GRAPH_TOKENS} padded tokens); run them eagerly")
        if key not in self.graphs:
            b, t = key
            tok = torch.zeros(b, t, dtype=torch.long, device=self.device)
            lens = torch.ones(b, dtype=torch.long, device=self.device)
            graph, logits = _capture(self.prefill_fn, (tok, lens), self.pool, self.device)
            self.graphs[key] = (graph, tok, lens, logits)
        graph, tok, lens, logits = self.graphs[key]
        fill_static(tok, lens, tokens, lengths)
        graph.replay()
        return logits[:n]


def fill_static(tok: torch.Tensor, lens: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
    """Copy n prompts [n, T] into a bucket's static buffers tok [b, t] / lens [b]: token 0 after each prompt
    and in the padding rows, whose length 1 only picks the logits row that is read (they still run, and
    write cache rows n..b-1, which no live sequence uses)."""
    n, T = tokens.shape
    tok.zero_()
    tok[:n, :T].copy_(tokens)
    lens.fill_(1)
    lens[:n].copy_(lengths)


class ChunkGraphs:
    """Chunks of a prompt pass in pieces (Engine.prefill_chunk), a graph per chunk-length bucket. A chunk
    writes one row of all prompt-pass layers and attends over the whole row under a position mask, so its
    shapes never depend on where it starts. Eager, the Python launches of a long chunk (~20 per layer) cost
    about as much as its GEMMs, and the serving thread shares the GIL with the HTTP side."""

    def __init__(self, chunk_fn, max_seq_len: int, device):
        self.chunk_fn, self.max_seq_len, self.device = chunk_fn, max_seq_len, device
        self.graphs = {}  # t -> (graph, static logits [1, V])
        self.buffers = {}  # t -> static tokens [1, t], positions [1, t], last index [1]
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """tokens [1, n] at positions start..start+n-1 -> logits [1, V] of the last (the graph's static
        buffer). Padding runs at the positions after the chunk, which a later chunk or decode step writes
        before anything reads them; the CUDA cache write skips those past the row's end."""
        n = tokens.shape[1]
        t = length_bucket(n, self.max_seq_len)
        if t not in self.buffers:
            self.buffers[t] = (torch.zeros(1, t, dtype=torch.long, device=self.device),
                               torch.zeros(1, t, dtype=torch.long, device=self.device),
                               torch.zeros(1, dtype=torch.long, device=self.device))
        tok, pos, last = self.buffers[t]
        tok.zero_()
        tok[:, :n].copy_(tokens)
        torch.arange(start, start + t, device=self.device, out=pos[0])
        last.fill_(n - 1)
        if t not in self.graphs:
            # filled first: the capture's warm-up runs compute this very chunk (the same K/V at the same
            # positions), where dummy inputs would overwrite the earlier chunks' K/V
            self.graphs[t] = _capture(self.chunk_fn, (tok, pos, last), self.pool, self.device)
        graph, logits = self.graphs[t]
        graph.replay()
        return logits
