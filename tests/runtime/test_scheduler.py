"""Continuous batching (ulskip/runtime/scheduler.py): every request gets what generate gives it alone."""
import random
import threading

import pytest

from ulskip import Engine
from ulskip.runtime.scheduler import Closed, QueueFull, Scheduler
from helpers import make_checkpoint


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral", "bloom"])
def eng(request, tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), request.param, num_layers=6, seed=2)
    return Engine.from_pretrained(path, target_speedup=2, dtype="float32", device="cpu", max_batch_size=4,
                                  max_seq_len=48)


def collect():
    """An emit callback and what it gathered: tokens, text pieces, the finish reason."""
    got = {"tokens": [], "text": "", "reason": None, "events": 0}

    def emit(ev):
        assert got["reason"] is None, "an event after the last"
        got["tokens"] += ev.token_ids
        got["text"] += ev.text
        got["reason"] = ev.finish_reason
        got["events"] += 1
    return got, emit


def run(sched):
    while sched.step():
        pass


def prompts(n, vocab, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(rng.randint(1, 12))] for _ in range(n)]


def test_joining_and_leaving_gives_each_request_its_own_output(eng):
    sched = Scheduler(eng)
    rng = random.Random(1)
    reqs = []
    for p in prompts(11, eng.cfg.vocab_size):  # 11 requests, 4 rows: they join as others leave
        got, emit = collect()
        n = rng.randint(1, 14)
        sched.request(p, emit, max_new_tokens=n, eos_token_id=[])
        reqs.append((p, n, got))
    run(sched)
    assert sched.busy == 0 and not sched.waiting
    for p, n, got in reqs:
        alone = eng.generate([p], max_new_tokens=n).sequences[0]
        assert got["tokens"] == alone and got["reason"] == "length"
    assert sched.steps < sum(n for _, n, _ in reqs)  # rows ran together


def test_requests_arriving_mid_run(eng):
    sched = Scheduler(eng)
    ps = prompts(6, eng.cfg.vocab_size, seed=3)
    outs = []
    for i, p in enumerate(ps):
        got, emit = collect()
        sched.request(p, emit, max_new_tokens=9)
        outs.append((p, got))
        for _ in range(i % 3):  # a few decode steps between arrivals
            sched.step()
    run(sched)
    for p, got in outs:
        assert got["tokens"] == eng.generate([p], max_new_tokens=9, eos_token_id=eng.tokenizer.eos_token_id).sequences[0]


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_long_prompts_in_chunks_between_decode_steps(eng, chunk):
    """Prompts longer than prefill_chunk run a chunk per step while the other rows keep decoding: every
    request still gets what generate gives it alone, and a running request gains one token per step."""
    sched = Scheduler(eng, prefill_chunk=chunk)
    rng = random.Random(chunk)
    short, emit = collect()
    sched.request([5, 9, 11], emit, max_new_tokens=30, eos_token_id=[])
    while not short["tokens"]:
        sched.step()
    reqs = [([5, 9, 11], 30, short)]
    for n in (17, 3, 12, 9, 15, 1):
        p = [rng.randrange(4, eng.cfg.vocab_size) for _ in range(n)]
        got, emit = collect()
        sched.request(p, emit, max_new_tokens=8, eos_token_id=[])
        reqs.append((p, 8, got))
    have, chunked = len(short["tokens"]), set()
    for i in range(1, 10):  # the first request decodes on every step, chunks or not
        sched.step()
        assert len(short["tokens"]) == have + i
        chunked.add(sched.chunking.id if sched.chunking is not None else None)
    while sched.step():
        chunked.add(sched.chunking.id if sched.chunking is not None else None)
    assert len(chunked - {None}) == {1: 5, 5: 4, 16: 1}[chunk]  # the prompts longer than the chunk

    for p, n, got in reqs:
        assert got["tokens"] == eng.generate([p], max_new_tokens=n).sequences[0]


def test_waiting_prompts_share_one_pass(eng, monkeypatch):
    passes = []
    real = eng.prefill_rows
    monkeypatch.setattr(eng, "prefill_rows", lambda ps, rows: passes.append(list(rows)) or real(ps, rows))
    sched = Scheduler(eng, prefill_chunk=24)
    ps = prompts(6, eng.cfg.vocab_size, seed=5)
    ps = [p[:6] + [7] * (6 - len(p)) for p in ps]  # 6 prompts of 6 tokens, 4 rows, 24 tokens a step
    outs = []
    for p in ps:
        got, emit = collect()
        sched.request(p, emit, max_new_tokens=3, eos_token_id=[])
        outs.append((p, got))
    run(sched)
    assert passes[0] == [0, 1, 2, 3]  # four prompts, one pass; the rest as rows free up
    assert sum(len(rows) for rows in passes) == 6 and len(passes) <= 3
    for p, got in outs:
        assert got["tokens"] == eng.generate([p], max_new_tokens=3).sequences[0]


