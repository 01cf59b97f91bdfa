"""GPU review of three changes written after the last GPU session (not yet run on a GPU):

* continuous batching's host/GPU overlap (9d348b9): after Scheduler.warm_up() a step must queue its work
  without a host sync (pinned non-blocking copies, device-side picks), and the device-chained tokens,
  pinned D2H copies + events, one-step-late delivery, early EOS, cancel and row reuse must still give each
  request what generate() gives it alone;
* start-up capture (51394d4, 82a3228): every shape the scheduler can form is captured by warm_up();
* the speculative round as one CUDA graph (5f15fa8): the graph and its per-shape state are reused by later
  calls of the same shape (other prompts, lengths, max_new_tokens, EOS values, a stop string that froze a
  row on the device) with freed memory overwritten in between, and capture works with many EOS ids
  (torch.isin takes its sorting path, which calls unique(): a host sync, illegal inside a capture).

References are the same checkpoint on the GPU without CUDA graphs (the same kernels, eagerly), or
generate() alone on the same engine, in fp32.
"""
import gc
import inspect
import itertools
import traceback
import warnings

import pytest
import torch

from ulskip import Engine
from ulskip.runtime import transfer as transfer_module
from ulskip.runtime.graphs import length_bucket, prefill_bucket
from ulskip.runtime.scheduler import Scheduler
from helpers import make_checkpoint

pytestmark = pytest.mark.gpu

SPEC = {"draft_speedup": 2, "num_draft_tokens": 3}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("gpu_review"), "llama", num_layers=6, seed=2)


def _engine(path, target_speedup=2, max_seq_len=128, max_batch_size=4, **kw):
    return Engine.from_pretrained(path, target_speedup=target_speedup, device="cuda", dtype="fp32",
                                  max_seq_len=max_seq_len, max_batch_size=max_batch_size, **kw)


def _count(eng):
    chunks = 0 if eng._chunk_graphs is None else len(eng._chunk_graphs.graphs)
    return len(eng.graphs.graphs) + len(eng.row_prefill_graphs.graphs) + chunks


def _prompts(vocab):
    # short ones share prompt passes; 30, 60 and 25 tokens are longer than the 24-token chunk
    return [[(3 * i + 7 * j) % (vocab - 4) + 4 for j in range(n)]
            for i, n in enumerate([3, 30, 17, 5, 60, 9, 24, 25, 1])]


def _mix(eng, sched):
    """Queue greedy, seeded sampling, penalized and early-EOS requests (some chunked) plus one that cancels
    itself after 3 tokens; -> checks to run after the scheduler ran them. References first (generate alone)."""
    kinds = [
        ({}, {}),
        (dict(temperature=0.9, top_k=20, top_p=0.95, seed=11), dict(do_sample=True, temperature=0.9, top_k=20,
                                                                   top_p=0.95, seed=11)),
        (dict(repetition_penalty=1.3, no_repeat_ngram_size=2), dict(repetition_penalty=1.3, no_repeat_ngram_size=2)),
        ("eos", "eos"),
    ]
    jobs = []
    for i, p in enumerate(_prompts(eng.cfg.vocab_size)):
        s_kw, g_kw = kinds[i % len(kinds)]
        n = 8 + i % 5
        eos = []
        if s_kw == "eos":  # ends early: the row is freed one step late and reused by a waiting request
            eos = [eng.generate([p], max_new_tokens=n, eos_token_id=[]).sequences[0][2]]
            s_kw = g_kw = {}
        want = eng.generate([p], max_new_tokens=n, eos_token_id=eos, **g_kw).sequences[0]
        jobs.append((p, n, eos, s_kw, want))
    cancel_prompt = [9, 8, 7, 6, 5]
    cancel_alone = eng.generate([cancel_prompt], max_new_tokens=20, eos_token_id=[]).sequences[0]

    checks = []
    for p, n, eos, s_kw, want in jobs:
        got = {"tokens": [], "reason": None}

        def emit(ev, got=got):
            got["tokens"] += ev.token_ids
            got["reason"] = ev.finish_reason or got["reason"]
        sched.request(p, emit, max_new_tokens=n, eos_token_id=eos, **s_kw)
        checks.append((got, want, "stop" if want and want[-1] in eos else "length"))

    got_c, handle = {"tokens": [], "reason": None}, []

    def emit_c(ev):
        got_c["tokens"] += ev.token_ids
        got_c["reason"] = ev.finish_reason or got_c["reason"]
        if len(got_c["tokens"]) == 3 and ev.finish_reason is None:
            sched.cancel(handle[0])
    handle.append(sched.request(cancel_prompt, emit_c, max_new_tokens=20, eos_token_id=[]))
    checks.append((got_c, cancel_alone[:3], "cancelled"))
    return checks


