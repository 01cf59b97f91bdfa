"""Batched generation with Unified Layer Skipping over a compact KV cache.

Data flow: checkpoint folder -> config + schedule -> model (kept layers, fused weights) -> Engine
(static compact cache) -> tokens. The prompt pass runs all layers (prefill="full") or the kept ones
(prefill="skip"); every decode step runs the kept layers only, and every sequence of the batch shares
that schedule, so a decode step is one fixed program.
"""
from __future__ import annotations

import copy
import numbers
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ulskip.arguments import integer
from ulskip.kernels.decode_attention import MAX_VERIFY_TOKENS
from ulskip.loading.checkpoint import CheckpointTensors, StateDictTensors, build_model
from ulskip.loading.config import check_config, from_hf, load_config
from ulskip.loading.tokenizer import check_eos_ids, generation_eos_ids, load_tokenizer
from ulskip.models.base import Step
from ulskip.runtime.beam import beam_search
from ulskip.runtime.cache import CompactKVCache, StagingCache
from ulskip.runtime.generation import GenerationConfig
from ulskip.runtime.graphs import (
    PREFILL_GRAPH_TOKENS,
    ChunkGraphs,
    DecodeGraphs,
    PrefillGraphs,
    length_bucket,
    prefill_bucket,
)
from ulskip.runtime.penalties import TokenHistory, apply_penalties_
from ulskip.runtime.sampling import sample
from ulskip.runtime.speculative import check_speculative, draft_layers, speculative_decode, speculative_stream
from ulskip.runtime.text import SequenceEnds, check_stop, cut_at_stop
from ulskip.runtime.transfer import to_device
from ulskip.schedule import check_prefill, make_plan

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
EOS_CHECK_EVERY = 8  # steps between host syncs that look for "all sequences finished"
PER_ROW = ("do_sample", "temperature", "top_k", "top_p", "seed")  # generate()/stream() take these per prompt too


@dataclass
class GenerationOutput:
    sequences: list[list[int]]                      # new tokens per prompt, up to and including EOS
    scores: list[torch.Tensor] | None = None        # per step: [rows, V] fp32 logits before sampling
    texts: list[str] | None = field(default=None)   # decoded sequences, when a tokenizer is present
    finish_reasons: list[str] | None = None         # per prompt: "stop" (EOS or a stop string) or "length"
    speculative: dict | None = None                 # with speculative=: acceptance_rate, tokens_per_verify, ...


@dataclass
class TokenEvent:
    """One new token of one sequence, as Engine.stream hands it out."""
    index: int                  # which prompt
    token_id: int
    text: str                   # the new text ("" while a multi-token character is incomplete)
    finish_reason: str | None   # on the sequence's last event: "stop" (EOS or a stop string) or "length"


def _parse_dtype(dtype):
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or torch.float32 / float16 / bfloat16, "
                         f"got {dtype!r}")
    return DTYPES[dtype]


def default_dtype(checkpoint_dtype, device: torch.device) -> torch.dtype:
    """The dtype a checkpoint runs in when none is given. On a GPU its own half-precision dtype, and bf16
    for a float32 one (what `ulskip train` saves: fp32 master weights), as vLLM's "auto" casts fp32 to half:
    decoding is bound by the bytes read per step, and fp32 reads twice as many (fp16 where the GPU lacks
    bf16). On the CPU float32, the reference the exactness tests compare against transformers."""
    if device.type != "cuda":
        return torch.float32
    if checkpoint_dtype in (torch.float16, torch.bfloat16):
        return checkpoint_dtype
    with torch.cuda.device(device):
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
    warnings.warn(f"{device} has no bf16: this float32 checkpoint runs in fp16, whose range is narrower (an "
                  "overflow would show as inf/NaN); pass dtype='fp32' to keep float32", stacklevel=3)
    return torch.float16


def _parse_device(device) -> torch.device:
    """cpu, cuda or cuda:N (available), as a string or torch.device; None: cuda when available."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine (use 'cpu')")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory the cache would come from: the GPU's free bytes, or the host's MemAvailable."""
    if device.type == "cuda":  # free on the device + what torch holds reserved but unused (load temporaries)
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - \
            torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _default_max_seq_len(cfg) -> int:
    return min(cfg.max_position_embeddings, 2048, cfg.sliding_window or 2048)


