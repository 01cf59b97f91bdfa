"""Exactness against transformers (CPU, fp32) on tiny random checkpoints of every supported family."""
import pytest
import torch

import ulskip
from ulskip import Engine
from helpers import FAMILIES, make_hf_model, reduced_copy, reference_decode, save, uls_reference_model

PROMPT = [1, 17, 33, 5, 78, 12, 9]
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


@pytest.fixture(scope="module", params=FAMILIES)
def ckpt(request, tmp_path_factory):
    model = make_hf_model(request.param)
    return request.param, model, save(model, tmp_path_factory.mktemp(request.param))


def _hf_greedy(model, prompt, steps):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    return out.sequences[0, len(prompt):].tolist(), [l[0].float() for l in out.logits]


def _close(ours, ref, tol=1e-4):
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol)


def test_all_layers_equal_transformers(ckpt):
    family, model, path = ckpt
    eng = Engine.from_pretrained(path, max_seq_len=64)
    assert eng.kept_layers == list(range(6))
    out = eng.generate([PROMPT], max_new_tokens=8, output_scores=True)
    tokens, logits = _hf_greedy(model, PROMPT, 8)
    assert out.sequences == [tokens]
    _close([s[0] for s in out.scores], logits)


@pytest.mark.parametrize("speedup", [2, 3])
@pytest.mark.parametrize("prefill", ["full", "skip"])
def test_skipping_equals_transformers_reference(ckpt, speedup, prefill):
    family, model, path = ckpt
    eng = Engine.from_pretrained(path, target_speedup=speedup, prefill=prefill, max_seq_len=64)
    kept = ulskip.uls_schedule(6, speedup)
    assert eng.kept_layers == kept
    out = eng.generate([PROMPT], max_new_tokens=8, output_scores=True)
    tokens, logits = reference_decode(model, PROMPT, kept, 8, prefill)
    assert out.sequences == [tokens]
    _close([s[0] for s in out.scores], logits)
    # and the reference itself is not the all-layers answer: skipping changed the logits
    assert not torch.allclose(logits[1], _hf_greedy(model, PROMPT, 2)[1][1], atol=1e-3)


def test_batch_of_mixed_lengths_equals_each_alone(ckpt):
    family, model, path = ckpt
    eng = Engine.from_pretrained(path, target_speedup=2, max_seq_len=64)
    prompts = [PROMPT, [3, 4], list(range(2, 15)), [9]]
    batch = eng.generate(prompts, max_new_tokens=6, output_scores=True)
    for i, p in enumerate(prompts):
        alone = eng.generate([p], max_new_tokens=6, output_scores=True)
        assert batch.sequences[i] == alone.sequences[0]
        _close([s[i] for s in batch.scores], [s[0] for s in alone.scores])


@pytest.mark.parametrize("prefill", ["full", "skip"])
def test_beam_search_equals_transformers(ckpt, prefill):
    """All layers: HF's own beam search. prefill="skip": HF beam search on the reduced copy."""
    family, model, path = ckpt
    speedup = 1 if prefill == "full" else 2
    ref_model = model if speedup == 1 else reduced_copy(model, ulskip.uls_schedule(6, speedup))
    eng = Engine.from_pretrained(path, target_speedup=speedup, prefill=prefill, max_seq_len=64, max_batch_size=8)
    eos = 7
    prompts = [PROMPT, [4, 8, 15, 16, 23]]
    out = eng.generate(prompts, max_new_tokens=8, num_beams=4, eos_token_id=eos)
    for p, ours in zip(prompts, out.sequences):
        ref = ref_model.generate(torch.tensor([p]), max_new_tokens=8, num_beams=4, do_sample=False,
                                 eos_token_id=eos, pad_token_id=0)[0, len(p):].tolist()
        ref = ref[:ref.index(eos) + 1] if eos in ref else ref
        assert ours == ref


def test_llama3_rope_scaling(tmp_path):
    model = make_hf_model("llama", rope_parameters=LLAMA3_ROPE)
    eng = Engine.from_pretrained(save(model, tmp_path), max_seq_len=128)
    prompt = list(range(3, 40))  # past original_max_position_embeddings, where the scaling bites
    out = eng.generate([prompt], max_new_tokens=5, output_scores=True)
    tokens, logits = _hf_greedy(model, prompt, 5)
    assert out.sequences == [tokens]
    _close([s[0] for s in out.scores], logits)


def test_compact_cache_holds_kept_layers_only(ckpt):
    family, model, path = ckpt
    full = Engine.from_pretrained(path, max_seq_len=32, max_batch_size=2)
    half = Engine.from_pretrained(path, target_speedup=2, max_seq_len=32, max_batch_size=2)
    assert half.kv_cache_nbytes * 2 == full.kv_cache_nbytes
    cfg = full.cfg
    assert full.kv_cache_nbytes == 2 * 6 * 2 * cfg.num_kv_heads * 32 * cfg.head_dim * 4


def test_prefill_skip_loads_only_kept_layers(ckpt):
    family, model, path = ckpt
    eng = Engine.from_pretrained(path, target_speedup=3, prefill="skip", max_seq_len=32)
    assert eng.model.layer_ids == eng.kept_layers == [0, 5]
    assert sorted(eng.model.layers.keys()) == ["0", "5"]


