"""The arguments of one generate() call, checked in one place before anything runs on the device."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from ulskip.arguments import flag, integer, number, token_ids

SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1  # what torch.Generator.manual_seed takes


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    eos_token_id: int | list[int] | None = None
    seed: int | None = None
    output_scores: bool = False
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0       # transformers' RepetitionPenaltyLogitsProcessor; 1 = off
    no_repeat_ngram_size: int = 0         # transformers' NoRepeatNGramLogitsProcessor; 0 = off
    eos_ids: list[int] = field(init=False, default_factory=list)  # eos_token_id as a list ([] = no stop)
    rows: list | None = field(init=False, default=None)  # per-prompt sampling: one config per row (Engine._setup)

    def __post_init__(self):
        """Checks every field (the rule of ulskip/arguments.py) and normalizes numpy / 0-d tensor values.
        None means the default, as in transformers' GenerationConfig (whose fields default to None)."""
        for f in fields(self):
            if f.init and f.name not in ("eos_token_id", "seed") and getattr(self, f.name) is None:
                setattr(self, f.name, f.default)
        self.max_new_tokens = integer("max_new_tokens", self.max_new_tokens, 1, what="a positive integer")
        self.num_beams = integer("num_beams", self.num_beams, 1, what="a positive integer")
        self.do_sample = flag("do_sample", self.do_sample)
        self.output_scores = flag("output_scores", self.output_scores)
        # types always; the ranges that matter only when sampling (transformers ignores them otherwise too)
        self.temperature = number("temperature", self.temperature, what="a finite number > 0")
        self.top_k = integer("top_k", self.top_k, 0, what="an integer >= 0 (0 = off)")
        self.top_p = number("top_p", self.top_p, what="a number in (0, 1]")
        if self.do_sample:
            if not self.temperature > 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
            if self.num_beams > 1:
                raise ValueError("beam search with sampling is not supported; use num_beams=1 with do_sample=True "
                                 "or do_sample=False with num_beams > 1")
        if self.seed is not None:
            self.seed = integer("seed", self.seed, SEED_MIN, SEED_MAX, what="None or an integer in [-2**63, 2**64 - 1]")
        self.length_penalty = number("length_penalty", self.length_penalty)
        self.repetition_penalty = number("repetition_penalty", self.repetition_penalty, 0, lo_open=True,
                                         what="a finite number > 0 (1.0 = off)")
        self.no_repeat_ngram_size = integer("no_repeat_ngram_size", self.no_repeat_ngram_size, 0,
                                            what="an integer >= 0 (0 = off)")
        self.eos_ids = token_ids("eos_token_id", self.eos_token_id)

    def check_vocab(self, vocab_size: int) -> None:
        bad = [e for e in self.eos_ids if e >= vocab_size]
        if bad:
            raise ValueError(f"eos_token_id {bad[0]} is outside the vocabulary [0, {vocab_size})")

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0
