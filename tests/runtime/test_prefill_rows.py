"""Prompt passes into chosen rows of a running batch (Engine.prefill_rows) and in chunks (Engine.prefill_chunk):
the same logits and cache contents as the whole-batch prompt pass, and the other rows untouched."""
import random

import pytest
import torch

from ulskip import Engine
from helpers import make_checkpoint


@pytest.fixture(scope="module", params=[("llama", "full"), ("qwen2", "skip"), ("mistral", "full"), ("bloom", "full"),
                                        ("bloom", "skip")], ids=lambda p: "-".join(p))
def eng(request, tmp_path_factory):
    family, prefill = request.param
    path = make_checkpoint(tmp_path_factory.mktemp(family), family, num_layers=6, seed=3)
    return Engine.from_pretrained(path, target_speedup=2, prefill=prefill, dtype="float32", device="cpu",
                                  max_batch_size=4, max_seq_len=40)


def reference(eng, prompt):
    """The whole prompt pass in row 0 -> (logits [V], the prompt's K/V at every kept layer)."""
    T = len(prompt)
    logits = eng.prefill(torch.tensor([prompt]), torch.tensor([T]), graphs=False)[0].clone()
    return logits, eng.cache.k[:, 0, :, :T].clone(), eng.cache.v[:, 0, :, :T].clone()


def prompts(vocab, lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(n)] for n in lengths]


def test_several_prompts_in_one_pass_into_chosen_rows(eng):
    ps = prompts(eng.cfg.vocab_size, [7, 3, 11])
    refs = [reference(eng, p) for p in ps]
    eng.cache.k.fill_(0.5)
    eng.cache.v.fill_(0.5)
    logits = eng.prefill_rows(ps, [3, 1, 2])
    for i, (row, p, (want, k, v)) in enumerate(zip([3, 1, 2], ps, refs)):
        torch.testing.assert_close(logits[i], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(eng.cache.k[:, row, :, :len(p)], k)
        torch.testing.assert_close(eng.cache.v[:, row, :, :len(p)], v)
    assert (eng.cache.k[:, 0] == 0.5).all()  # the row no prompt went to is untouched
    assert (eng.cache.k[:, 1, :, 3:] == 0.5).all()  # and past each prompt, its row too


@pytest.mark.parametrize("chunks", [[5, 5, 3], [1, 12], [12, 1], [13]])
def test_a_prompt_in_chunks_equals_the_whole_pass(eng, chunks):
    (p,) = prompts(eng.cfg.vocab_size, [sum(chunks)], seed=len(chunks))
    want, k, v = reference(eng, p)
    eng.cache.k.fill_(0.5)
    start = 0
    for n in chunks:
        assert (eng.cache.k[:, 2] == 0.5).all()  # the row gets the prompt's K/V after the last chunk
        logits = eng.prefill_chunk(p, 2, start, n)
        start += n
    torch.testing.assert_close(logits[0], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eng.cache.k[:, 2, :, :len(p)], k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eng.cache.v[:, 2, :, :len(p)], v, rtol=1e-5, atol=1e-5)
    assert (eng.cache.k[:, [0, 1, 3]] == 0.5).all()
    # then decoding from the chunked row gives the tokens generate gives the prompt alone
    alone = eng.generate([p], max_new_tokens=6, eos_token_id=[]).sequences[0]
    eng.cache.k.zero_()
    eng.cache.v.zero_()
    start = 0
    for n in chunks:
        logits = eng.prefill_chunk(p, 0, start, n)
        start += n
    toks, pos = [int(logits.argmax(-1))], len(p)
    for _ in range(5):
        logits = eng.decode(torch.tensor([toks[-1]]), torch.tensor([pos]), graphs=False)
        toks.append(int(logits.argmax(-1)))
        pos += 1
    assert toks == alone


def test_bad_calls(eng):
    with pytest.raises(ValueError, match="one row per prompt"):
        eng.prefill_rows([[5, 6]], [0, 1])
    with pytest.raises(ValueError, match="distinct"):
        eng.prefill_rows([[5], [6]], [1, 1])
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        eng.prefill_rows([[5]], [4])
    with pytest.raises(ValueError, match="non-empty prompts of at most"):
        eng.prefill_rows([[]], [0])
    with pytest.raises(ValueError, match="a prompt of 300 tokens exceeds max_seq_len=40"):
        eng.prefill_rows([[5] * 3, [6] * 300], [0, 1])
    with pytest.raises(ValueError, match="does not fit max_seq_len=40"):
        eng.prefill_chunk([5] * 41, 0, 0, 8)
    with pytest.raises(ValueError, match="non-empty"):
        eng.prefill_chunk([], 0, 0, 1)
    for start, size in [(0, 0), (2, 1), (0, 3), (-1, 1)]:
        with pytest.raises(ValueError, match=r"is not a non-empty piece of the 2-token prompt"):
            eng.prefill_chunk([5, 6], 1, start, size)
    eng.prefill_chunk([5, 6, 7], 1, 0, 2)
    with pytest.raises(ValueError, match="does not continue a chunked prompt pass"):
        eng.prefill_chunk([5, 6, 7], 2, 2, 1)
    with pytest.raises(ValueError, match="outside"):
        eng.prefill_chunk([7], -1, 0, 1)
