"""`ulskip serve`'s app on 127.0.0.1, driven by the official openai client (and raw HTTP for what it hides)."""
import concurrent.futures
import json
import random
import socket
import threading
import time

import pytest

# CI installs the serving packages (.ci/run checks they import); a GPU machine without them skips these
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from helpers import make_checkpoint

from ulskip import Engine
from ulskip.serve.app import build_app

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
                 "{% if add_generation_prompt %}answer :{% endif %}")
PROMPTS = ["question : where is paris ? answer :", "the sky is", "a cat says meow . a dog", "two plus two is",
           "where is rome ?", "snow is white . grass"]


class Server:
    """uvicorn running build_app(...) on a thread; stop() is uvicorn's own graceful shutdown."""

    def __init__(self, engine, **kw):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = build_app(engine, "tiny", **kw)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert time.time() - t0 < 30, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("tiny"), "llama", num_layers=6, seed=3)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


def engine(ckpt, **kw):
    return Engine.from_pretrained(ckpt, target_speedup=2, dtype="float32", device="cpu",
                                  **{"max_batch_size": 4, "max_seq_len": 64, **kw})


@pytest.fixture(scope="module")
def ref(ckpt):
    """A second engine for the outputs each request gets alone (the server's engine belongs to its scheduler)."""
    return engine(ckpt)


@pytest.fixture(scope="module")
def srv(ckpt):
    s = Server(engine(ckpt))
    yield s
    s.stop()


def alone(ref, prompt, n, **kw):
    out = ref.generate([prompt], max_new_tokens=n, eos_token_id=ref.tokenizer.eos_token_id, **kw)
    return out.texts[0], out.finish_reasons[0], len(out.sequences[0])


def test_models_and_health(srv):
    assert [m.id for m in srv.client.models.list().data] == ["tiny"]
    h = httpx.get(srv.url + "/health").json()
    assert h["status"] == "ok" and h["running"] == 0


def test_completion_equals_generate(srv, ref):
    r = srv.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=10, temperature=0)
    text, reason, n = alone(ref, PROMPTS[0], 10)
    assert r.choices[0].text == text and r.choices[0].finish_reason == reason
    n_prompt = len(ref.tokenizer(PROMPTS[0])["input_ids"])
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, n, n_prompt + n)
    ids = ref.tokenizer(PROMPTS[1])["input_ids"]
    r = srv.client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == alone(ref, ids, 6)[0]
    r = srv.client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=8, temperature=0.8, seed=5)
    assert r.choices[0].text == alone(ref, PROMPTS[2], 8, do_sample=True, temperature=0.8, seed=5)[0]
    r = srv.client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=8, temperature=0,
                                      extra_body={"top_k": 3, "repetition_penalty": 1.4, "no_repeat_ngram_size": 2})
    assert r.choices[0].text == alone(ref, PROMPTS[2], 8, repetition_penalty=1.4, no_repeat_ngram_size=2)[0]


def test_streaming_completion(srv, ref):
    pieces, reasons = [], []
    for chunk in srv.client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=12, temperature=0,
                                               stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            reasons.append(chunk.choices[0].finish_reason)
        else:
            usage = chunk.usage
    text, reason, n = alone(ref, PROMPTS[3], 12)
    assert "".join(pieces) == text and reasons[-1] == reason and all(r is None for r in reasons[:-1])
    assert len(pieces) > 2 and usage.completion_tokens == n


def test_stop_strings(srv, ref):
    text = alone(ref, PROMPTS[0], 12, no_repeat_ngram_size=1)[0]
    stop = " " + text.split()[2]
    kw = dict(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop],
              extra_body={"no_repeat_ngram_size": 1})
    r = srv.client.completions.create(**kw)
    assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in srv.client.completions.create(stream=True, **kw))
    assert streamed == r.choices[0].text


def test_chat(srv, ref):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "where is paris ?"}]
    r = srv.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=9, temperature=0)
    out = ref.chat(msgs, max_new_tokens=9, eos_token_id=ref.tokenizer.eos_token_id)
    assert r.choices[0].message.content == out.texts[0] and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.choices[0].finish_reason == out.finish_reasons[0]
    chunks = list(srv.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=9, temperature=0,
                                                     stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.texts[0]
    assert chunks[-1].choices[0].finish_reason == out.finish_reasons[0]


def test_sixteen_concurrent_clients(srv, ref):
    rng = random.Random(0)
    jobs = [(rng.choice(PROMPTS) + " " * rng.randint(0, 1), rng.randint(1, 20), rng.random() < 0.5) for _ in range(16)]

    def client(job):
        prompt, n, streamed = job
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        if streamed:
            return "".join(ch.choices[0].text for ch in c.completions.create(
                model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=True))
        return c.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0).choices[0].text
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(client, jobs))
    for (prompt, n, _), text in zip(jobs, got):
        assert text == alone(ref, prompt, n)[0]


