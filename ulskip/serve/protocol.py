"""The request bodies of the OpenAI API the server accepts, validated by pydantic.

Unknown fields are refused (a misspelt parameter must not be silently ignored). Fields of the OpenAI
API that the server does not implement are accepted only at their default value, and said so in the
error. top_k, repetition_penalty, no_repeat_ngram_size and ignore_eos are extensions (vLLM's names; the openai
client sends them with extra_body).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ulskip.runtime.text import MAX_STOP_STRINGS


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2 ** 63 - 1)
    repetition_penalty: float = Field(1.0, gt=0, le=100)
    no_repeat_ngram_size: int = Field(0, ge=0)
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None
    logit_bias: dict | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        for name, default, what in (("n", 1, "one choice per request (n=1)"),
                                    ("presence_penalty", 0.0, "0 (use repetition_penalty)"),
                                    ("frequency_penalty", 0.0, "0 (use repetition_penalty)"),
                                    ("logprobs", None, "none (log probabilities are not returned)"),
                                    ("logit_bias", None, "none (not implemented)")):
            v = getattr(self, name)
            if v != default and not (name == "logprobs" and v is False):
                raise ValueError(f"{name}={v!r} is not supported; allowed: {what}")
        return self


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _one_prompt(self):
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ValueError(f"one prompt per request is supported, got {len(p)}")
            self.prompt = p[0]
        if self.prompt == "" or self.prompt == []:
            raise ValueError("prompt must be non-empty")
        if self.echo or self.suffix is not None or self.best_of not in (None, 1):
            raise ValueError("echo, suffix and best_of are not supported")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _max(self):
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("give max_tokens or max_completion_tokens, not two different values")
            self.max_tokens = self.max_completion_tokens
        return self
