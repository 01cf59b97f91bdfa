"""Review of chunked / shared prompt passes in continuous batching (prefill_chunk): boundary lengths, every
sampling option, faults, threads, the CLI flag and a client leaving mid-chunk, and the CUDA-graph logic
(static buffers, padding past the row's end, captures in the middle of a prompt) through a CPU emulation
of torch's graphs. Every request must get what Engine.generate gives it alone (fp32: exactly)."""
import random
import threading
import time

import numpy as np
import pytest
import torch

import ulskip.ops as ops
import ulskip.runtime.graphs as graphs_module
from ulskip import Engine
from ulskip.runtime.graphs import DecodeGraphs, PrefillGraphs
from ulskip.runtime.scheduler import Scheduler
from helpers import make_checkpoint


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return {f: make_checkpoint(tmp_path_factory.mktemp(f), f, num_layers=6, seed=2) for f in ("llama", "bloom", "qwen2")}


def engine(path, prefill="full", max_batch_size=3, max_seq_len=40):
    return Engine.from_pretrained(path, target_speedup=2, prefill=prefill, dtype="float32", device="cpu",
                                  max_batch_size=max_batch_size, max_seq_len=max_seq_len)


def collect():
    got = {"tokens": [], "text": "", "reason": None, "error": None, "events": 0}

    def emit(ev):
        assert got["reason"] is None, "an event after the last"
        got["tokens"] += ev.token_ids
        got["text"] += ev.text
        got["reason"], got["error"] = ev.finish_reason, ev.error
        got["events"] += 1
    return got, emit


def run(sched, limit=5000):
    for _ in range(limit):
        if not sched.step():
            return
    raise AssertionError("the scheduler did not drain")


def rand_prompt(rng, n, vocab):
    return [rng.randrange(4, vocab) for _ in range(n)]


def queue(sched, jobs):
    """Queue greedy requests (prompt, max_new_tokens) without EOS -> [(prompt, n, collected events)]."""
    outs = []
    for p, n in jobs:
        got, emit = collect()
        sched.request(p, emit, max_new_tokens=n, eos_token_id=[])
        outs.append((p, n, got))
    return outs


def assert_as_generate_alone(ref, outs):
    for p, n, got in outs:
        assert got["tokens"] == ref.generate([p], max_new_tokens=n, eos_token_id=[]).sequences[0], len(p)


# ---------------------------------------------------------------------------------------------- boundaries
@pytest.mark.parametrize("family,prefill", [("llama", "full"), ("bloom", "full"), ("qwen2", "skip"), ("bloom", "skip")])
@pytest.mark.parametrize("max_batch_size", [1, 3])
@pytest.mark.parametrize("chunk", [1, 7, 39, 1000])
def test_boundary_lengths_equal_generate(paths, family, prefill, max_batch_size, chunk):
    """Prompts of exactly prefill_chunk tokens (one shared pass), one more (two chunks), max_seq_len - 1 with
    max_tokens 1, and a mix queued behind each other; prefill_chunk above max_seq_len is capped."""
    eng = engine(paths[family], prefill, max_batch_size)
    sched = Scheduler(eng, prefill_chunk=chunk)
    assert sched.prefill_chunk == min(chunk, eng.staging_capacity)
    rng = random.Random(chunk * 10 + max_batch_size)
    jobs = []
    for L in (chunk, chunk + 1, 39, 1, 20, 38, 5, 33):
        L = max(1, min(L, 39))
        p = rand_prompt(rng, L, eng.cfg.vocab_size)
        jobs.append((p, max(1, min(40 - L, rng.randint(1, 6)))))
    outs = queue(sched, jobs)
    run(sched)
    assert sched.busy == 0 and sched.chunking is None and not sched.waiting
    assert_as_generate_alone(eng, outs)
    assert all(got["reason"] == "length" for _, _, got in outs)


def test_tiny_contexts(paths):
    """max_seq_len 2..17 (below the smallest graph bucket) with chunks of 1..3 tokens and no cap."""
    rng = random.Random(0)
    for S in (2, 3, 5, 17):
        eng = engine(paths["llama"], max_batch_size=2, max_seq_len=S)
        for chunk in (1, 2, 3, 10 ** 9):
            sched = Scheduler(eng, prefill_chunk=chunk)
            jobs = []
            for _ in range(5):
                L = rng.randint(1, S - 1)
                n = rng.randint(1, S - L)
                jobs.append((rand_prompt(rng, L, eng.cfg.vocab_size), n))
            outs = queue(sched, jobs)
            run(sched)
            assert_as_generate_alone(eng, outs)