def test_warm_up_is_a_no_op_without_graphs_and_refused_once_running(eng):
    sched = Scheduler(eng, prefill_chunk=8)
    assert sched.warm_up() == 0  # CPU: nothing to capture
    with pytest.raises(ValueError, match="prefill_chunk must be a positive integer"):
        eng.capture_graphs(0)
    got, emit = collect()
    sched.request([5, 6, 7], emit, max_new_tokens=3, eos_token_id=[])
    with pytest.raises(RuntimeError, match="before the scheduler starts"):
        sched.warm_up()
    run(sched)
    assert got["tokens"] == eng.generate([[5, 6, 7]], max_new_tokens=3).sequences[0]


def test_cancel_during_a_chunked_prompt(eng):
    sched = Scheduler(eng, prefill_chunk=4)
    long_, emit = collect()
    req = sched.request(list(range(5, 25)), emit, max_new_tokens=4, eos_token_id=[])
    sched.step()
    assert sched.chunking is req and req.prefilled == 4
    sched.cancel(req)
    after, emit = collect()
    p = list(range(30, 43))
    sched.request(p, emit, max_new_tokens=5, eos_token_id=[])
    run(sched)
    assert long_["reason"] == "cancelled" and long_["tokens"] == []
    assert after["tokens"] == eng.generate([p], max_new_tokens=5).sequences[0] and sched.chunking is None


def test_per_request_sampling_parameters(eng):
    sched = Scheduler(eng)
    ps = prompts(4, eng.cfg.vocab_size, seed=4)
    settings = [dict(temperature=0.7, seed=11), dict(temperature=0), dict(temperature=1.3, top_k=5, seed=3),
                dict(temperature=0.9, top_p=0.8, seed=7, repetition_penalty=1.5)]
    outs = []
    for p, s in zip(ps, settings):
        got, emit = collect()
        sched.request(p, emit, max_new_tokens=10, **s)
        outs.append((p, s, got))
    run(sched)
    for p, s, got in outs:
        t = s.get("temperature")
        kw = dict(do_sample=bool(t), temperature=t or 1.0, top_k=s.get("top_k", 0), top_p=s.get("top_p", 1.0),
                  seed=s.get("seed"), repetition_penalty=s.get("repetition_penalty", 1.0),
                  eos_token_id=eng.tokenizer.eos_token_id)
        assert got["tokens"] == eng.generate([p], max_new_tokens=10, **kw).sequences[0], s


def test_stop_string_is_cut_from_the_text(eng):
    p = "question : where is paris ? answer :"
    alone = eng.generate([p], max_new_tokens=12, no_repeat_ngram_size=1)
    text = alone.texts[0]  # (the n-gram ban keeps a random model from repeating one token)
    k = next(k for k in range(3, len(text) - 3) if text.find(text[k:k + 3]) == k)
    stop = text[k:k + 3]
    sched = Scheduler(eng)
    got, emit = collect()
    sched.request(p, emit, max_new_tokens=12, stop=[stop], no_repeat_ngram_size=1)
    run(sched)
    assert got["reason"] == "stop" and got["text"] == text[:k]
    assert got["tokens"] == eng.generate([p], max_new_tokens=12, stop=[stop], no_repeat_ngram_size=1).sequences[0]


def test_cancel_frees_the_row_and_spares_the_others(eng):
    sched = Scheduler(eng)
    ps = prompts(3, eng.cfg.vocab_size, seed=5)
    gots = []
    reqs = []
    for p in ps:
        got, emit = collect()
        reqs.append(sched.request(p, emit, max_new_tokens=12, eos_token_id=[]))
        gots.append(got)
    for _ in range(3):
        sched.step()
    sched.cancel(reqs[1])
    sched.step()
    # three steps delivered the first token and two more; the third step's token was still on its way to the
    # host when the request was cancelled, and is dropped
    assert sched.rows[1] is None and gots[1]["reason"] == "cancelled" and len(gots[1]["tokens"]) == 3
    run(sched)
    for i in (0, 2):
        assert gots[i]["tokens"] == eng.generate([ps[i]], max_new_tokens=12).sequences[0]
    # a cancelled request that still waits never runs
    got, emit = collect()
    r = sched.request(ps[0], emit, max_new_tokens=3)
    sched.cancel(r)
    run(sched)
    assert got["reason"] == "cancelled" and got["tokens"] == []


def test_a_failing_consumer_is_dropped_alone(eng):
    sched = Scheduler(eng)
    got, emit = collect()

    def bad(ev):
        raise RuntimeError("client went away")
    sched.request([5, 6, 7], bad, max_new_tokens=5)
    sched.request([5, 6, 7], emit, max_new_tokens=5, eos_token_id=[])
    run(sched)
    assert got["tokens"] == eng.generate([[5, 6, 7]], max_new_tokens=5).sequences[0]