def _verify(checks):
    for i, (got, want, reason) in enumerate(checks):
        assert got["reason"] == reason, (i, got, want)
        assert got["tokens"] == want, (i, got, want)


def test_scheduler_on_the_gpu_sampling_penalties_early_eos_cancel(ckpt):
    """The device-chained steps (tokens picked on the device into _next, read a step late through pinned
    copies + events): each request equals generate() alone; a cancelled one gets no token after its cancel;
    nothing is captured after warm_up."""
    eng = _engine(ckpt)
    sched = Scheduler(eng, prefill_chunk=24)
    assert sched.warm_up() > 0
    checks = _mix(eng, sched)
    before = _count(eng)
    while sched.step():
        pass
    assert _count(eng) == before
    _verify(checks)


def test_scheduler_steps_do_not_sync_the_host(ckpt):
    """After warm_up, no step of the scheduler may call a synchronizing CUDA operation (a pageable H2D copy,
    torch.tensor(list, device='cuda'), .item(), ...): one makes the host wait for the decode step launched
    in the previous step, and the overlap is gone. Known suspects: Engine.prefill_rows (tokens.to(device),
    torch.tensor(lengths, device=...)), Engine.prefill_chunk (torch.tensor([...], device=...)) and
    Scheduler._begin's TokenHistory for penalized requests. Event.synchronize in HostCopy.values is the one
    intended wait (not reported by sync debug mode; its lines are ignored should it ever be)."""
    eng = _engine(ckpt)
    sched = Scheduler(eng, prefill_chunk=24)
    sched.warm_up()
    checks = _mix(eng, sched)
    lines, start = inspect.getsourcelines(transfer_module.HostCopy.values)
    allowed = set(range(start, start + len(lines)))
    torch.cuda.synchronize()
    syncs = set()

    def where(message, category, filename, lineno, file=None, line=None):
        # the innermost project frame names the call; torch's own file and line alone do not
        # c10's sync report; set_sync_debug_mode's own "prototype feature" warning is not one
        if "called a synchronizing CUDA operation" in str(message) and not (filename.endswith("transfer.py") and lineno in allowed):
            ours = [f for f in traceback.extract_stack() if "/ulskip/" in f.filename and "/tests/" not in f.filename]
            syncs.add(f"{filename}:{lineno}" + (f" from {ours[-1].filename}:{ours[-1].lineno}" if ours else ""))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = where
        torch.cuda.set_sync_debug_mode("warn")
        try:
            while sched.step():
                pass
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _verify(checks)
    assert not syncs, f"host syncs inside scheduler steps: {sorted(syncs)}"


@pytest.mark.parametrize("max_seq_len,max_batch_size,chunk", [(100, 3, 40), (128, 4, 24), (64, 5, 512),
                                                              (37, 6, 9), (200, 8, 130)])