# ---------------------------------------------------------------------------------------------- sampling
TEXTS = ["question : where is paris ? answer : the sky is a cat says meow . a dog two plus two is",
         "where is rome ? snow is white . grass the sky is blue and the",
         "a cat says meow", "two plus two is four . three plus three is"]
SETTINGS = [dict(temperature=0.7, seed=11), dict(temperature=0), dict(temperature=1.3, top_k=5, seed=3),
            dict(temperature=0.9, top_p=0.8, seed=7, repetition_penalty=1.5),
            dict(temperature=0, no_repeat_ngram_size=2), dict(temperature=0, repetition_penalty=1.3, no_repeat_ngram_size=1),
            dict(temperature=1.0, seed=5, no_repeat_ngram_size=2)]


@pytest.mark.parametrize("family,prefill", [("llama", "full"), ("bloom", "skip")])
@pytest.mark.parametrize("chunk", [3, 8])
def test_sampling_penalties_and_stops_on_chunked_prompts(paths, family, prefill, chunk):
    eng = engine(paths[family], prefill, max_batch_size=3, max_seq_len=64)
    eos = eng.tokenizer.eos_token_id
    sched = Scheduler(eng, prefill_chunk=chunk)
    outs = []
    for i, s in enumerate(SETTINGS):
        got, emit = collect()
        sched.request(TEXTS[i % len(TEXTS)], emit, max_new_tokens=12, **s)
        outs.append((TEXTS[i % len(TEXTS)], s, got))
    stops = []
    for p in TEXTS[:2]:  # a stop string the greedy output reaches
        text = eng.generate([p], max_new_tokens=12, no_repeat_ngram_size=1).texts[0]
        k = next((k for k in range(3, len(text) - 3) if text.find(text[k:k + 3]) == k), None)
        if k is not None:
            got, emit = collect()
            sched.request(p, emit, max_new_tokens=12, stop=[text[k:k + 3]], no_repeat_ngram_size=1)
            stops.append((p, text[k:k + 3], text[:k], got))
    assert stops
    run(sched)
    for p, s, got in outs:
        t = s.get("temperature")
        kw = dict(do_sample=bool(t), temperature=t or 1.0, top_k=s.get("top_k", 0), top_p=s.get("top_p", 1.0),
                  seed=s.get("seed"), repetition_penalty=s.get("repetition_penalty", 1.0),
                  no_repeat_ngram_size=s.get("no_repeat_ngram_size", 0), eos_token_id=eos)
        assert got["tokens"] == eng.generate([p], max_new_tokens=12, **kw).sequences[0], s
    for p, stop, text, got in stops:
        assert got["reason"] == "stop" and got["text"] == text
        assert got["tokens"] == eng.generate([p], max_new_tokens=12, stop=[stop], no_repeat_ngram_size=1,
                                             eos_token_id=eos).sequences[0]


@pytest.mark.parametrize("max_batch_size", [1, 2])
def test_early_eos_and_row_reuse_with_chunks(paths, max_batch_size):
    """Requests ending on an EOS at any token (the first included), their rows reused at once by shared
    passes and chunked prompts, arrivals between steps."""
    eng = engine(paths["llama"], max_batch_size=max_batch_size, max_seq_len=48)
    ref = engine(paths["llama"], max_batch_size=1, max_seq_len=48)  # the scheduler's engine is its own
    sched = Scheduler(eng, prefill_chunk=5)
    rng = random.Random(max_batch_size)
    outs = []
    for _ in range(10):
        p = rand_prompt(rng, rng.randint(1, 30), eng.cfg.vocab_size)
        n = rng.randint(1, 48 - len(p))
        full = ref.generate([p], max_new_tokens=n, eos_token_id=[]).sequences[0]
        eos = [full[rng.randrange(len(full))]] if rng.random() < 0.8 else []
        got, emit = collect()
        sched.request(p, emit, max_new_tokens=n, eos_token_id=eos)
        outs.append((p, n, eos, got))
        for _ in range(rng.randint(0, 2)):
            sched.step()
    run(sched)
    for p, n, eos, got in outs:
        want = ref.generate([p], max_new_tokens=n, eos_token_id=eos)
        assert got["tokens"] == want.sequences[0] and got["reason"] == want.finish_reasons[0]