def test_eos_stops_each_sequence(ckpt):
    family, model, path = ckpt
    eng = Engine.from_pretrained(path, max_seq_len=64)
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, seed=0)  # varied tokens, same draws
    free = eng.generate([PROMPT, [5, 6, 7]], **kw).sequences
    first = next(i for i, t in enumerate(free[0]) if i >= 1 and t not in free[0][:i])  # a token new at step i
    eos = free[0][first]
    out = eng.generate([PROMPT, [5, 6, 7]], eos_token_id=eos, **kw).sequences
    assert out[0] == free[0][:first + 1]
    cut = free[1].index(eos) + 1 if eos in free[1] else 12
    assert out[1] == free[1][:cut]


def test_sampling(ckpt):
    family, model, path = ckpt
    eng = Engine.from_pretrained(path, target_speedup=2, max_seq_len=64)
    greedy = eng.generate([PROMPT], max_new_tokens=8).sequences
    assert eng.generate([PROMPT], max_new_tokens=8, do_sample=True, top_k=1, seed=3).sequences == greedy
    a = eng.generate([PROMPT] * 3, max_new_tokens=8, do_sample=True, temperature=2.0, seed=11)
    b = eng.generate([PROMPT] * 3, max_new_tokens=8, do_sample=True, temperature=2.0, seed=11)
    c = eng.generate([PROMPT] * 3, max_new_tokens=8, do_sample=True, temperature=2.0, seed=12)
    assert a.sequences == b.sequences and a.sequences != c.sequences
    out = eng.generate([PROMPT] * 4, max_new_tokens=8, do_sample=True, top_k=3, seed=5, output_scores=True)
    for t, logits in enumerate(out.scores):
        top3 = logits.topk(3, dim=-1).indices
        for row, seq in enumerate(out.sequences):
            assert seq[t] in top3[row].tolist()


def test_sliding_window_within_the_window(tmp_path):
    """Mistral's sliding window: exact while sequences fit in it, a clear error past it."""
    model = make_hf_model("mistral", sliding_window=16)
    path = save(model, tmp_path)
    eng = Engine.from_pretrained(path)
    assert eng.max_seq_len == 16
    prompt = list(range(3, 13))
    out = eng.generate([prompt], max_new_tokens=6, output_scores=True)
    tokens, logits = _hf_greedy(model, prompt, 6)
    assert out.sequences == [tokens]
    _close([s[0] for s in out.scores], logits)
    with pytest.raises(ValueError, match="max_seq_len=32 exceeds the model's sliding_window=16"):
        Engine.from_pretrained(path, max_seq_len=32)


def test_from_hf_model_follows_the_ulskip_section():
    model = make_hf_model("llama")
    model.config.ulskip = {"kept_layers": [0, 2, 5], "prefill": "skip", "target_speedup": 2}
    eng = Engine.from_hf_model(model, max_seq_len=32)
    assert eng.kept_layers == [0, 2, 5] and eng.prefill_mode == "skip"
    assert eng.model.layer_ids == [0, 2, 5]  # skip: the other layers are not even copied
    assert Engine.from_hf_model(model, prefill="full", max_seq_len=32).prefill_mode == "full"


def test_generation_stops_early_once_every_sequence_hit_eos(ckpt, monkeypatch):
    family, model, path = ckpt
    eng = Engine.from_pretrained(path, max_seq_len=64)
    eos = eng.generate([PROMPT], max_new_tokens=1).sequences[0][0]  # every row's first token
    calls = []
    real = eng.decode
    monkeypatch.setattr(eng, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = eng.generate([PROMPT] * 3, max_new_tokens=40, eos_token_id=eos)
    assert out.sequences == [[eos]] * 3
    assert len(calls) <= 8  # EOS is looked at every 8 steps (one host sync), not after all 40


def test_beam_search_with_skipping_equals_transformers(ckpt):
    """The paper's setting: prefill="full", 2x, 4 beams. Reference: transformers' own beam search on
    a reduced copy whose prompt pass runs the full model (helpers.uls_reference_model)."""
    family, model, path = ckpt
    kept = ulskip.uls_schedule(6, 2)
    ref_model = uls_reference_model(model, kept)
    eng = Engine.from_pretrained(path, target_speedup=2, max_seq_len=64, max_batch_size=8)
    prompts, eos = [PROMPT, [4, 8, 15, 16, 23]], 7
    out = eng.generate(prompts, max_new_tokens=8, num_beams=4, eos_token_id=eos, output_scores=True)
    for i, p in enumerate(prompts):
        ref = ref_model.generate(torch.tensor([p]), max_new_tokens=8, num_beams=4, do_sample=False,
                                 eos_token_id=eos, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        seq = ref.sequences[0, len(p):].tolist()
        assert out.sequences[i] == (seq[:seq.index(eos) + 1] if eos in seq else seq)
        # logits of the 4 running beams of this prompt, step by step (while both still run)
        _close([s[4 * i:4 * i + 4].cpu() for s in out.scores[:len(ref.logits)]], [l.float() for l in ref.logits])
    full = model.generate(torch.tensor([PROMPT]), max_new_tokens=2, num_beams=4, do_sample=False, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
    assert not torch.allclose(full.logits[1].float(), out.scores[1][:4].cpu(), atol=1e-3)  # skipping mattered
