"""Repetition penalty and no-repeat n-grams: the device implementation against transformers' own logits
processors, row by row (each row a sequence alone, of its own length), and the engine's generate with
them against transformers' generate (greedy and beam search, all layers and with skipping)."""
import pytest
import torch
from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

import ulskip
from helpers import FAMILIES, make_hf_model, save, uls_reference_model
from ulskip import Engine
from ulskip.runtime.penalties import TokenHistory, apply_penalties_, no_repeat_ngram_, repetition_penalty_

V = 30


def _history(seed, B=5, T=12, max_new=6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    tokens = torch.randint(0, 6, (B, T), generator=g)  # few distinct tokens: many repeated n-grams
    tokens[0] = torch.arange(T) % 3  # a periodic row: every n-gram repeats, so something is banned
    tokens[torch.arange(T).view(1, -1) >= lengths.view(-1, 1)] = 29  # padding must never count
    h = TokenHistory(tokens, lengths, max_new)
    for _ in range(3):
        nxt = torch.randint(0, 6, (B,), generator=g)
        nxt[0] = h.lengths[0] % 3
        h.append(nxt)
    return h


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_repeat_ngram_equals_transformers(n, seed):
    h = _history(seed)
    scores = torch.randn(h.tokens.shape[0], V, generator=torch.Generator().manual_seed(seed + 10))
    ours = no_repeat_ngram_(scores.clone(), h, n)
    for b in range(scores.shape[0]):
        seq = h.tokens[b, : h.lengths[b]].unsqueeze(0)
        ref = NoRepeatNGramLogitsProcessor(n)(seq, scores[b:b + 1].clone())
        assert torch.equal(ours[b:b + 1], ref), (b, n)
    assert torch.isinf(ours).any()  # the case bans something


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_equals_transformers(penalty):
    h = _history(3)
    scores = torch.randn(h.tokens.shape[0], V, generator=torch.Generator().manual_seed(4)) * 3
    ours = repetition_penalty_(scores.clone(), h, penalty)
    for b in range(scores.shape[0]):
        seq = h.tokens[b, : h.lengths[b]].unsqueeze(0)
        ref = RepetitionPenaltyLogitsProcessor(penalty)(seq, scores[b:b + 1].clone())
        torch.testing.assert_close(ours[b:b + 1], ref, rtol=0, atol=0)
    assert ours[:, 29].eq(scores[:, 29]).all()  # the padding token id is not in any row: untouched


def test_apply_is_a_noop_when_off():
    h = _history(5)
    scores = torch.randn(h.tokens.shape[0], V)
    assert torch.equal(apply_penalties_(scores.clone(), h, 1.0, 0), scores)


@pytest.fixture(scope="module", params=FAMILIES)
def ckpt(request, tmp_path_factory):
    model = make_hf_model(request.param, vocab_size=12)  # a tiny vocabulary: greedy decoding repeats itself
    return model, save(model, tmp_path_factory.mktemp(request.param))


PROMPTS = [[1, 5, 3, 5, 3, 9, 2], [4, 8, 10, 11]]
KW = [dict(repetition_penalty=5.0), dict(no_repeat_ngram_size=2), dict(repetition_penalty=1.2, no_repeat_ngram_size=3)]


@pytest.mark.parametrize("kw", KW, ids=["rep", "ngram2", "both"])
@pytest.mark.parametrize("beams", [1, 4])
def test_generate_with_penalties_equals_transformers(ckpt, kw, beams):
    """All layers: transformers' generate with the same processors, each prompt alone; a batch of mixed
    lengths gives each prompt what it gets alone."""
    model, path = ckpt
    eng = Engine.from_pretrained(path, max_seq_len=64, max_batch_size=8)
    out = eng.generate(PROMPTS, max_new_tokens=10, num_beams=beams, **kw)
    plain = eng.generate(PROMPTS, max_new_tokens=10, num_beams=beams)
    for p, ours in zip(PROMPTS, out.sequences):
        ref = model.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10, num_beams=beams,
                             do_sample=False, pad_token_id=0, eos_token_id=None, **kw)[0, len(p):].tolist()
        assert ours == ref
    assert out.sequences != plain.sequences  # the processors changed the output


def test_beam_with_penalties_and_skipping_equals_transformers(ckpt):
    """The paper's decode settings (4 beams, no_repeat_ngram_size 3) with ULS 2x, prefill full."""
    model, path = ckpt
    kept = ulskip.uls_schedule(6, 2)
    ref_model = uls_reference_model(model, kept)
    eng = Engine.from_pretrained(path, target_speedup=2, max_seq_len=64, max_batch_size=8)
    out = eng.generate(PROMPTS, max_new_tokens=10, num_beams=4, no_repeat_ngram_size=3)
    for p, ours in zip(PROMPTS, out.sequences):
        ref = ref_model.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10, num_beams=4,
                                 do_sample=False, pad_token_id=0, eos_token_id=None,
                                 no_repeat_ngram_size=3)[0, len(p):].tolist()
        assert ours == ref


@pytest.mark.parametrize("kw,match", [
    (dict(repetition_penalty=0), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty="1.2"), "repetition_penalty must be a finite number > 0"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be an integer >= 0"),
    (dict(no_repeat_ngram_size=2.0), "no_repeat_ngram_size must be an integer >= 0"),
])
def test_bad_penalties(ckpt, kw, match):
    model, path = ckpt
    eng = Engine.from_pretrained(path, max_seq_len=32)
    with pytest.raises(ValueError, match=match):
        eng.generate([PROMPTS[0]], max_new_tokens=2, **kw)