# ---------------------------------------------------------------------------------------------- faults
@pytest.mark.parametrize("target,when,failed", [("prefill_chunk", 0, 1), ("prefill_chunk", 2, 1),
                                                ("prefill_rows", 0, 0), ("decode", 3, 0)])
def test_an_engine_failure_fails_only_its_requests(paths, monkeypatch, target, when, failed):
    """A chunk that raises (first or later) fails its request alone and frees the chunked pass for the next
    long prompt; a decode step that raises spares the prompt still in chunks."""
    eng = engine(paths["llama"], max_batch_size=3, max_seq_len=48)
    real, calls = getattr(eng, target), [0]

    def flaky(*a):
        calls[0] += 1
        if calls[0] == when + 1:
            raise RuntimeError("injected")
        return real(*a)
    monkeypatch.setattr(eng, target, flaky)
    sched = Scheduler(eng, prefill_chunk=4)
    rng = random.Random(0)
    outs = []
    for n in (3, 20, 2, 15, 10):
        p = rand_prompt(rng, n, eng.cfg.vocab_size)
        got, emit = collect()
        sched.request(p, emit, max_new_tokens=6, eos_token_id=[])
        outs.append((p, got))
    run(sched)
    monkeypatch.undo()
    assert [g["reason"] == "error" for _, g in outs] == [i == failed for i in range(5)]
    assert "injected" in outs[failed][1]["error"]
    assert sched.chunking is None and sched.busy == 0
    for i, (p, got) in enumerate(outs):
        if i != failed:
            assert got["tokens"] == eng.generate([p], max_new_tokens=6, eos_token_id=[]).sequences[0]


def test_threads_request_and_cancel_while_steps_run(paths):
    eng = engine(paths["bloom"], max_batch_size=3, max_seq_len=48)
    sched = Scheduler(eng, prefill_chunk=4, max_queue=1000)
    sched.start()
    results, lock = {}, threading.Lock()

    def client(i):
        rng = random.Random(i)
        p = rand_prompt(rng, rng.randint(1, 40), eng.cfg.vocab_size)
        n = rng.randint(1, 48 - len(p))
        got, emit = collect()
        done = threading.Event()

        def on(ev):
            emit(ev)
            if ev.finish_reason:
                done.set()
        req = sched.request(p, on, max_new_tokens=n, eos_token_id=[])
        cancel = rng.random() < 0.3
        if cancel:
            time.sleep(rng.random() * 0.02)
            sched.cancel(req)
        assert done.wait(60)
        with lock:
            results[i] = (p, n, cancel, got)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    sched.close()
    assert len(results) == 24 and sched.busy == 0 and sched.chunking is None
    for p, n, cancel, got in results.values():
        assert got["reason"] in (("cancelled", "length") if cancel else ("length",))
        if got["reason"] == "length":
            assert got["tokens"] == eng.generate([p], max_new_tokens=n, eos_token_id=[]).sequences[0]


# ---------------------------------------------------------------------------------------------- CUDA graphs, emulated
class _FakeGraph:
    """A captured graph on the CPU: replay reruns the function on the same static inputs into the same
    static output (what torch.cuda.CUDAGraph.replay does)."""

    def __init__(self, fn, args, out):
        self.fn, self.args, self.out = fn, args, out

    def replay(self):
        self.out.copy_(self.fn(*self.args))


def _fake_capture(fn, args, pool, device):
    for _ in range(2):  # the warm-up runs really run, as on the GPU
        fn(*args)
    out = fn(*args).clone()
    return _FakeGraph(fn, args, out), out


