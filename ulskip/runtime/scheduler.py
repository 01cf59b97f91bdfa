"""Continuous batching: requests join and leave the running batch between decode steps.

Every sequence runs the same kept layers, so a sequence joining or leaving never changes the decode
program: each request holds one row of the engine's static compact cache with its own position, the
decode step runs rows 0..n-1 (n = the highest busy row + 1, rounded up to a captured batch bucket), and
a free row's lane computes nothing anyone reads. Admission is first come, first served, into the lowest
free rows (which keeps n small); the queue is bounded.

Prompt passes run between two decode steps, at most `prefill_chunk` prompt tokens per step (vLLM's
max_num_batched_tokens, SGLang's chunked prefill size), so the running sequences wait for at most one
such pass per token: waiting prompts that fit the budget together share one pass (Engine.prefill_rows),
and a prompt longer than the budget runs a chunk per step (Engine.prefill_chunk, a CUDA graph per chunk
length on a GPU), one such prompt at a time, while the others keep decoding.

Steps chain on the device: each row's next input is the token chosen for it on the device, and the host
reads a step's tokens (text, stop strings, EOS, the emit callbacks) while the GPU runs the next step. A
request the host finds finished then had one more token computed, which is dropped (a length limit is
known in advance, so no row ever decodes past its max_new_tokens).

The scheduler owns its engine: one thread (`start()`, or a caller of `step()`) drives it, and nothing else
may run the engine meanwhile. Requests are submitted from any thread; their tokens come back through
each request's `emit` callback, called on the scheduler's thread.

Output semantics are the server's (OpenAI's): a stop string ends the request and is not part of its
text; text that could be the start of a stop string is held back until it is known not to be one. The
token ids are those Engine.generate gives the prompt alone (greedy; and seeded sampling, which draws
from the request's own generator).
"""
from __future__ import annotations

import collections
import itertools
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ulskip.arguments import integer
from ulskip.runtime.generation import GenerationConfig
from ulskip.runtime.penalties import TokenHistory, apply_penalties_
from ulskip.runtime.sampling import sample
from ulskip.runtime.text import IncrementalText, check_stop, find_stop
from ulskip.runtime.transfer import HostCopy, to_device


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: try again later (HTTP 429)."""


class Closed(RuntimeError):
    """The scheduler is shutting down and admits nothing (HTTP 503)."""


@dataclass
class Event:
    """What a request's emit callback receives: new text and tokens, and on the last event why it ended."""
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled" or "error"
    error: str | None = None


@dataclass(eq=False)
class Request:
    prompt: list[int]
    gen: GenerationConfig
    stops: list[str]
    emit: Callable[[Event], None]
    id: int = 0
    # state, owned by the scheduler's thread
    row: int | None = None
    prefilled: int = 0                # prompt tokens in the cache (a chunked prompt pass's progress)
    issued: int = 0                   # tokens chosen on the device (the host reads them a step later)
    tokens: list[int] = field(default_factory=list)
    text: IncrementalText | None = None
    sent: int = 0                     # characters of text handed out
    rng: torch.Generator | None = None
    history: TokenHistory | None = None
    cancelled: bool = False
    finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def position(self) -> int:
        """Where the next decode step's input token (the last one issued) goes in the cache."""
        return len(self.prompt) + self.issued - 1


