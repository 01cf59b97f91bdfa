"""CUDA graphs for the decode step: one graph per batch-size bucket, replayed every step.

A decode step of a 7B model is ~300 small kernels; launched one by one from Python they cost more
than the weights take to stream at batch 1. Every sequence shares the schedule, so the step is a
static program: capture it once per bucket (static token/position buffers, static logits), then
each step is two small copies and one replay.
"""
from __future__ import annotations

import torch


def buckets(max_batch_size: int) -> list[int]:
    out, b = [], 1
    while b < max_batch_size:
        out.append(b)
        b *= 2
    return out + [max_batch_size]


class DecodeGraphs:
    def __init__(self, decode_fn, max_batch_size: int, max_seq_len: int, device):
        self.decode_fn, self.device = decode_fn, device
        # The warm-up writes K/V at the last cache position of every row of the bucket: a live
        # sequence writes every position before it reads it, so that slot never leaks into attention.
        self.scratch_pos = max_seq_len - 1
        self.sizes = buckets(max_batch_size)
        self.graphs = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.tokens = torch.zeros(max_batch_size, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch_size, dtype=torch.long, device=device)

    def _capture(self, b: int):
        tokens, positions = self.tokens[:b], self.positions[:b]
        positions.fill_(self.scratch_pos)  # the warm-up really runs: keep it off live cache entries
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm up outside the graph: Triton compiles, cuBLAS picks kernels
            for _ in range(2):
                self.decode_fn(tokens, positions)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.decode_fn(tokens, positions)
        self.graphs[b] = (graph, logits)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        b = next(s for s in self.sizes if s >= n)
        if b not in self.graphs:
            self._capture(b)
        graph, logits = self.graphs[b]
        # padding rows decode token 0 at position 0 (one key to read) into cache rows no sequence uses
        self.tokens[n:b].zero_()
        self.positions[n:b].zero_()
        self.tokens[:n].copy_(tokens)
        self.positions[:n].copy_(positions)
        graph.replay()
        return logits[:n]
