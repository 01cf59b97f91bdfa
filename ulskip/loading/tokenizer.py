"""The checkpoint folder's tokenizer, when it has one (string prompts, decoded text, EOS)."""
from __future__ import annotations

import os

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(path: str):
    """transformers' AutoTokenizer for the folder (never the network), or None when it has no tokenizer files."""
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