def test_warm_up_covers_every_shape_the_scheduler_can_form(ckpt, max_seq_len, max_batch_size, chunk):
    """Every decode bucket, every (rows, length) a shared prompt pass can have within the budget (a lone prompt
    up to the budget, more prompts whose padded cost fits it) and every chunk length bucket is in the graphs
    warm_up() captured."""
    eng = _engine(ckpt, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    sched = Scheduler(eng, prefill_chunk=chunk)
    sched.warm_up()
    pc, S, B = sched.prefill_chunk, max_seq_len, max_batch_size
    for n in range(1, B + 1):
        b = next(s for s in eng.graphs.sizes if s >= n)
        assert (b, None, eng._kept) in eng.graphs.graphs, n
    missing = []
    for L in range(1, S):
        for n in range(1, B + 1):
            fits = L <= pc if n == 1 else eng.prefill_rows_cost(n, L) <= pc
            key = prefill_bucket(n, L, B, S)
            if fits and key is not None and key not in eng.row_prefill_graphs.graphs:
                missing.append((n, L, key))
    assert not missing
    if pc < S - 1:  # prompts longer than the budget run in chunks of 1..pc tokens
        assert {length_bucket(m, S) for m in range(1, pc + 1)} <= set(eng._chunk_graphs.graphs)


# ---------------------------------------------------------------- speculative round graph
def _spec(eng, prompts, speculative=SPEC, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untrained checkpoint's "not fine-tuned" warning
        return eng.generate(prompts, speculative=speculative, **kw)


def _spec_stream(eng, prompts, speculative=SPEC, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(eng.stream(prompts, speculative=speculative, **kw))


def _churn():
    """Free what can be freed, then fill freed blocks of many small sizes with garbage (kept alive by the
    caller): a graph that baked a per-call tensor then reads garbage."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    junk = []
    for n in itertools.chain(range(1, 33), (64, 128, 256, 512, 1024, 4096, 1 << 14, 1 << 16)):
        junk.append(torch.full((n,), 987654321, dtype=torch.long, device="cuda"))
        junk.append(torch.full((n,), True, dtype=torch.bool, device="cuda"))
        junk.append(torch.full((n,), float("nan"), device="cuda"))
    return junk


def _stats(out):
    s = out.speculative
    return s["rounds"], s["row_rounds"], s["accepted_drafts"]


def test_speculative_round_graph_reused_across_calls(ckpt):
    """Back-to-back calls of one shape replay one graph over the engine's per-shape state: other prompts and
    lengths, max_new_tokens, EOS values, another shape in between, freed memory overwritten between calls;
    each call equals the eager GPU path, tokens and statistics."""
    g = _engine(ckpt, target_speedup=1)
    e = _engine(ckpt, target_speedup=1, cuda_graphs=False)
    a = [[5, 9, 13], [7] * 11, list(range(4, 30)), [8, 6]]
    b = [[9, 4, 4, 12, 30], [11], list(range(6, 20)), [15] * 7]
    eos_b = [_spec(e, b, max_new_tokens=9, eos_token_id=[]).sequences[1][2]]
    junk, graph_of = [], {}
    for prompts, n, eos in ((a, 20, []), (b, 9, []), (a[:2], 12, []), (a, 20, []), (b, 9, eos_b), (b, 30, eos_b)):
        want = _spec(e, prompts, max_new_tokens=n, eos_token_id=eos)
        got = _spec(g, prompts, max_new_tokens=n, eos_token_id=eos)
        assert got.sequences == want.sequences, (prompts, n, eos)
        assert _stats(got) == _stats(want), (prompts, n, eos)
        for key, st in g._spec_rounds.items():
            assert st["graph"] is not None
            assert graph_of.setdefault(key, st["graph"][0]) is st["graph"][0]  # captured once, then replayed
        junk = _churn()
    assert len(g._spec_rounds) == 3  # (4 rows, no EOS), (2 rows, no EOS), (4 rows, one EOS)
    del junk


def test_speculative_stream_stop_freezes_a_row_then_the_next_call_is_clean(ckpt):
    """speculative_stream's in-place rows.done[...] = True on the shared state (a stop string ends a row on the
    host): the stream equals the eager one, and the next call of that shape is not left with a frozen row."""
    g = _engine(ckpt, target_speedup=1)
    e = _engine(ckpt, target_speedup=1, cuda_graphs=False)
    prompts = [[5, 9, 13], [7] * 11, list(range(4, 30)), [8, 6]]
    ref = _spec_stream(e, prompts, max_new_tokens=16)
    stop = next((ev.text.strip() for ev in ref if ev.index == 0 and ev.text.strip() and ev.finish_reason is None),
                None)
    assert stop
    assert _spec_stream(g, prompts, max_new_tokens=16, stop=[stop]) == \
        _spec_stream(e, prompts, max_new_tokens=16, stop=[stop])
    assert _spec(g, prompts, max_new_tokens=16).sequences == _spec(e, prompts, max_new_tokens=16).sequences
    assert _spec_stream(g, prompts, max_new_tokens=16) == ref


@pytest.mark.parametrize("rows", [1, 4])
def test_speculative_round_graph_with_many_eos_ids(ckpt, rows):
    """16 EOS ids at k=2: for tokens [rows, 3] torch.isin(tokens, eos) takes its sorting path (numel(eos) >=
    10 * numel(tokens) ** 0.145), whose unique() syncs with the host -- not allowed while capturing the round.
    The round must capture (e.g. with (tokens[..., None] == eos).any(-1)) and equal the eager path."""
    g = _engine(ckpt, target_speedup=1)
    e = _engine(ckpt, target_speedup=1, cuda_graphs=False)
    V = g.cfg.vocab_size
    eos = list(range(V - 16, V))
    prompts = [[5, 9, 13], [7] * 11, list(range(4, 30)), [8, 6]][:rows]
    spec = {"draft_speedup": 2, "num_draft_tokens": 2}
    want = _spec(e, prompts, speculative=spec, max_new_tokens=12, eos_token_id=eos)
    got = _spec(g, prompts, speculative=spec, max_new_tokens=12, eos_token_id=eos)
    assert got.sequences == want.sequences
    assert any(st["graph"] is not None for st in g._spec_rounds.values())


def test_speculative_round_graph_is_the_greedy_path_only(ckpt):
    """Sampling stays out of the round graph (its generator draws must advance per call): no state is cached
    for it, and seeded calls repeat."""
    g = _engine(ckpt, target_speedup=1)
    prompts = [[5, 9, 13], [7] * 11]
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, seed=3)
    first = _spec(g, prompts, **kw).sequences
    assert not g._spec_rounds
    assert _spec(g, prompts, **kw).sequences == first