def _held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string."""
    for k in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0


class _Picked:
    """Tokens chosen on the device for some requests, on their way to the host (HostCopy)."""

    def __init__(self, reqs: list[Request], chosen: torch.Tensor):
        self.reqs, self.copy = reqs, HostCopy(chosen)

    def values(self) -> list[int]:
        return self.copy.values()


class Scheduler:
    def __init__(self, engine, max_queue: int = 256, prefill_chunk: int = 512):
        if engine.skipdecode is not None:
            raise ValueError("continuous batching needs one layer set for every sequence; SkipDecode's depth "
                             "depends on each sequence's step (serve a static schedule)")
        max_queue = integer("max_queue", max_queue, 1, what="a positive integer")
        prefill_chunk = integer("prefill_chunk", prefill_chunk, 1, what="a positive integer (prompt tokens per step)")
        self.engine, self.max_queue = engine, max_queue
        # prompt tokens per step; a pass never exceeds the engine's staging buffer (max_seq_len tokens)
        self.prefill_chunk = min(prefill_chunk, engine.staging_capacity)
        self.chunking: Request | None = None  # the long prompt whose pass runs a chunk per step
        # each row's next decode input, written by the device-side picks: steps chain without a host sync,
        # and the host reads a step's tokens while the GPU runs the next one (_pending)
        self._next = torch.zeros(engine.max_batch_size, dtype=torch.long, device=engine.device)
        self._pending: list[_Picked] = []
        self.rows: list[Request | None] = [None] * engine.max_batch_size
        self.waiting: collections.deque[Request] = collections.deque()
        self.cond = threading.Condition()
        self.closed = False
        self._stop_thread = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self.steps = 0  # decode steps run (for tests and the load test's report)
        self.finished = collections.Counter()  # requests ended, by finish reason

    # ------------------------------------------------------------------ any thread
    def request(self, prompt, emit: Callable[[Event], None], max_new_tokens: int = 16, temperature: float = 0.0,
                top_k: int = 0, top_p: float = 1.0, seed=None, stop=None, eos_token_id=None,
                repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0) -> Request:
        """Check one request (temperature 0 = greedy) and queue it. Raises ValueError for bad values,
        QueueFull when the queue is at its bound, Closed while shutting down."""
        e = self.engine
        (prompt,) = e._encode([prompt])
        if eos_token_id is None:
            eos_token_id = e.eos_token_ids
        if temperature is None:
            temperature = 0.0
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
        gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                               temperature=temperature if temperature > 0 else 1.0, top_k=top_k, top_p=top_p,
                               seed=seed, eos_token_id=eos_token_id, repetition_penalty=repetition_penalty,
                               no_repeat_ngram_size=no_repeat_ngram_size)
        gen.check_vocab(e.cfg.vocab_size)
        stops = check_stop(stop)
        if stops and e.tokenizer is None:
            raise ValueError("stop strings need the checkpoint's tokenizer (none found)")
        if len(prompt) + gen.max_new_tokens > e.max_seq_len:
            raise ValueError(f"prompt length {len(prompt)} + max_new_tokens {gen.max_new_tokens} = "
                             f"{len(prompt) + gen.max_new_tokens} exceeds max_seq_len={e.max_seq_len}")
        req = Request(prompt, gen, stops, emit)
        with self.cond:
            if self.closed:
                raise Closed("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            req.id = next(self._ids)
            self.waiting.append(req)
            self.cond.notify()
        return req

    def warm_up(self) -> int:
        """Capture every CUDA graph the steps can replay before any request arrives (Engine.capture_graphs),
        so none is captured while requests wait. -> graphs captured (0 on a CPU)."""
        with self.cond:
            if self.busy or self.waiting or self._thread is not None:
                raise RuntimeError("warm_up() runs before the scheduler starts, with no request admitted")
        return self.engine.capture_graphs(self.prefill_chunk)

    def cancel(self, req: Request) -> None:
        """Drop a request (its client went away): its row is freed before the next decode step."""
        with self.cond:
            req.cancelled = True
            self.cond.notify()

    def start(self) -> None:
        """Run the scheduler on its own thread until close(). Meanwhile the engine refuses generate / stream /
        chat calls, which would write the cache rows of the running requests."""
        if self.engine.serving is not None:
            raise RuntimeError("the engine already serves a running Scheduler; one scheduler per engine")
        self.engine.serving = self
        self._thread = threading.Thread(target=self._loop, name="ulskip-scheduler", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = 30.0) -> None:
        """Admit nothing more, cancel what waits, let running requests finish (up to `timeout` seconds;
        then they are cancelled), and stop the thread."""
        with self.cond:
            self.closed = True
            while self.waiting:
                self._finish(self.waiting.popleft(), "cancelled")
            self.cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            with self.cond:
                self._stop_thread = True
                for r in self.rows:
                    if r is not None:
                        r.cancelled = True
                self.cond.notify()
            self._thread.join()
            if self.engine.serving is self:
                self.engine.serving = None

    @property
    def busy(self) -> int:
        return sum(r is not None for r in self.rows)

    # ------------------------------------------------------------------ the scheduler's thread
    def _loop(self) -> None:
        if self.engine.device.type == "cuda":  # this thread's CUDA calls (events, streams) on the engine's GPU
            torch.cuda.set_device(self.engine.device)
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not (self._stop_thread or self.closed or self.waiting or self.busy or self._pending):
                        self.cond.wait()
                    if self._stop_thread or (self.closed and not self.waiting and not self.busy):
                        self._drop_cancelled()
                        return
                self.step()

    @torch.inference_mode()
    def step(self) -> bool:
        """One round: free cancelled rows; prompt work of at most prefill_chunk tokens (the next chunk of
        the long prompt in progress, then waiting prompts that fit what is left, in one pass, or the first
        chunk of the next long one); then one decode step for every row whose prompt is in. Returns whether
        any request is still running or waiting."""
        with self.cond:
            self._drop_cancelled()
            budget, chunk = self.prefill_chunk, None
            if self.chunking is not None:
                chunk = (self.chunking, min(budget, len(self.chunking.prompt) - self.chunking.prefilled))
                budget -= chunk[1]
            batch, first = self._admissions(budget)
        previous, self._pending, fresh = self._pending, [], []
        if chunk is not None:
            self._chunk(*chunk, fresh)
        if batch:
            self._admit(batch, fresh)
        if first is not None:
            self._chunk(*first, fresh)
        ready = [r for r in self.rows if r is not None and not r.done and r.prefilled == len(r.prompt)
                 and r.issued < r.gen.max_new_tokens]
        if ready:
            self._decode(ready)
        # the host side of the last step's tokens and of the new requests' first ones, while the GPU runs
        # this step: a request found finished here had one more token computed, which is dropped
        self._deliver(previous + fresh)
        with self.cond:
            return bool(self.waiting) or any(self.rows) or bool(self._pending)

    def _admissions(self, budget: int):
        """Under the lock: move waiting requests into the lowest free rows, first come first served, within
        `budget` prompt tokens -> (the prompts that share one pass, and (request, tokens) of the first
        chunk of a long prompt, or None). A prompt longer than prefill_chunk starts a chunked pass when no
        other is in progress; those behind it wait their turn."""
        batch, first = [], None
        while self.waiting and None in self.rows:
            req, cost = self.waiting[0], 0
            if batch:
                cost = self.engine.prefill_rows_cost(len(batch), max(len(r.prompt) for r in batch))
            if len(req.prompt) > self.prefill_chunk:
                if self.chunking is not None or cost >= budget:
                    break
                self.chunking, first = req, (req, budget - cost)
            else:
                longest = max([len(req.prompt)] + [len(r.prompt) for r in batch])
                if (self.engine.prefill_rows_cost(len(batch) + 1, longest) if batch else len(req.prompt)) > budget:
                    break
                batch.append(req)
            self.waiting.popleft()
            req.row = self.rows.index(None)
            self.rows[req.row] = req
            if first is not None:
                break
        return batch, first

    def _drop_cancelled(self) -> None:
        for i, r in enumerate(self.rows):
            if r is not None and r.cancelled:
                self.rows[i] = None
                if r is self.chunking:
                    self.chunking = None
                self._finish(r, "cancelled")
        kept = [r for r in self.waiting if not r.cancelled]
        for r in self.waiting:
            if r.cancelled:
                self._finish(r, "cancelled")
        self.waiting = collections.deque(kept)

    def _begin(self, req: Request) -> None:
        """A request whose prompt is in the cache: its sampler, penalty history and text decoder."""
        e = self.engine
        if req.gen.do_sample and req.gen.seed is not None:
            req.rng = torch.Generator(device=e.device).manual_seed(req.gen.seed)
        if req.gen.penalized:
            req.history = TokenHistory(to_device(torch.tensor([req.prompt]), e.device),
                                       to_device(torch.tensor([len(req.prompt)]), e.device), req.gen.max_new_tokens)
        if e.tokenizer is not None:
            req.text = IncrementalText(e.tokenizer)
        req.prefilled = len(req.prompt)

    def _admit(self, reqs: list[Request], fresh: list) -> None:
        """Whole prompts, one pass into their rows, then each one's first token."""
        try:
            logits = self.engine.prefill_rows([r.prompt for r in reqs], [r.row for r in reqs])
            for r in reqs:
                self._begin(r)
            fresh.append(self._pick(reqs, logits, list(range(len(reqs)))))
        except Exception as exc:  # one pass's failure must not take the running requests down
            self._fail(reqs, exc)

    def _chunk(self, req: Request, n: int, fresh: list) -> None:
        """The next n tokens of a long prompt's pass; after its last chunk, its first token."""
        try:
            logits = self.engine.prefill_chunk(req.prompt, req.row, req.prefilled, n)
            req.prefilled += n
            if req.prefilled == len(req.prompt):
                self.chunking = None
                self._begin(req)
                fresh.append(self._pick([req], logits, [0]))
        except Exception as exc:
            self._fail([req], exc)

    def _decode(self, ready: list[Request]) -> None:
        """One decode step of the ready rows. Each row's input is the token last chosen for it, read from the
        device (no host sync between steps); a row below the highest ready one that is free or still in its
        chunked prompt pass decodes a dummy lane (its K/V is rewritten before anything reads it)."""
        e = self.engine
        n = max(r.row for r in ready) + 1
        positions = [0] * n
        for r in ready:
            positions[r.row] = r.position
        try:
            logits = e.decode(self._next[:n], self._ints(positions))
            self.steps += 1
            self._pending.append(self._pick(ready, logits, [r.row for r in ready]))
        except Exception as exc:
            self._fail(ready, exc)

    def _pick(self, reqs: list[Request], logits: torch.Tensor, index: list[int]) -> "_Picked":
        """Each request's next token from logits row index[k] (penalties, then greedy or its own sampler),
        chosen on the device and written as its row's next decode input; the values reach the host later
        (_deliver), through a copy that does not wait for the next step."""
        for r, i in zip(reqs, index):
            if r.history is not None:
                apply_penalties_(logits[i:i + 1], r.history, r.gen.repetition_penalty, r.gen.no_repeat_ngram_size)
        idx = self._ints(index)
        chosen = torch.argmax(logits.index_select(0, idx), dim=-1)
        for k, (r, i) in enumerate(zip(reqs, index)):
            if r.gen.do_sample:
                chosen[k] = sample(logits[i:i + 1], r.gen.temperature, r.gen.top_k, r.gen.top_p, r.rng)[0]
        for k, r in enumerate(reqs):
            if r.history is not None:
                r.history.append(chosen[k:k + 1])
            r.issued += 1
        rows = [r.row for r in reqs]
        self._next.index_copy_(0, idx if rows == index else self._ints(rows), chosen)  # decode: the same list
        return _Picked(reqs, chosen)

    def _ints(self, values: list[int]) -> torch.Tensor:
        """Host ints to the device without waiting for the GPU."""
        return to_device(torch.tensor(values, dtype=torch.long), self.engine.device)

    def _deliver(self, picked: list["_Picked"]) -> None:
        for p in picked:
            for r, tok in zip(p.reqs, p.values()):
                if not r.done:  # finished or cancelled meanwhile: a token computed past its end
                    self._push(r, tok)

    def _push(self, r: Request, tok: int) -> None:
        r.tokens.append(tok)
        reason, text = None, ""
        if r.text is not None:
            before = len(r.text.text)
            r.text.push(tok)
            full = r.text.text
            cut = find_stop(full, r.stops, before) if r.stops else None
            if cut is not None:
                reason, text = "stop", full[r.sent:cut]
                r.sent = cut
        if reason is None:
            if tok in r.gen.eos_ids:
                reason = "stop"
            elif len(r.tokens) >= r.gen.max_new_tokens:
                reason = "length"
            if r.text is not None:
                if reason is not None:
                    r.text.flush()
                    safe = len(r.text.text)
                else:
                    safe = len(r.text.text) - (_held_back(r.text.text, r.stops) if r.stops else 0)
                if safe > r.sent:
                    text, r.sent = r.text.text[r.sent:safe], safe
        self._emit(r, Event([tok], text, reason))
        if reason is not None:
            r.finish_reason = reason
            self.finished[reason] += 1
            self._free(r)

    def _free(self, r: Request) -> None:
        with self.cond:
            if r.row is not None and self.rows[r.row] is r:
                self.rows[r.row] = None

    def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
        if r.done:
            return
        r.finish_reason = reason
        self.finished[reason] += 1
        self._emit(r, Event([], "", reason, error))

    @staticmethod
    def _emit(r: Request, ev: Event) -> None:
        try:
            r.emit(ev)
        except Exception:  # a consumer that fails must not stop the others: drop its request
            traceback.print_exc()
            r.cancelled = True

    def _fail(self, reqs: list[Request], exc: Exception) -> None:
        msg = f"{type(exc).__name__}: {exc}"
        for r in reqs:
            if r is self.chunking:
                self.chunking = None
            self._free(r)
            self._finish(r, "error", msg)
