"""Incremental detokenization and stop strings (ulskip/runtime/text.py)."""
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ulskip.runtime.scheduler import _held_back
from ulskip.runtime.text import MAX_STOP_STRINGS, IncrementalText, check_stop, find_stop
from helpers import make_tokenizer

TEXT = "café crème, naïve façade. 日本語のテキスト。 Ünïcödé ✓ emoji 🙂🙃 and plain ascii words too."


@pytest.fixture(scope="module")
def byte_bpe():
    """A byte-level BPE (GPT-2 style): characters span several tokens, as in Llama 3 / Qwen / SmolLM2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT] * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


@pytest.mark.parametrize("seed", range(5))
def test_pieces_add_up_to_the_decoded_text(byte_bpe, seed):
    rng = random.Random(seed)
    ids = byte_bpe(TEXT)["input_ids"] if seed == 0 else [rng.randrange(len(byte_bpe)) for _ in range(60)]
    inc = IncrementalText(byte_bpe)
    pieces = [inc.push(i) for i in ids]
    pieces.append(inc.flush())
    assert "".join(pieces) == inc.text == byte_bpe.decode(ids, skip_special_tokens=True)
    if seed == 0:  # real text: no piece splits a character, and the text arrives as it is generated
        assert "\ufffd" not in "".join(pieces)
        assert sum(1 for p in pieces if p) > len(ids) // 3


def test_word_level_spaces():
    tok = make_tokenizer()
    ids = tok("the sky is blue", add_special_tokens=False)["input_ids"]
    inc = IncrementalText(tok)
    assert "".join(inc.push(i) for i in ids) + inc.flush() == tok.decode(ids) == "the sky is blue"


def test_find_stop_only_looks_at_new_text():
    assert find_stop("abc STOP def", ["STOP"], 5) == 4          # reaches into the new part
    assert find_stop("abc STOP def", ["STOP"], 9) is None       # ended before the new part
    assert find_stop("xx\n\nyy", ["\n\n", "yy"], 3) == 2        # the earliest start wins
    assert find_stop("abc", [], 0) is None


def test_held_back():
    assert _held_back("hello wor", ["world"]) == 3
    assert _held_back("hello", ["world"]) == 0
    assert _held_back("a\n", ["\n\n"]) == 1


@pytest.mark.parametrize("stop,match", [
    (5, "stop must be None, a string or a list of strings"), (["a", 3], "list of strings"),
    ([""], "non-empty"), (["x"] * 0 + [str(i) for i in range(MAX_STOP_STRINGS + 1)], f"at most {MAX_STOP_STRINGS}"),
])
def test_bad_stop(stop, match):
    with pytest.raises(ValueError, match=match):
        check_stop(stop)


def test_check_stop_normalizes():
    assert check_stop(None) == [] and check_stop("a") == ["a"] and check_stop(["a", "b", "a"]) == ["a", "b"]