@pytest.fixture
def emulated_graphs(monkeypatch):
    """Graph classes usable on the CPU: captures emulated, and the cache write skipping positions past the
    row's end as the CUDA op does (the CPU op raises there)."""
    real = ops.cache_write

    def cache_write(kc, vc, k, v, pos):
        S = kc.shape[2]
        if not bool((pos >= S).any()):
            return real(kc, vc, k, v, pos)
        for b in range(pos.shape[0]):
            m = pos[b] < S
            if m.any():
                real(kc[b:b + 1], vc[b:b + 1], k[b:b + 1][:, m], v[b:b + 1][:, m], pos[b:b + 1][:, m])
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(graphs_module, "_capture", _fake_capture)
    monkeypatch.setattr(ops, "cache_write", cache_write)

    def graphify(eng):
        eng.graphs = DecodeGraphs(eng._decode_eager, eng.max_batch_size, eng.max_seq_len, eng.device)
        eng.prefill_graphs = PrefillGraphs(eng._prefill_eager, eng.max_batch_size, eng.max_seq_len, eng.device)
        eng.row_prefill_graphs = PrefillGraphs(eng._prefill_staging, eng.max_batch_size, eng.max_seq_len, eng.device)
        return eng
    return graphify


def _graph_keys(eng):
    chunks = set() if eng._chunk_graphs is None else set(eng._chunk_graphs.graphs)
    return set(eng.graphs.graphs), set(eng.row_prefill_graphs.graphs), chunks


@pytest.mark.parametrize("family,prefill", [("llama", "full"), ("bloom", "full"), ("qwen2", "skip")])
@pytest.mark.parametrize("S,chunk,max_batch_size,warm", [(64, 6, 4, True), (128, 24, 4, True), (48, 20, 1, True),
                                                         (64, 6, 4, False), (100, 24, 2, False)])
def test_graph_paths_equal_generate(paths, emulated_graphs, family, prefill, S, chunk, max_batch_size, warm):
    """Through the graph code paths: padded shared passes into the staging views, chunk graphs with padding
    past the row's end and (without warm_up) graphs first captured in the middle of a prompt. With warm_up
    at a power-of-two max_seq_len, serving captures nothing new."""
    ref = engine(paths[family], prefill, max_batch_size=1, max_seq_len=S)
    eng = emulated_graphs(engine(paths[family], prefill, max_batch_size=max_batch_size, max_seq_len=S))
    sched = Scheduler(eng, prefill_chunk=chunk)
    if warm:
        assert sched.warm_up() > 0
    before = _graph_keys(eng)
    rng = random.Random(S + chunk)
    jobs = []
    for _ in range(10):
        L = max(1, min(S - 1, rng.choice([1, 3, chunk, chunk + 1, S - 1, rng.randint(1, S - 1)])))
        n = rng.randint(1, min(8, S - L))
        jobs.append((rand_prompt(rng, L, eng.cfg.vocab_size), n))
    outs = queue(sched, jobs)
    run(sched)
    assert_as_generate_alone(ref, outs)
    if warm:
        assert _graph_keys(eng) == before
    else:
        assert eng._chunk_graphs is not None and eng._chunk_graphs.graphs


# ---------------------------------------------------------------------------------------------- CLI and HTTP
@pytest.mark.parametrize("value,match", [("0", "--prefill-chunk must be >= 1, got 0"),
                                         ("-1", "--prefill-chunk must be >= 1, got -1"),
                                         ("abc", "--prefill-chunk: invalid int value: 'abc'"),
                                         ("1.5", "--prefill-chunk: invalid int value: '1.5'")])
def test_cli_refuses_bad_prefill_chunk(paths, value, match):
    from ulskip.cli import ExitStatus, main
    with pytest.raises(SystemExit) as e:
        main(["serve", paths["llama"], f"--prefill-chunk={value}"])
    assert isinstance(e.value.code, ExitStatus) and int(e.value.code) == 2
    assert match in str(e.value.code)