class Engine:
    def __init__(self, model, kept_layers, prefill: str = "full", max_batch_size: int = 8,
                 max_seq_len: int = 2048, tokenizer=None, cuda_graphs: bool = True, skipdecode=None,
                 generation_eos=None):
        check_prefill(prefill)
        max_batch_size = integer("max_batch_size", max_batch_size, 1, what="a positive integer")
        max_seq_len = integer("max_seq_len", max_seq_len, 1, what="a positive integer")
        cfg = model.cfg
        if max_seq_len > cfg.max_position_embeddings:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        if cfg.sliding_window and max_seq_len > cfg.sliding_window:
            # Within the window, sliding-window attention is plain causal attention; past it we would
            # need the window mask in every attention kernel, which is not implemented.
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's sliding_window="
                             f"{cfg.sliding_window}; sequences are limited to the window (not implemented past it)")
        self.model, self.cfg, self.tokenizer = model, cfg, tokenizer
        self.generation_eos = check_eos_ids(generation_eos, cfg.vocab_size, "generation_eos")
        self.kept_layers = list(kept_layers)
        # SkipDecode (ulskip.schedule.SkipDecode): response token j runs step_layers(j), a top slice of
        # kept_layers (their union); None: every step runs kept_layers
        self.skipdecode = skipdecode
        self._kept = tuple(self.kept_layers)  # the decode step's layer set, as the graphs key it
        self._checked_layers = set()
        if skipdecode is not None and (prefill != "full" or self.kept_layers != skipdecode.union):
            raise ValueError("skipdecode needs prefill='full' and kept_layers equal to its union of layers")
        self.prefill_layers = list(range(cfg.num_layers)) if prefill == "full" else self.kept_layers
        self.prefill_mode, self.num_layers = prefill, cfg.num_layers
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        p = next(model.parameters())
        self.device, self.dtype = p.device, _parse_dtype(p.dtype)
        cache_bytes = CompactKVCache.bytes_needed(len(self.kept_layers), max_batch_size, cfg.num_kv_heads,
                                                  max_seq_len, cfg.head_dim, self.dtype)
        free = free_memory_bytes(self.device)
        if free is not None and cache_bytes > free:
            raise ValueError(f"the KV cache for max_batch_size={max_batch_size} x max_seq_len={max_seq_len} "
                             f"({len(self.kept_layers)} kept layers) needs {cache_bytes / 2**30:.2f} GiB, but "
                             f"{self.device} has {free / 2**30:.2f} GiB free; lower max_batch_size or max_seq_len")
        self.cache = CompactKVCache(self.kept_layers, max_batch_size, cfg.num_kv_heads, max_seq_len,
                                    cfg.head_dim, self.dtype, self.device)
        # GPU only, captured on first use: decode steps replay a graph per batch bucket, short prompt
        # passes one per (batch bucket, length bucket)
        graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs = DecodeGraphs(self._decode_eager, max_batch_size, max_seq_len, self.device) if graphs else None
        self.prefill_graphs = PrefillGraphs(self._prefill_eager, max_batch_size, max_seq_len, self.device) \
            if graphs else None
        # prefill_rows (continuous batching): the prompt-pass graphs write rows from 0, where other sequences
        # live, so passes into chosen rows write a staging buffer (through their own graphs on a GPU), then
        # each prompt's K/V is copied into its row (one strided copy per K and V); at most max_seq_len
        # tokens per pass (or a graph bucket's), about the memory of one cache row
        # (allocated on first use: an engine that only runs generate() never holds it)
        self.staging_capacity, self._staging = max(max_seq_len, PREFILL_GRAPH_TOKENS), None
        self.row_prefill_graphs = PrefillGraphs(self._prefill_staging, max_batch_size, max_seq_len, self.device) \
            if graphs else None
        # prefill_chunk: a long prompt's pass in pieces writes a one-row cache of every prompt-pass layer (a
        # chunk attends over the earlier chunks at each layer it runs, and the compact cache holds only the
        # kept ones), copied into the request's row after the last chunk; allocated on first use, one
        # chunked prompt at a time (_chunk_row: its row and next position)
        self._chunk_cache, self._chunk_row, self._chunk_graphs = None, None, None
        # speculative decoding (runtime/speculative.py): per (batch, k, draft layers, EOS count) the state
        # tensors and CUDA graph of a whole greedy round
        self._spec_rounds, self._spec_pool = {}, None
        self.serving = None  # the Scheduler whose thread runs this engine (runtime/scheduler.py), if any

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path, target_speedup=None, schedule=None, prefill=None, dtype=None,
                        device=None, max_batch_size: int = 8, max_seq_len: int | None = None,
                        strategy: str | None = None, cuda_graphs: bool = True, layer_seed: int = 0,
                        block_influence=None):
        """Load a local Hugging Face checkpoint folder. Without target_speedup/schedule, the folder's
        `ulskip` section (written by `ulskip train`) decides the schedule and prefill mode; without
        that section all layers are kept. strategy: the layer policy for target_speedup (ulskip.schedule:
        paper/uls, even, early-exit, shortgpt with block_influence, random with layer_seed); None: the
        schedule the checkpoint was fine-tuned for at target_speedup (one of a several-speedups fine-tune's),
        else the paper's rule. dtype None: default_dtype (on a GPU bf16 for a float32 checkpoint)."""
        cfg = load_config(path)
        plan = make_plan(cfg.num_layers, target_speedup, schedule, prefill, strategy, cfg.ulskip, layer_seed,
                         block_influence)
        device = _parse_device(device)
        dtype = _parse_dtype(dtype) or default_dtype(cfg.torch_dtype, device)
        model = build_model(cfg, plan.load_layers, CheckpointTensors(path), dtype, device, where=repr(path))
        max_seq_len = _default_max_seq_len(cfg) if max_seq_len is None else max_seq_len
        return cls(model, plan.kept_layers, plan.prefill, max_batch_size, max_seq_len, load_tokenizer(path),
                   cuda_graphs, plan.skipdecode, generation_eos_ids(path, cfg.vocab_size))

    @classmethod
    def from_hf_model(cls, hf_model, target_speedup=None, schedule=None, prefill=None,
                      max_batch_size: int = 8, max_seq_len: int | None = None, strategy: str | None = None,
                      tokenizer=None, cuda_graphs: bool = True, layer_seed: int = 0, block_influence=None):
        """Build from a live transformers model (same device and dtype; fused weights are copies)."""
        cfg = check_config(from_hf(hf_model.config), "the model's config")
        plan = make_plan(cfg.num_layers, target_speedup, schedule, prefill, strategy, cfg.ulskip, layer_seed,
                         block_influence)
        p = next(hf_model.parameters())
        if p.dtype not in DTYPES.values():
            raise ValueError(f"the model's dtype is {p.dtype}; the engine runs float32, float16 or bfloat16 "
                             "(cast the model first, e.g. model.to(torch.bfloat16))")
        model = build_model(cfg, plan.load_layers, StateDictTensors(hf_model.state_dict()), p.dtype, p.device,
                            where="the model's state dict")
        max_seq_len = _default_max_seq_len(cfg) if max_seq_len is None else max_seq_len
        gc = getattr(hf_model, "generation_config", None)
        return cls(model, plan.kept_layers, plan.prefill, max_batch_size, max_seq_len, tokenizer, cuda_graphs,
                   plan.skipdecode, getattr(gc, "eos_token_id", None))

    @property
    def eos_token_ids(self) -> list[int]:
        """Where a sequence ends by default (the CLI, the server and `ulskip eval` pass it): the tokenizer's EOS
        and the ids of the checkpoint's generation_config.json, as transformers' generate stops on the latter.
        generate() itself stops only on the eos_token_id it is given."""
        tok = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        return sorted(set(self.generation_eos) | ({tok} if isinstance(tok, int) else set()))

    @property
    def kv_cache_nbytes(self) -> int:
        return self.cache.nbytes

    # ------------------------------------------------------------------ model steps
    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, graphs: bool = True) -> torch.Tensor:
        """The prompt pass: tokens [B, T] right-padded prompts (on the engine's device), lengths [B] ->
        fp32 logits [B, V] of each prompt's last token; writes cache rows 0..B-1, positions 0..T-1.
        Through the prefill layers (all for prefill="full"). graphs=False runs it eagerly; otherwise a
        captured CUDA graph runs it where one fits, and the result is then the graph's static buffer:
        valid until the next prompt pass."""
        if graphs and self.prefill_graphs is not None and self.prefill_graphs.fits(*tokens.shape):
            return self.prefill_graphs(tokens, lengths)
        return self._prefill_eager(tokens, lengths)

    def _prefill_eager(self, tokens: torch.Tensor, lengths: torch.Tensor, cache=None) -> torch.Tensor:
        B, T = tokens.shape
        positions = torch.arange(T, device=self.device).expand(B, T)
        step = Step(positions=positions, cache=self.cache if cache is None else cache, decode=False)
        return self.model(tokens, step, self.prefill_layers, last_index=lengths - 1)

    @property
    def staging(self) -> StagingCache:
        if self._staging is None:
            cfg = self.cfg
            self._staging = StagingCache(self.kept_layers, self.staging_capacity, cfg.num_kv_heads, cfg.head_dim,
                                         self.dtype, self.device)
        return self._staging

    def _prefill_staging(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self._prefill_eager(tokens, lengths, cache=self.staging.view(*tokens.shape))

    @torch.inference_mode()
    def capture_graphs(self, prefill_chunk: int) -> int:
        """Capture now every CUDA graph that continuous batching with a per-step budget of prefill_chunk prompt
        tokens replays: the decode step per batch bucket, shared prompt passes per (batch, length) bucket
        within the budget, and chunks per length bucket when prompts can be longer than the budget. Each is
        otherwise captured the first time it is needed, while requests wait (~150 ms for a 7B model). Writes
        cache rows: call it before any sequence is live. -> the number of graphs captured (0 without graphs)."""
        prefill_chunk = integer("prefill_chunk", prefill_chunk, 1, what="a positive integer (prompt tokens per step)")
        if self.graphs is None:
            return 0

        def count():
            chunks = 0 if self._chunk_graphs is None else len(self._chunk_graphs.graphs)
            return len(self.graphs.graphs) + len(self.row_prefill_graphs.graphs) + chunks

        before = count()
        for b in self.graphs.sizes:
            self.decode(torch.zeros(b, dtype=torch.long, device=self.device),
                        torch.zeros(b, dtype=torch.long, device=self.device))
        # the length buckets: powers of two from MIN_PREFILL_BUCKET, the last one capped at max_seq_len
        lengths = sorted({length_bucket(1 << k, self.max_seq_len) for k in range(4, self.max_seq_len.bit_length() + 1)})
        longest = length_bucket(min(prefill_chunk, self.max_seq_len), self.max_seq_len)  # one prompt's bucket
        for b in self.graphs.sizes:
            for t in lengths:
                fits = b * t <= prefill_chunk or (b == 1 and t <= longest)
                if fits and prefill_bucket(b, t, self.max_batch_size, self.max_seq_len) == (b, t):
                    self.prefill_rows([[0] * t] * b, list(range(b)))
        if prefill_chunk < self.max_seq_len:  # longer prompts run in chunks of up to prefill_chunk tokens
            for t in lengths:
                if t <= longest:
                    self.prefill_chunk([0] * t, 0, 0, t)
        return count() - before

    def prefill_rows_cost(self, n: int, length: int) -> int:
        """Prompt tokens a prefill_rows pass of n prompts of up to `length` tokens computes: its graph's
        padded shape where one runs it, n x length otherwise (the scheduler's per-step budget counts these)."""
        if self.row_prefill_graphs is not None:
            key = prefill_bucket(n, length, self.max_batch_size, self.max_seq_len)
            if key is not None:
                return key[0] * key[1]
        return n * length

    @torch.inference_mode()
    def prefill_rows(self, prompts: list[list[int]], rows: list[int]) -> torch.Tensor:
        """The prompt passes of several sequences in one pass, into cache rows `rows` (continuous batching:
        the other rows keep their sequences) -> fp32 logits [n, V] of each prompt's last token. The pass
        writes the staging buffer (a captured graph on a GPU where the padded pass fits a bucket), then each
        prompt's K/V is copied into its row. At most max_seq_len tokens (n x the longest prompt)."""
        if len(prompts) != len(rows) or not prompts:
            raise ValueError(f"prefill_rows takes one row per prompt, got {len(prompts)} prompts, {len(rows)} rows")
        if len(set(rows)) != len(rows) or not all(0 <= r < self.max_batch_size for r in rows):
            raise ValueError(f"cache rows must be distinct, in [0, {self.max_batch_size}), got {rows}")
        n, T = len(prompts), max(len(p) for p in prompts)
        if T > self.max_seq_len:
            raise ValueError(f"a prompt of {T} tokens exceeds max_seq_len={self.max_seq_len}")
        if min(len(p) for p in prompts) < 1 or n * T > self.staging_capacity:
            raise ValueError(f"prefill_rows takes non-empty prompts of at most {self.staging_capacity} tokens "
                             f"in all (n x the longest), got {n} x {T}")
        tokens = torch.zeros(n, T, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = torch.tensor(p)
        tokens = to_device(tokens, self.device)
        lengths = to_device(torch.tensor([len(p) for p in prompts]), self.device)
        if self.row_prefill_graphs is not None and self.row_prefill_graphs.fits(n, T):
            logits = self.row_prefill_graphs(tokens, lengths)
            staged = self.staging.view(*prefill_bucket(n, T, self.max_batch_size, self.max_seq_len))
        else:
            logits = self._prefill_staging(tokens, lengths)
            staged = self.staging.view(n, T)
        for i, (p, row) in enumerate(zip(prompts, rows)):
            self.cache.k[:, row, :, :len(p)].copy_(staged.k[:, i, :, :len(p)])
            self.cache.v[:, row, :, :len(p)].copy_(staged.v[:, i, :, :len(p)])
        return logits

    @torch.inference_mode()
    def prefill_chunk(self, prompt: list[int], row: int, start: int, size: int) -> torch.Tensor:
        """One chunk of a prompt pass in pieces: prompt[start:start+size] at those positions, attending over
        the chunks before it -> fp32 logits [1, V] of the chunk's last token. Call it for start = 0, then
        for each next chunk in order; after the chunk that ends the prompt, its K/V is in cache row `row`.
        One chunked prompt at a time. On a GPU each chunk replays a graph of its length bucket.
        Continuous batching runs long prompts this way, a chunk per step between decode steps, so the running
        sequences are not stalled by a whole long prompt pass."""
        if not 0 <= row < self.max_batch_size:
            raise ValueError(f"cache row {row} outside [0, {self.max_batch_size})")
        if not 1 <= len(prompt) <= self.max_seq_len:
            raise ValueError(f"a prompt of {len(prompt)} tokens does not fit max_seq_len={self.max_seq_len} "
                             "(prompts must be non-empty)")
        if not (0 <= start < len(prompt) and 1 <= size <= len(prompt) - start):
            raise ValueError(f"chunk [{start}, {start + size}) is not a non-empty piece of the {len(prompt)}-token "
                             "prompt")
        if start == 0:
            self._chunk_row = (row, 0)
        elif self._chunk_row != (row, start):
            now = ("none is in progress" if self._chunk_row is None else
                   f"the one in progress is row {self._chunk_row[0]}, next at position {self._chunk_row[1]}")
            raise ValueError(f"row {row}'s chunk at position {start} does not continue a chunked prompt pass "
                             f"({now}); start it at position 0")
        if self._chunk_cache is None:
            cfg = self.cfg
            self._chunk_cache = CompactKVCache(self.prefill_layers, 1, cfg.num_kv_heads, self.max_seq_len,
                                               cfg.head_dim, self.dtype, self.device)
            # the decode cache's layers within it, a device index made once: a list index is a pageable copy
            self._chunk_slots = torch.tensor([self._chunk_cache.slot[i] for i in self.kept_layers], device=self.device)
            if self.graphs is not None:
                self._chunk_graphs = ChunkGraphs(self._chunk_eager, self.max_seq_len, self.device)
        tokens = to_device(torch.tensor([prompt[start:start + size]]), self.device)
        if self._chunk_graphs is not None:
            logits = self._chunk_graphs(tokens, start)
        else:
            positions = torch.arange(start, start + size, device=self.device).unsqueeze(0)
            logits = self._chunk_eager(tokens, positions, to_device(torch.tensor([size - 1]), self.device))
        self._chunk_row = (row, start + size)
        if start + size == len(prompt):
            self._chunk_row = None
            n, slots = len(prompt), self._chunk_slots
            self.cache.k[:, row, :, :n] = self._chunk_cache.k[slots, 0, :, :n]
            self.cache.v[:, row, :, :n] = self._chunk_cache.v[slots, 0, :, :n]
        return logits

    def _chunk_eager(self, tokens: torch.Tensor, positions: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        step = Step(positions=positions, cache=self._chunk_cache, decode=False, chunk=True)
        return self.model(tokens, step, self.prefill_layers, last_index=last)

    def step_layers(self, j: int) -> tuple[int, ...]:
        """The layers response token j (0 = the first generated token, the first decode step's input) runs."""
        return self._kept if self.skipdecode is None else tuple(self.skipdecode.layers(j))

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, graphs: bool = True,
               layers: list[int] | None = None) -> torch.Tensor:
        """One decode step: tokens [B] at positions [B] (cache rows 0..B-1) through `layers` (default: the
        kept layers; with SkipDecode pass step_layers(j)) -> fp32 logits [B, V]. graphs=False runs it
        eagerly; otherwise (on a GPU) it replays the CUDA graph of its batch bucket (and layer set), and the
        result is the graph's static buffer: valid until the next step."""
        layers = self._kept if layers is None else tuple(layers)
        if layers not in self._checked_layers:  # once per layer set: the cache holds K/V of cached layers only
            missing = [i for i in layers if i not in self.cache.slot]
            if missing or list(layers) != sorted(set(layers)):
                raise ValueError(f"decode layers must be distinct, sorted layers of the compact cache "
                                 f"{self.kept_layers}, got {list(layers)}")
            self._checked_layers.add(layers)
        if graphs and self.graphs is not None:
            return self.graphs(tokens, positions, layers)
        return self._decode_eager(tokens, positions, layers)

    def _decode_eager(self, tokens: torch.Tensor, positions: torch.Tensor, layers) -> torch.Tensor:
        """A decode step (tokens [B]) or a verify pass (tokens [B, T] from positions[b] on: all logits)."""
        if tokens.ndim == 2:
            T = tokens.shape[1]
            pos = positions.unsqueeze(1) + torch.arange(T, device=positions.device)
            step = Step(positions=pos, cache=self.cache, decode=True, seq_lens=positions + T)
            return self.model(tokens, step, list(layers), all_logits=True)
        step = Step(positions=positions.unsqueeze(1), cache=self.cache, decode=True, seq_lens=positions + 1)
        return self.model(tokens.unsqueeze(1), step, list(layers))

    @torch.inference_mode()
    def verify(self, tokens: torch.Tensor, positions: torch.Tensor, graphs: bool = True) -> torch.Tensor:
        """A speculative verify pass through the kept layers: tokens [B, T] (T <= MAX_VERIFY_TOKENS) at
        positions[b] .. positions[b] + T - 1 of cache rows 0..B-1 -> fp32 logits [B, T, V] of every token.
        Writes their K/V at every kept layer; reads the cache before positions[b]. On a GPU a CUDA graph per
        (batch bucket, T): its result is the graph's static buffer, valid until the next verify pass."""
        if tokens.ndim != 2:
            raise ValueError(f"verify takes tokens [batch, T], got shape {tuple(tokens.shape)}")
        T = tokens.shape[1]
        if not 1 <= T <= MAX_VERIFY_TOKENS:
            raise ValueError(f"a verify pass takes 1 to {MAX_VERIFY_TOKENS} tokens per sequence, got {T}")
        if graphs and self.graphs is not None:
            return self.graphs(tokens, positions, self._kept)
        return self._decode_eager(tokens, positions, self._kept)

    # ------------------------------------------------------------------ generation
    def _encode(self, prompts) -> list[list[int]]:
        """A list of prompts (strings, or token-id sequences: lists, 1-d numpy arrays or tensors), or one
        2-d array / tensor of token ids (a row per prompt) -> lists of ints."""
        if isinstance(prompts, (np.ndarray, torch.Tensor)) and prompts.ndim == 2:
            prompts = list(prompts)
        if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of token-id lists or strings (or a 2-d array of "
                             f"token ids, a row per prompt), got {type(prompts).__name__}")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("string prompts need a tokenizer in the checkpoint folder (none found); "
                                     "pass token-id lists instead")
                p = self.tokenizer(p)["input_ids"]
            if isinstance(p, (np.ndarray, torch.Tensor)):
                if p.ndim != 1:
                    raise ValueError(f"prompt {i} must be a 1-d sequence of token ids, got shape {tuple(p.shape)}")
                p = p.tolist()
            if not isinstance(p, (list, tuple)):
                raise ValueError(f"prompt {i} must be a string or a sequence of token ids, got {type(p).__name__}")
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and 0 <= t < self.cfg.vocab_size
                       for t in p):
                raise ValueError(f"prompt {i} must hold token ids in [0, {self.cfg.vocab_size}), got {p!r}")
            out.append([int(t) for t in p])
        return out

    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, num_beams: int = 1, eos_token_id=None, seed=None,
                 output_scores: bool = False, length_penalty: float = 1.0, repetition_penalty: float = 1.0,
                 no_repeat_ngram_size: int = 0, stop=None, speculative=None) -> GenerationOutput:
        """Generate for a batch of prompts (strings or token ids). stop: strings that end a sequence once
        its generated text contains one (transformers' stop_strings: the sequence keeps the token that
        completed it). speculative: {"draft_speedup": s, "num_draft_tokens": k} or a SpeculativeConfig --
        self-speculative decoding (ulskip/runtime/speculative.py) on an engine that holds all layers: the
        ULS schedule of speedup s drafts k tokens, all layers verify them; the output is the full model's."""
        prompts, gen, stops = self._setup(prompts, locals())
        spec, draft = self._check_speculative(speculative, prompts, gen)
        logits, lengths, history = self._start(prompts, gen)
        if spec is not None:
            seqs, stats = speculative_decode(self, logits, lengths, gen, spec, draft)
            cuts = [cut_at_stop(self.tokenizer, s, stops) if stops else (s, False) for s in seqs]
            seqs = [s for s, _ in cuts]
            reasons = ["stop" if hit or (s and s[-1] in gen.eos_ids) else "length" for s, hit in cuts]
            texts = [self.tokenizer.decode(s, skip_special_tokens=True) for s in seqs] if self.tokenizer else None
            return GenerationOutput(sequences=seqs, texts=texts, finish_reasons=reasons, speculative=stats)
        if gen.num_beams > 1:
            seqs, scores = beam_search(self, logits, lengths, gen, history)
            reasons = None
        elif stops:
            seqs, reasons = [[] for _ in prompts], [None] * len(prompts)
            for ev in self._host_loop(logits, lengths, gen, history, stops):
                seqs[ev.index].append(ev.token_id)
                reasons[ev.index] = ev.finish_reason or reasons[ev.index]
            scores = None
        else:
            seqs, scores = self._sample_loop(logits, lengths, gen, history)
            reasons = ["stop" if s and s[-1] in gen.eos_ids else "length" for s in seqs]
        texts = [self.tokenizer.decode(s, skip_special_tokens=True) for s in seqs] if self.tokenizer else None
        return GenerationOutput(sequences=seqs, scores=scores, texts=texts, finish_reasons=reasons)

    @torch.inference_mode()
    def stream(self, prompts, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, eos_token_id=None, seed=None, repetition_penalty: float = 1.0,
               no_repeat_ngram_size: int = 0, stop=None, speculative=None):
        """generate() as it happens: yields a TokenEvent per new token of each sequence, step by step (the
        same tokens generate() returns; with speculative=, round by round). Text pieces need the checkpoint's
        tokenizer; without one they are ""."""
        prompts, gen, stops = self._setup(prompts, locals())
        spec, draft = self._check_speculative(speculative, prompts, gen)
        logits, lengths, history = self._start(prompts, gen)
        if spec is not None:
            for row, token, piece, reason in speculative_stream(self, logits, lengths, gen, spec, draft, stops):
                yield TokenEvent(row, token, piece, reason)
            return
        yield from self._host_loop(logits, lengths, gen, history, stops)

    def _check_speculative(self, speculative, prompts, gen: GenerationConfig):
        """The speculative argument against this engine and call -> (SpeculativeConfig, draft layers), or
        (None, None); warns when the checkpoint was not trained for the draft speedup."""
        spec = check_speculative(speculative)
        if spec is None:
            return None, None
        if gen.num_beams > 1:
            raise ValueError("speculative decoding with beam search is not supported; use num_beams=1")
        if gen.penalized:
            raise ValueError("speculative decoding with repetition_penalty / no_repeat_ngram_size is not supported "
                             "(the penalties would change with every accepted draft)")
        if gen.output_scores:
            raise ValueError("output_scores with speculative decoding is not supported")
        if self.kept_layers != list(range(self.num_layers)) or self.skipdecode is not None:
            raise ValueError(f"speculative decoding verifies with all {self.num_layers} layers, but this engine holds "
                             f"{len(self.kept_layers)} ({self.kept_layers}); load it with target_speedup=1 "
                             "(e.g. Engine.from_pretrained(path, target_speedup=1))")
        longest, k = max(len(p) for p in prompts), spec.num_draft_tokens
        if longest + gen.max_new_tokens + k > self.max_seq_len:
            raise ValueError(f"prompt length {longest} + max_new_tokens {gen.max_new_tokens} + num_draft_tokens {k} = "
                             f"{longest + gen.max_new_tokens + k} exceeds max_seq_len={self.max_seq_len} (a round "
                             "writes k positions past the newest token)")
        return spec, draft_layers(self.num_layers, spec, self.cfg.ulskip)

    def chat_prompt(self, messages) -> list[int]:
        """One conversation ([{"role": ..., "content": ...}, ...]) -> prompt token ids through the
        checkpoint's chat template, ending with the assistant's turn opened."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("chat needs a tokenizer with a chat template in the checkpoint folder (none found); "
                             "pass a plain prompt instead")
        if not isinstance(messages, (list, tuple)) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ValueError("messages must be a non-empty list of {'role': str, 'content': str} dicts, got "
                             f"{messages!r}"[:300])
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat(self, messages, **kwargs) -> GenerationOutput:
        """generate() on conversations: one list of messages, or a list of such lists (a batch)."""
        batch = messages if messages and isinstance(messages, (list, tuple)) and isinstance(messages[0], (list, tuple)) \
            else [messages]
        return self.generate([self.chat_prompt(m) for m in batch], **kwargs)

    def _setup(self, prompts, call: dict):
        """Check one generate / stream call's arguments (nothing runs before they are all valid)."""
        if self.serving is not None:
            raise RuntimeError("this engine serves a running continuous-batching Scheduler, whose requests own "
                               "its cache rows; submit through the scheduler (or close it first)")
        prompts = self._encode(prompts)
        stops = check_stop(call.get("stop"))
        keys = [k for k in ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "num_beams",
                            "eos_token_id", "seed", "output_scores", "length_penalty", "repetition_penalty",
                            "no_repeat_ngram_size") if k in call]
        per_row = [k for k in PER_ROW if isinstance(call.get(k), (list, tuple))]
        if per_row:
            for k in per_row:
                if len(call[k]) != len(prompts):
                    raise ValueError(f"{k} as a list must hold one value per prompt ({len(prompts)}), got "
                                     f"{len(call[k])}: {list(call[k])!r}"[:300])
            # one config per row (each checked like a call of its own), and the shared one with row 0's values
            rows = []
            for i in range(len(prompts)):
                kw = {k: (call[k][i] if k in per_row else call[k]) for k in keys}
                try:
                    rows.append(GenerationConfig(**kw))
                except ValueError as e:
                    raise ValueError(f"prompt {i}: {e}") from None
            gen = copy.copy(rows[0])
            gen.rows = rows
            if gen.num_beams > 1:
                raise ValueError(f"per-prompt {', '.join(per_row)} with beam search is not supported; use num_beams=1")
            if call.get("speculative") is not None:
                raise ValueError(f"per-prompt {', '.join(per_row)} with speculative decoding is not supported")
        else:
            gen = GenerationConfig(**{k: call[k] for k in keys})
        gen.check_vocab(self.cfg.vocab_size)
        if stops and self.tokenizer is None:
            raise ValueError("stop strings need the checkpoint's tokenizer (none found); use eos_token_id instead")
        if stops and gen.num_beams > 1:
            raise ValueError("stop strings with beam search are not supported; use num_beams=1")
        if stops and gen.output_scores:
            raise ValueError("output_scores with stop strings is not supported")
        rows = len(prompts) * gen.num_beams
        if rows > self.max_batch_size:
            raise ValueError(f"{len(prompts)} prompts x {gen.num_beams} beams = {rows} rows exceed max_batch_size="
                             f"{self.max_batch_size}; build the Engine with a larger max_batch_size")
        longest = max(len(p) for p in prompts)
        if longest + gen.max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt length {longest} + max_new_tokens {gen.max_new_tokens} = "
                             f"{longest + gen.max_new_tokens} exceeds max_seq_len={self.max_seq_len}")
        return prompts, gen, stops

    def _start(self, prompts, gen: GenerationConfig):
        """The batch's prompt pass -> (logits of each prompt's last token, lengths, penalty history)."""
        longest = max(len(p) for p in prompts)
        # built on the host, then one copy each (a copy per prompt costs ~10 us apiece at batch 64)
        lengths = torch.tensor([len(p) for p in prompts]).to(self.device)
        tokens = torch.tensor([p + [0] * (longest - len(p)) for p in prompts]).to(self.device)
        logits = self.prefill(tokens, lengths)
        history = TokenHistory(tokens, lengths, gen.max_new_tokens) if gen.penalized else None
        return logits, lengths, history

    def _next_tokens(self, logits, gen: GenerationConfig, history, rng) -> torch.Tensor:
        if history is not None:  # in place: logits is this step's buffer, rewritten by the next step
            apply_penalties_(logits, history, gen.repetition_penalty, gen.no_repeat_ngram_size)
        if gen.rows is not None:  # per-prompt sampling: each row draws from its own generator, as alone
            greedy = torch.argmax(logits, dim=-1)
            picks = [sample(logits[r:r + 1], g.temperature, g.top_k, g.top_p, rng[r])[0] if g.do_sample else greedy[r]
                     for r, g in enumerate(gen.rows)]
            return torch.stack(picks)
        if gen.do_sample:
            return sample(logits, gen.temperature, gen.top_k, gen.top_p, rng)
        return torch.argmax(logits, dim=-1)

    def _rng(self, gen: GenerationConfig):
        if gen.rows is not None:
            return [self._rng(g) for g in gen.rows]
        if gen.do_sample and gen.seed is not None:
            return torch.Generator(device=self.device).manual_seed(gen.seed)
        return None

    def _host_loop(self, logits, lengths, gen: GenerationConfig, history, stops):
        """The decode loop with each step's tokens on the host (one sync per step): streaming and stop
        strings. Yields a TokenEvent per live sequence and step; a finished sequence's row keeps running
        (the batch is one static program) and its tokens are dropped."""
        rng = self._rng(gen)
        ends = SequenceEnds(logits.shape[0], self.tokenizer, gen.eos_ids, stops, gen.max_new_tokens)
        positions = lengths.clone()
        for t in range(gen.max_new_tokens):
            nxt = self._next_tokens(logits, gen, history, rng)
            if history is not None:
                history.append(nxt)
            for r, tok in enumerate(nxt.tolist()):
                if not ends.done[r]:
                    yield TokenEvent(r, tok, *ends.push(r, tok))
            if all(ends.done):
                return
            logits = self.decode(nxt, positions, layers=self.step_layers(t))
            positions += 1

    def _sample_loop(self, logits, lengths, gen: GenerationConfig, history: TokenHistory | None):
        B, max_new_tokens, eos, output_scores = logits.shape[0], gen.max_new_tokens, gen.eos_ids, gen.output_scores
        rng = self._rng(gen)
        eos_t = torch.tensor(eos, device=self.device, dtype=torch.long)
        finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        out = torch.empty(B, max_new_tokens, dtype=torch.long, device=self.device)
        scores = [] if output_scores else None
        positions = lengths.clone()
        steps = 0
        for t in range(max_new_tokens):
            if output_scores:
                scores.append(logits.clone())
            nxt = self._next_tokens(logits, gen, history, rng)
            if len(eos):
                nxt = torch.where(finished, eos_t[0], nxt)
                finished |= torch.isin(nxt, eos_t)
            out[:, t] = nxt
            if history is not None:
                history.append(nxt)
            steps = t + 1
            if t == max_new_tokens - 1:
                break
            if len(eos) and (t + 1) % EOS_CHECK_EVERY == 0 and bool(finished.all()):
                break
            logits = self.decode(nxt, positions, layers=self.step_layers(t))
            positions += 1
        return _cut_at_eos(out[:, :steps].tolist(), eos), scores


def _cut_at_eos(rows, eos):
    """Keep each sequence up to and including its first EOS."""
    out = []
    for r in rows:
        cut = next((i + 1 for i, t in enumerate(r) if t in eos), len(r))
        out.append(r[:cut])
    return out
