"""The checkpoint folder's tokenizer, when it has one (string prompts, decoded text, EOS), and the end
tokens its generation_config.json lists."""
from __future__ import annotations

import json
import os

from ulskip.arguments import token_ids

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(path: str):
    """transformers' AutoTokenizer for the folder (never the network), or None when it has no tokenizer files."""
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def generation_eos_ids(path: str, vocab_size: int) -> list[int]:
    """The eos_token_id of the folder's generation_config.json (one id or a list: Llama-3 chat models end
    their turn with <|eot_id|>, not the tokenizer's EOS), or [] without the file or the field."""
    f = os.path.join(path, "generation_config.json")
    if not os.path.isfile(f):
        return []
    try:
        with open(f) as fh:
            eos = json.load(fh).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{f}: not a readable JSON object ({e})") from None
    return check_eos_ids(eos, vocab_size, f"{f}: eos_token_id")


def check_eos_ids(eos, vocab_size: int, name: str) -> list[int]:
    """None, an id or a list of ids -> a sorted list of distinct ids in [0, vocab_size) (arguments.token_ids)."""
    what = f"a token id or a list of token ids in [0, {vocab_size})"
    ids = token_ids(name, eos, what)
    if any(i >= vocab_size for i in ids):
        raise ValueError(f"{name} must be {what}, got {eos!r}")
    return ids
