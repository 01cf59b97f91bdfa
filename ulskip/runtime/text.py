"""Generated tokens as text while they arrive: incremental detokenization and stop strings.

Both run on the host, once per new token of a sequence, and only when asked for (streaming, stop
strings, the server): plain `generate` never pays for them.
"""
from __future__ import annotations

MAX_STOP_STRINGS = 16  # what the server and the engine accept per request (OpenAI allows 4; vLLM any)


def check_stop(stop) -> list[str]:
    """None, one string or a list of non-empty strings -> a list (empty = no stop strings)."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be None, a string or a list of strings, got {stop!r}")
    if any(s == "" for s in stop):
        raise ValueError("stop strings must be non-empty, got an empty string")
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stop)}")
    return list(dict.fromkeys(stop))


class IncrementalText:
    """The text of a growing list of token ids, handed out in pieces.

    Decoding token by token is wrong for byte-level BPE (a character can span tokens) and for
    tokenizers that drop a word's leading space when it is decoded alone, so each piece is the
    difference between the decoded text of a short window ending at the newest token and of the
    same window without the new tokens; a piece ending in an incomplete character (U+FFFD) waits for
    the next token. `text` is everything handed out so far and equals decode(all ids) once the
    sequence ends."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] is the window's context, already handed out
        self.read = 0
        self.text = ""

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        """Add one token; returns the new text (possibly empty while a character is incomplete)."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            piece = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            self.text += piece
            return piece
        return ""

    def flush(self) -> str:
        """At the end of the sequence: whatever was held back (an incomplete character stays as U+FFFD)."""
        full = self._decode(self.ids)
        piece = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += piece
        self.prefix = self.read = len(self.ids)
        return piece


def find_stop(text: str, stops: list[str], new_from: int) -> int | None:
    """Where the first stop string that ends after text[:new_from] starts in `text`, or None. Earlier text
    was searched before, so only matches reaching into the new part are looked for."""
    best = None
    for s in stops:
        i = text.find(s, max(0, new_from - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


class SequenceEnds:
    """Where each sequence of a batch ends, token by token on the host: EOS, a stop string in its text
    (transformers' stop_strings semantics: the sequence keeps the token that completed it), or max_new
    tokens; and, with a tokenizer, each token's text piece. The one rule of every host-side loop (plain
    streaming, speculative streaming, cutting speculative output at a stop string)."""

    def __init__(self, batch: int, tokenizer, eos_ids, stops: list[str], max_new: int):
        self.texts = [IncrementalText(tokenizer) for _ in range(batch)] if tokenizer is not None else None
        self.eos, self.stops, self.max_new = set(eos_ids), stops, max_new
        self.done, self.count = [False] * batch, [0] * batch

    def push(self, row: int, token: int) -> tuple[str, str | None]:
        """Row `row`'s next token -> (its text piece, the finish reason "stop" / "length" if it ends here)."""
        piece, reason = "", None
        if self.texts is not None:
            text = self.texts[row]
            before = len(text.text)
            piece = text.push(token)
            if self.stops and find_stop(text.text, self.stops, before) is not None:
                reason = "stop"
        self.count[row] += 1
        if token in self.eos:
            reason = "stop"
        elif reason is None and self.count[row] == self.max_new:
            reason = "length"
        if reason is not None:
            self.done[row] = True
            if self.texts is not None:
                piece += self.texts[row].flush()
        return piece, reason


def cut_at_stop(tokenizer, ids: list[int], stops: list[str]) -> tuple[list[int], bool]:
    """ids up to and including the token whose text completes a stop string (as the streaming loop stops),
    and whether one did: for sequences generated ahead of the check (speculative rounds)."""
    ends = SequenceEnds(1, tokenizer, [], stops, len(ids))
    for i, t in enumerate(ids):
        if ends.push(0, t)[1] == "stop":
            return ids[:i + 1], True
    return ids, False
