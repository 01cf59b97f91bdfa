"""The arguments of one generate() call, checked in one place before anything runs on the device."""
from __future__ import annotations

from dataclasses import dataclass, field


def _positive_int(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


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

    def __post_init__(self):
        _positive_int("max_new_tokens", self.max_new_tokens)
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams must be a positive integer, got {self.num_beams!r}")
        if self.do_sample:
            if not self.temperature > 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
            if not isinstance(self.top_k, int) or self.top_k < 0:
                raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
            if self.num_beams > 1:
                raise ValueError("beam search with sampling is not supported; use num_beams=1 with do_sample=True "
                                 "or do_sample=False with num_beams > 1")
        rp = self.repetition_penalty
        if isinstance(rp, bool) or not isinstance(rp, (int, float)) or not (0 < rp < float("inf")):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1.0 = off), got {rp!r}")
        n = self.no_repeat_ngram_size
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"no_repeat_ngram_size must be an integer >= 0 (0 = off), got {n!r}")
        eos = self.eos_token_id
        if eos is None:
            self.eos_ids = []
        elif isinstance(eos, int):
            self.eos_ids = [eos]
        else:
            self.eos_ids = list(eos)

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0