@pytest.mark.parametrize("kw,status,param,match", [
    (dict(temperature=-1), 400, "temperature", "greater than or equal to 0"),
    (dict(top_p=0), 400, "top_p", "greater than 0"),
    (dict(max_tokens=0), 400, "max_tokens", "greater than or equal to 1"),
    (dict(max_tokens=200), 400, "max_tokens", "exceeds the context of 64 tokens"),
    (dict(prompt="the sky is " * 40), 400, "prompt", "this server's context is 64"),
    (dict(prompt=[5, 10 ** 6]), 400, "prompt", r"token ids must be in \[0, "),
    (dict(prompt=""), 400, None, "prompt must be non-empty"),
    (dict(n=2), 400, None, "n=2 is not supported"),
    (dict(extra_body={"temprature": 0.5}), 400, "temprature", "unknown field"),
    (dict(stop=[""]), 400, "stop", "non-empty"),
    (dict(model="gpt-4"), 404, "model", "model 'gpt-4' not found; this server serves 'tiny'"),
])
def test_bad_requests(srv, kw, status, param, match):
    args = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 4, **kw}
    with pytest.raises(openai.APIStatusError) as e:
        srv.client.completions.create(**args)
    assert e.value.status_code == status
    err = e.value.body
    assert err.get("param") == param and err.get("type")
    import re
    assert re.search(match, err["message"]), err["message"]


def test_bad_bodies_raw(srv):
    r = httpx.post(srv.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "wizard",
                                                                                          "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"


def test_disconnect_mid_stream_frees_the_row(ckpt):
    s = Server(engine(ckpt, max_seq_len=256))
    try:
        sched = s.app.state.scheduler
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 240, "temperature": 0, "stream": True,
                "stop": ["never-generated"]}
        with httpx.stream("POST", s.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        t0 = time.time()
        while sched.finished["cancelled"] < 1:
            assert time.time() - t0 < 20, "the disconnected request kept its row"
            time.sleep(0.01)
        assert sched.busy == 0 and sched.steps < 239
        # the server still serves
        assert s.client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=3, temperature=0).choices
    finally:
        s.stop()


def test_full_queue_and_shutdown(ckpt):
    s = Server(engine(ckpt, max_batch_size=1), max_queue=1, start=False)  # nothing runs: requests wait
    results = {}

    def waiting_client():
        try:
            s.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=3)
        except openai.APIStatusError as e:
            results["first"] = e.status_code
    t = threading.Thread(target=waiting_client)
    t.start()
    sched = s.app.state.scheduler
    t0 = time.time()
    while not sched.waiting:
        assert time.time() - t0 < 20
        time.sleep(0.01)
    with pytest.raises(openai.RateLimitError, match="queue is full"):
        s.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=3)
    sched.close()  # shutting down: what waits is cancelled, new requests are refused
    t.join(20)
    assert results["first"] == 503
    with pytest.raises(openai.APIStatusError) as e:
        s.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=3)
    assert e.value.status_code == 503
    s.stop()


def test_graceful_shutdown_finishes_in_flight(ckpt, ref):
    s = Server(engine(ckpt))
    got = {}

    def client():
        got["text"] = s.client.completions.create(model="tiny", prompt=PROMPTS[4], max_tokens=40,
                                                  temperature=0).choices[0].text
    t = threading.Thread(target=client)
    t.start()
    time.sleep(0.05)
    s.stop()
    t.join(30)
    assert got["text"] == alone(ref, PROMPTS[4], 40)[0]


def test_sse_wire_format(srv):
    body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_template_refusal_is_a_400(ckpt):
    from transformers import AutoTokenizer
    eng = engine(ckpt)
    eng.tokenizer = AutoTokenizer.from_pretrained(ckpt)
    eng.tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                                   "{{ raise_exception('system turns are not supported') }}{% endif %}"
                                   "{{ m['content'] }}{% endfor %}")
    s = Server(eng)
    try:
        with pytest.raises(openai.BadRequestError, match="system turns are not supported"):
            s.client.chat.completions.create(model="tiny", max_tokens=3, messages=[
                {"role": "system", "content": "x"}, {"role": "user", "content": "y"}])
    finally:
        s.stop()


def test_non_streaming_client_that_leaves_is_cancelled(ckpt, monkeypatch):
    import ulskip.serve.app as app_module
    monkeypatch.setattr(app_module, "DISCONNECT_POLL_S", 0.01)
    s = Server(engine(ckpt, max_seq_len=256))
    try:
        sched = s.app.state.scheduler
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 240, "temperature": 0, "ignore_eos": True}
        with pytest.raises(httpx.TimeoutException):  # the client gives up while its tokens are flowing
            httpx.post(s.url + "/v1/completions", json=body, timeout=0.05)
        t0 = time.time()
        while not sched.finished:
            assert time.time() - t0 < 30
            time.sleep(0.01)
        assert dict(sched.finished) == {"cancelled": 1} and sched.steps < 239 and sched.busy == 0
    finally:
        s.stop()