def test_client_leaving_mid_chunk_frees_the_row(paths, monkeypatch):
    """A streaming client that disconnects while its prompt is still in chunks (no token sent yet) is
    cancelled before its pass ends; the request decoding meanwhile is untouched and the server serves on."""
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    import socket

    import uvicorn

    from ulskip.serve.app import build_app
    eng = engine(paths["llama"], max_batch_size=2, max_seq_len=200)
    ref = engine(paths["llama"], max_batch_size=1, max_seq_len=200)
    real, chunks = eng.prefill_chunk, []

    def slow(*a):
        chunks.append(a[2])
        time.sleep(0.03)
        return real(*a)
    monkeypatch.setattr(eng, "prefill_chunk", slow)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(eng, "tiny", prefill_chunk=4)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        t0 = time.time()
        while not server.started:
            assert time.time() - t0 < 30
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}/v1/completions"
        sched = app.state.scheduler
        other = {}
        short = [5, 9, 11, 7]

        def client():
            other["text"] = httpx.post(url, json={"model": "tiny", "prompt": short, "max_tokens": 60,
                                                  "temperature": 0, "ignore_eos": True}, timeout=60).json()
        t = threading.Thread(target=client)
        t.start()
        while not sched.busy:
            time.sleep(0.005)
        long_prompt = [4 + i % 40 for i in range(160)]  # 40 chunks of 4
        body = {"model": "tiny", "prompt": long_prompt, "max_tokens": 20, "temperature": 0, "stream": True}
        with httpx.stream("POST", url, json=body, timeout=30):
            t0 = time.time()
            while sched.chunking is None:
                assert time.time() - t0 < 10
                time.sleep(0.005)
            time.sleep(0.1)
        t0 = time.time()
        while sched.finished["cancelled"] < 1:
            assert time.time() - t0 < 20, "the disconnected request kept its row"
            time.sleep(0.01)
        assert len(chunks) < 40  # cancelled before its pass ended
        t.join(60)
        want = ref.generate([short], max_new_tokens=60, eos_token_id=[]).texts[0]
        assert other["text"]["choices"][0]["text"] == want
        t0 = time.time()
        while sched.busy or sched.chunking is not None:
            assert time.time() - t0 < 10
            time.sleep(0.01)
        r = httpx.post(url, json={"model": "tiny", "prompt": long_prompt[:30], "max_tokens": 3, "temperature": 0},
                       timeout=60).json()
        assert r["choices"][0]["text"] == ref.generate([long_prompt[:30]], max_new_tokens=3,
                                                                   eos_token_id=ref.eos_token_ids).texts[0]
    finally:
        server.should_exit = True
        thread.join(30)


# ---------------------------------------------------------------- regressions of the review's findings
@pytest.mark.parametrize("S,chunk", [(100, 80), (40, 1000), (200, 130)])
def test_warm_up_covers_a_max_seq_len_that_is_not_a_power_of_two(paths, emulated_graphs, S, chunk):
    eng = emulated_graphs(engine(paths["llama"], max_batch_size=2, max_seq_len=S))
    sched = Scheduler(eng, prefill_chunk=chunk)
    sched.warm_up()
    before = _graph_keys(eng)
    for n in (S - 1, min(chunk, S - 1), S // 2 + 1):
        sched.request([5 + i % 40 for i in range(n)], collect()[1], max_new_tokens=1)
    for t in (6, 7):
        sched.request([t] * (S // 2 - 1), collect()[1], max_new_tokens=1)
    run(sched)
    assert _graph_keys(eng) == before


def test_prefill_rows_refuses_a_prompt_over_max_seq_len_before_writing(paths):
    eng = engine(paths["llama"], max_batch_size=2, max_seq_len=40)
    eng.cache.k.fill_(0.5)
    with pytest.raises(ValueError, match="a prompt of 41 tokens exceeds max_seq_len=40"):
        eng.prefill_rows([[5] * 3, [5] * 41], [0, 1])
    assert (eng.cache.k == 0.5).all()


def test_a_chunk_must_continue_where_the_last_one_ended(paths):
    eng = engine(paths["llama"], max_batch_size=2, max_seq_len=40)
    p = list(range(5, 15))
    eng.prefill_chunk(p, 1, 0, 4)
    with pytest.raises(ValueError, match="next at position 4"):
        eng.prefill_chunk(p, 1, 6, 4)
    eng.prefill_chunk(p, 1, 4, 6)  # the pass ends here
    with pytest.raises(ValueError, match="none is in progress"):
        eng.prefill_chunk(list(range(20, 30)), 1, 4, 6)


@pytest.mark.parametrize("v", [np.int64(8), torch.tensor(8)])
def test_numpy_and_tensor_integers_are_integers(paths, v):
    sched = Scheduler(engine(paths["llama"]), prefill_chunk=v, max_queue=v)
    assert sched.prefill_chunk == 8 and sched.max_queue == 8
