"""Repetition penalty and no-repeat n-grams on the device, equal to transformers' logits processors
(RepetitionPenaltyLogitsProcessor, NoRepeatNGramLogitsProcessor) for each sequence.

Both look at every token a sequence holds so far: its prompt and what it generated. `TokenHistory` keeps
those tokens in one [rows, max_len] device tensor with a length per row, so a step costs a few torch ops
and no host sync (transformers builds the banned n-grams in Python lists on the host every step).
Unlike transformers on a batch, padding is never part of a sequence here: each row is scored as if it
ran alone.
"""
from __future__ import annotations

import torch


class TokenHistory:
    def __init__(self, tokens: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int):
        """tokens [B, T] right-padded prompts, lengths [B]; room for max_new_tokens more per row."""
        B, T = tokens.shape
        self.tokens = torch.zeros(B, T + max_new_tokens, dtype=torch.long, device=tokens.device)
        self.tokens[:, :T] = tokens
        self.lengths = lengths.clone().long()

    def append(self, nxt: torch.Tensor) -> None:
        """nxt [B]: one new token per row, at that row's length."""
        self.tokens.scatter_(1, self.lengths.unsqueeze(1), nxt.view(-1, 1))
        self.lengths += 1

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: row b becomes old row rows[b]."""
        self.tokens, self.lengths = self.tokens[rows], self.lengths[rows]

    def valid(self) -> torch.Tensor:
        """[B, max_len] bool: the positions that hold a token of the sequence."""
        pos = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return pos.unsqueeze(0) < self.lengths.unsqueeze(1)


def repetition_penalty_(scores: torch.Tensor, history: TokenHistory, penalty: float) -> torch.Tensor:
    """In place on scores [B, V]: a token the sequence holds gets score * penalty where the score is < 0,
    score / penalty otherwise (CTRL's rule, as transformers applies it)."""
    seen = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
    seen.scatter_add_(1, history.tokens, history.valid().int())
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return scores.copy_(torch.where(seen > 0, penalized, scores))


def no_repeat_ngram_(scores: torch.Tensor, history: TokenHistory, n: int) -> torch.Tensor:
    """In place on scores [B, V]: -inf for every token that would complete an n-gram the sequence already
    holds (its last n-1 tokens followed by that token). Nothing is banned before the sequence holds n-1
    tokens (transformers: cur_len + 1 < n)."""
    B, L = history.tokens.shape
    if L < n:
        return scores
    grams = history.tokens.unfold(1, n, 1)                                      # [B, L-n+1, n]
    starts = torch.arange(grams.shape[1], device=scores.device)
    complete = starts.unsqueeze(0) + n <= history.lengths.unsqueeze(1)          # the n-gram lies inside
    last = (history.lengths - (n - 1)).clamp(min=0)                             # start of the last n-1
    idx = last.view(B, 1) + torch.arange(n - 1, device=scores.device).view(1, -1)
    prefix = history.tokens.gather(1, idx.clamp(max=L - 1))                     # [B, n-1]
    hit = complete & (grams[:, :, : n - 1] == prefix.unsqueeze(1)).all(-1)
    hit &= (history.lengths >= n - 1).unsqueeze(1)
    banned = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
    banned.scatter_add_(1, grams[:, :, n - 1], hit.int())
    return scores.masked_fill_(banned > 0, float("-inf"))


def apply_penalties_(scores: torch.Tensor, history: TokenHistory, repetition_penalty: float,
                     no_repeat_ngram_size: int) -> torch.Tensor:
    """Both processors in transformers' order (repetition penalty first); a no-op when both are off."""
    if repetition_penalty != 1.0:
        repetition_penalty_(scores, history, repetition_penalty)
    if no_repeat_ngram_size > 0:
        no_repeat_ngram_(scores, history, no_repeat_ngram_size)
    return scores