def test_queue_bound_and_shutdown(eng):
    sched = Scheduler(eng, max_queue=2)
    for _ in range(2):
        sched.request([5], collect()[1], max_new_tokens=2)
    with pytest.raises(QueueFull, match="queue is full"):
        sched.request([5], collect()[1], max_new_tokens=2)
    run(sched)
    sched.close()
    with pytest.raises(Closed):
        sched.request([5], collect()[1], max_new_tokens=2)


def test_threaded_clients(eng):
    sched = Scheduler(eng)
    sched.start()
    ps = prompts(8, eng.cfg.vocab_size, seed=6)
    results = [None] * len(ps)
    done = [threading.Event() for _ in ps]

    def client(i):
        got, emit = collect()

        def on(ev):
            emit(ev)
            if ev.finish_reason:
                results[i] = got["tokens"]
                done[i].set()
        sched.request(ps[i], on, max_new_tokens=7, eos_token_id=[])
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(ps))]
    for t in threads:
        t.start()
    for d in done:
        assert d.wait(60)
    # while its scheduler runs, the engine refuses direct generation (it would write the requests' rows)
    with pytest.raises(RuntimeError, match="serves a running continuous-batching Scheduler"):
        eng.generate([ps[0]], max_new_tokens=2)
    with pytest.raises(RuntimeError, match="one scheduler per engine"):
        Scheduler(eng).start()
    sched.close()
    for p, r in zip(ps, results):
        assert r == eng.generate([p], max_new_tokens=7).sequences[0]


def test_close_cancels_what_waits_and_finishes_what_runs(eng):
    sched = Scheduler(eng)
    gots = []
    for p in prompts(6, eng.cfg.vocab_size, seed=7):
        got, emit = collect()
        sched.request(p, emit, max_new_tokens=5, eos_token_id=[])
        gots.append(got)
    sched.step()  # 4 running, 2 waiting
    sched.start()
    sched.close()
    assert [g["reason"] for g in gots] == ["length"] * 4 + ["cancelled"] * 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1), "temperature must be a number >= 0"), (dict(temperature=1, top_p=0), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=48), "exceeds max_seq_len=48"),
    (dict(stop=[""]), "non-empty"), (dict(seed="x"), "seed"), (dict(eos_token_id=10 ** 6), "outside the vocabulary"),
])
def test_bad_requests(eng, kwargs, match):
    sched = Scheduler(eng)
    with pytest.raises(ValueError, match=match):
        sched.request([5, 6], collect()[1], **kwargs)
    assert not sched.waiting


def test_refusals(eng, tmp_path):
    with pytest.raises(ValueError, match="max_queue must be a positive integer"):
        Scheduler(eng, max_queue=0)
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match=r"prefill_chunk must be a positive integer \(prompt tokens per step\)"):
            Scheduler(eng, prefill_chunk=bad)
    path = make_checkpoint(tmp_path / "sd", "llama", num_layers=6)
    sd = Engine.from_pretrained(path, target_speedup=2, strategy="skipdecode", device="cpu")
    with pytest.raises(ValueError, match="SkipDecode"):
        Scheduler(sd)


def test_generation_config_end_tokens_end_requests(tmp_path):
    """A chat model's turn ends at generation_config.json's eos_token_id (e.g. Llama-3's <|eot_id|>), not only
    at the tokenizer's EOS: the engine exposes both, and a request without eos_token_id stops on either."""
    import json
    path = make_checkpoint(tmp_path / "ckpt", "llama", num_layers=4, seed=2)
    eng = Engine.from_pretrained(path, dtype="float32", device="cpu", max_batch_size=2, max_seq_len=48)
    p = "question : where is paris ? answer :"
    free = eng.generate([p], max_new_tokens=10, no_repeat_ngram_size=1).sequences[0]
    end = free[3]
    assert end != eng.tokenizer.eos_token_id and end not in free[:3]
    (tmp_path / "ckpt" / "generation_config.json").write_text(json.dumps({"eos_token_id": [end]}))
    eng = Engine.from_pretrained(path, dtype="float32", device="cpu", max_batch_size=2, max_seq_len=48)
    assert eng.eos_token_ids == sorted({end, eng.tokenizer.eos_token_id})
    sched = Scheduler(eng)
    got, emit = collect()
    sched.request(p, emit, max_new_tokens=10, no_repeat_ngram_size=1)
    run(sched)
    assert got["tokens"] == free[:4] and got["reason"] == "stop"
    for bad in ('"x"', "[1, 100000]", "true"):
        (tmp_path / "ckpt" / "generation_config.json").write_text('{"eos_token_id": %s}' % bad)
        with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id must be a token id or a list"):
            Engine.from_pretrained(path, dtype="float32", device="cpu", max_seq_len=48)
