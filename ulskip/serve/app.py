"""FastAPI routes of the OpenAI API over one engine and its continuous-batching scheduler.

    app = build_app(engine, model_name="smollm2")   # then uvicorn.run(app, ...)

The scheduler runs on its own thread; each request is a queue that the scheduler's thread fills
(loop.call_soon_threadsafe) and the request's coroutine drains. A client that disconnects cancels its
request, which frees its cache row before the next decode step. Errors are OpenAI's JSON:
{"error": {"message", "type", "param", "code"}}: 400 for a bad field (named in param), 404 for an
unknown model, 429 when the queue is full, 503 while shutting down.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from ulskip.runtime.scheduler import Closed, QueueFull, Scheduler
from ulskip.serve.protocol import ChatRequest, CompletionRequest

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error(status, message, param=None, kind="invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


def build_app(engine, model_name: str, max_queue: int = 256, shutdown_timeout: float = 30.0,
              start: bool = True, prefill_chunk: int = 512) -> FastAPI:
    """start=False leaves the scheduler stopped (requests queue and nothing runs: tests of a full queue)."""
    scheduler = Scheduler(engine, max_queue=max_queue, prefill_chunk=prefill_chunk)
    tok = engine.tokenizer

    @asynccontextmanager
    async def lifespan(app):
        if start:
            t0 = time.perf_counter()
            n = scheduler.warm_up()
            if n:
                print(f"captured {n} CUDA graphs in {time.perf_counter() - t0:.1f} s")
            scheduler.start()
        yield
        # uvicorn has let in-flight requests finish (its graceful shutdown); cancel whatever is left
        await asyncio.get_running_loop().run_in_executor(None, scheduler.close, shutdown_timeout)

    app = FastAPI(title="ulskip", lifespan=lifespan)
    app.state.scheduler, app.state.engine, app.state.model_name = scheduler, engine, model_name

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body",)]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            msg = f"unknown field {param!r}"
        return _error(400, f"{param}: {msg}" if param else msg, param)

    @app.exception_handler(APIError)
    async def _api(request, exc: APIError):
        return _error(exc.status, exc.message, exc.param, exc.kind)

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": scheduler.busy, "waiting": len(scheduler.waiting),
                "finished": dict(scheduler.finished), "decode_steps": scheduler.steps}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "ulskip", "max_model_len": engine.max_seq_len}]}

    def check_model(name):
        if name != model_name:
            raise APIError(404, f"model {name!r} not found; this server serves {model_name!r}", "model",
                           "not_found_error")

    def prompt_ids(req: CompletionRequest) -> list[int]:
        if isinstance(req.prompt, str):
            if tok is None:
                raise APIError(400, "text prompts need the checkpoint's tokenizer; send token ids", "prompt")
            return tok(req.prompt)["input_ids"]
        bad = [t for t in req.prompt if not 0 <= t < engine.cfg.vocab_size]
        if bad:
            raise APIError(400, f"prompt token ids must be in [0, {engine.cfg.vocab_size}), got {bad[0]}", "prompt")
        return list(req.prompt)

    async def submit(req, ids: list[int], default_max: int):
        """Queue one request; returns (scheduler request, event queue)."""
        if len(ids) >= engine.max_seq_len:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server's context is {engine.max_seq_len} "
                                "tokens (prompt + max_tokens)", "prompt" if isinstance(req, CompletionRequest)
                           else "messages")
        max_tokens = req.max_tokens if req.max_tokens is not None else min(default_max, engine.max_seq_len - len(ids))
        if len(ids) + max_tokens > engine.max_seq_len:
            raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) = {len(ids) + max_tokens} "
                                f"exceeds the context of {engine.max_seq_len} tokens", "max_tokens")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default
        try:
            handle = scheduler.request(ids, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                                       max_new_tokens=max_tokens, temperature=temperature, top_k=req.top_k,
                                       top_p=req.top_p, seed=req.seed, stop=req.stop,
                                       repetition_penalty=req.repetition_penalty,
                                       no_repeat_ngram_size=req.no_repeat_ngram_size,
                                       eos_token_id=[] if req.ignore_eos else None)
        except QueueFull as e:
            raise APIError(429, str(e), None, "rate_limit_error") from e
        except Closed as e:
            raise APIError(503, str(e), None, "server_error") from e
        except ValueError as e:
            raise APIError(400, str(e)) from e
        return handle, events, len(ids)

    async def collect(http: Request, handle, events):
        """All of a request's events (non-streaming), cancelling it if the client goes away."""
        tokens, text = [], []
        checked = time.monotonic()
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                ev = None
            # on a timer, not only when idle: a running request has an event every decode step
            if time.monotonic() - checked > DISCONNECT_POLL_S:
                checked = time.monotonic()
                if await http.is_disconnected():
                    scheduler.cancel(handle)
                    raise APIError(499, "client disconnected")
            if ev is None:
                continue
            tokens += ev.token_ids
            text.append(ev.text)
            if ev.finish_reason is not None:
                check_finished(ev)
                return "".join(text), len(tokens), ev.finish_reason

    def check_finished(ev):
        if ev.finish_reason == "error":
            raise APIError(500, f"generation failed: {ev.error}", None, "server_error")
        if ev.finish_reason == "cancelled":
            raise APIError(503, "the request was cancelled: the server is shutting down", None, "server_error")

    def usage(n_prompt, n_out):
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def stream(handle, events, n_prompt, chunk, include_usage):
        """Server-sent events: a chunk per piece of text, the last with the finish reason, then [DONE]."""
        async def gen():
            n_out, finished = 0, False
            try:
                first = chunk(None, None, first=True)
                if first is not None:
                    yield sse(first)
                while True:
                    ev = await events.get()
                    n_out += len(ev.token_ids)
                    if ev.finish_reason in ("error", "cancelled"):
                        finished = True
                        why = ev.error if ev.finish_reason == "error" else "the server is shutting down"
                        yield sse({"error": {"message": f"generation stopped: {why}", "type": "server_error",
                                             "param": None, "code": None}})
                        break
                    yield sse(chunk(ev.text, ev.finish_reason))  # one chunk per token, as OpenAI streams
                    if ev.finish_reason is not None:
                        finished = True
                        break
                if include_usage:
                    yield sse({**chunk(None, None, usage_only=True), "usage": usage(n_prompt, n_out)})
                yield "data: [DONE]\n\n"
            finally:  # the client went away mid-stream (the generator is closed): free the row
                if not finished:
                    scheduler.cancel(handle)
        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: Request):
        check_model(req.model)
        handle, events, n_prompt = await submit(req, prompt_ids(req), default_max=16)  # OpenAI's default
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
        if req.stream:
            def chunk(text, reason, first=False, usage_only=False):
                if first:
                    return None
                choices = [] if usage_only else [{"index": 0, "text": text or "", "finish_reason": reason,
                                                  "logprobs": None}]
                return {**base, "choices": choices}
            return stream(handle, events, n_prompt, chunk, bool(req.stream_options and req.stream_options.include_usage))
        text, n_out, reason = await collect(http, handle, events)
        return {**base, "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}],
                "usage": usage(n_prompt, n_out)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, http: Request):
        check_model(req.model)
        try:
            ids = engine.chat_prompt([m.model_dump(exclude_none=True) for m in req.messages])
        except (ValueError, jinja2.TemplateError) as e:  # templates refuse e.g. a system turn by raising
            raise APIError(400, str(e), "messages") from e
        handle, events, n_prompt = await submit(req, ids, default_max=engine.max_seq_len)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion", "created": created, "model": model_name}
        if req.stream:
            cbase = {**base, "object": "chat.completion.chunk"}

            def chunk(text, reason, first=False, usage_only=False):
                if usage_only:
                    return {**cbase, "choices": []}
                delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
                return {**cbase, "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}
            return stream(handle, events, n_prompt, chunk, bool(req.stream_options and req.stream_options.include_usage))
        text, n_out, reason = await collect(http, handle, events)
        return {**base, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": reason, "logprobs": None}], "usage": usage(n_prompt, n_out)}

    return app
