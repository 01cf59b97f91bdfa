"""Self-speculative decoding: greedy tokens identical to all-layers greedy decoding (every family, mixed
lengths, low and high acceptance), sampling distributed as the full model's (a chi-square test that the
draft's own distribution fails), and bad input."""
import math
import warnings

import pytest
import torch

from ulskip import Engine
from ulskip.runtime.sampling import filter_logits
from ulskip.runtime.speculative import MAX_DRAFT_TOKENS, SpeculativeConfig
from helpers import CUDA, FAMILIES, make_hf_model

PROMPTS = [[1, 17, 33, 5, 78, 12, 9], [4, 8], list(range(2, 30)), [7]]


def near_skip(model, kept):
    """Shrink what the layers outside `kept` add to the residual stream, so a draft through `kept` agrees
    with the full model most of the time but not always (both acceptance paths run)."""
    layers = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    with torch.no_grad():
        for i, layer in enumerate(layers):
            if i in kept:
                continue
            for name, p in layer.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight", "dense.weight", "dense_4h_to_h.weight")):
                    p.mul_(0.05)
    return model


def make_model(family, **kw):
    """make_hf_model; Bloom's at N(0, 0.08) writes one token forever, N(0, 0.3) weights make it vary."""
    model = make_hf_model(family, num_layers=6, **kw)
    if family == "bloom":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "layernorm" not in name and "ln_f" not in name:
                    p.normal_(0, 0.3)
    return model


def engine(model, **kw):
    return Engine.from_hf_model(model, target_speedup=1, max_batch_size=kw.pop("max_batch_size", 4),
                                max_seq_len=kw.pop("max_seq_len", 96), **kw)


def spec_generate(eng, prompts, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained models: the "not fine-tuned" warning, tested below
        return eng.generate(prompts, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_full_model(family):
    for shrink in (False, True):
        model = make_model(family)
        if shrink:
            near_skip(model, [0, 3, 5])  # the draft of speedup 2: uls_schedule(6, 2)
        eng = engine(model)
        ref = eng.generate(PROMPTS, max_new_tokens=24)
        for k in (1, 3, 6):
            out = spec_generate(eng, PROMPTS, max_new_tokens=24, speculative={"draft_speedup": 2, "num_draft_tokens": k})
            assert out.sequences == ref.sequences, (family, shrink, k)
            assert out.finish_reasons == ["length"] * len(PROMPTS)
            st = out.speculative
            assert st["draft_layers"] == [0, 3, 5] and st["num_draft_tokens"] == k
            if shrink and k > 1:  # rows advance by different amounts: some drafts kept, some not
                assert 0.3 < st["acceptance_rate"] < 1, st
                assert st["tokens_per_verify"] > 1.5


def test_greedy_eos_and_batch_slots():
    """EOS ends a row mid-round (tokens after it dropped), the others go on; one prompt alone matches."""
    model = near_skip(make_hf_model("llama", num_layers=6), [0, 3, 5])
    eng = engine(model, max_batch_size=8)
    ref = eng.generate(PROMPTS, max_new_tokens=30)
    eos = ref.sequences[0][5]  # a token the first row emits: it must stop there
    ref = eng.generate(PROMPTS, max_new_tokens=30, eos_token_id=eos)
    import ulskip
    assert ulskip.SpeculativeConfig is SpeculativeConfig
    out = spec_generate(eng, PROMPTS, max_new_tokens=30, eos_token_id=eos, speculative=SpeculativeConfig(2, 4))
    assert out.sequences == ref.sequences
    assert out.sequences[0][-1] == eos and len(out.sequences[0]) <= 6
    assert out.finish_reasons[0] == "stop"
    alone = spec_generate(eng, [PROMPTS[2]], max_new_tokens=30, eos_token_id=eos, speculative=SpeculativeConfig(2, 4))
    assert alone.sequences[0] == ref.sequences[2]


def test_draft_of_a_multi_speedup_checkpoint_and_warning():
    model = make_hf_model("llama", num_layers=6)
    model.config.ulskip = {"kept_layers": [0, 1, 5], "num_layers": 6, "target_speedup": 2.0, "strategy": "paper",
                           "prefill": "full", "target_speedups": [1.0, 2.0],
                           "schedules": {"1": list(range(6)), "2": [0, 1, 5]}}
    eng = engine(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trained for 2: no warning
        out = eng.generate(PROMPTS, max_new_tokens=8, speculative={"draft_speedup": 2})
    assert out.speculative["draft_layers"] == [0, 1, 5]  # the checkpoint's schedule, not the rule's [0, 3, 5]
    assert out.sequences == eng.generate(PROMPTS, max_new_tokens=8).sequences
    with pytest.warns(UserWarning, match=r"draft_speedup=3: it was fine-tuned for speedups \['1', '2'\]"):
        eng.generate(PROMPTS, max_new_tokens=4, speculative={"draft_speedup": 3})
    one = make_hf_model("llama", num_layers=6)  # a one-speedup fine-tune: its kept layers draft, no warning
    one.config.ulskip = {"kept_layers": [1, 2, 4], "num_layers": 6, "target_speedup": 2.0, "strategy": "random",
                         "prefill": "full"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert engine(one).generate(PROMPTS, max_new_tokens=4, speculative={"draft_speedup": 2}).speculative[
            "draft_layers"] == [1, 2, 4]
    with pytest.raises(ValueError, match=r"verify takes tokens \[batch, T\], got shape \(4,\)"):
        eng.verify(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    plain = engine(make_hf_model("llama", num_layers=6))
    with pytest.warns(UserWarning, match=r"not fine-tuned for layer skipping"):
        plain.generate(PROMPTS, max_new_tokens=4, speculative={"draft_speedup": 2})


def _exact_joint(model, prompt, V, temperature, top_k):
    """p(t1, t2, t3) of the full model after `prompt`, by enumeration (transformers' forward)."""
    P = len(prompt)
    pairs = [(a, b) for a in range(V) for b in range(V)]
    ids = torch.tensor([prompt + [a, b] for a, b in pairs])
    with torch.no_grad():
        logits = model(ids).logits.float()

    def probs(x):
        return torch.softmax(filter_logits(x, temperature, top_k, 1.0), dim=-1)
    p1 = probs(logits[:1, P - 1])[0]                                   # [V]
    p2 = probs(logits[::V, P])                                         # row a*V: after t1 = a
    p3 = probs(logits[:, P + 1]).view(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


def _chi_square_z(counts, expected):
    """Pearson's chi-square over cells pooled to expected >= 5, as a Wilson-Hilferty z score."""
    order = torch.argsort(expected)
    e, c = expected[order], counts[order]
    cells, acc_e, acc_c = [], 0.0, 0.0
    for ei, ci in zip(e.tolist(), c.tolist()):
        acc_e, acc_c = acc_e + ei, acc_c + ci
        if acc_e >= 5:
            cells.append((acc_e, acc_c))
            acc_e = acc_c = 0.0
    if acc_e > 0:
        cells[-1] = (cells[-1][0] + acc_e, cells[-1][1] + acc_c)
    x2 = sum((ci - ei) ** 2 / ei for ei, ci in cells)
    df = len(cells) - 1
    return ((x2 / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 5)])
def test_sampling_is_distributed_as_the_full_model(temperature, top_k):
    V, prompt = 8, [1, 5, 3]
    model = make_hf_model("llama", num_layers=6, vocab_size=V, bos_token_id=1, pad_token_id=0)
    exact = _exact_joint(model, prompt, V, temperature, top_k).flatten()
    eng = engine(model, max_batch_size=64, max_seq_len=16)
    counts = torch.zeros(V ** 3)
    spec = SpeculativeConfig(draft_speedup=2, num_draft_tokens=2)
    for seed in range(60):
        out = spec_generate(eng, [prompt] * 64, max_new_tokens=3, do_sample=True, temperature=temperature,
                            top_k=top_k, seed=seed, speculative=spec)
        for a, b, c in out.sequences:
            counts[a * V * V + b * V + c] += 1
    n = counts.sum()
    assert out.speculative["acceptance_rate"] < 0.9  # rejections happen: the residual draw is exercised
    assert _chi_square_z(counts, exact * n) < 4.0
    # the test has power: the draft's own distribution (what accepting every draft would give) fails it
    draft = Engine.from_hf_model(model, target_speedup=2, max_batch_size=64, max_seq_len=16)
    wrong = torch.zeros(V ** 3)
    for seed in range(60):
        for a, b, c in draft.generate([prompt] * 64, max_new_tokens=3, do_sample=True, temperature=temperature,
                                      top_k=top_k, seed=seed).sequences:
            wrong[a * V * V + b * V + c] += 1
    assert _chi_square_z(wrong, exact * n) > 8.0


def test_stop_strings_with_speculation_equal_plain():
    from ulskip.runtime.text import cut_at_stop

    class Chars:  # one character per token id: the stop string's text is the ids' letters
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + i % 26) for i in ids)
    ids = [0, 1, 2, 3, 4, 5]
    assert cut_at_stop(Chars(), ids, ["cd"]) == ([0, 1, 2, 3], True)
    assert cut_at_stop(Chars(), ids, ["zz"]) == (ids, False)


def test_bad_input():
    eng = engine(make_hf_model("llama", num_layers=6))
    bad = [({"num_draft_tokens": 0}, r"num_draft_tokens must be an integer in \[1, 15\], got 0"),
           ({"num_draft_tokens": MAX_DRAFT_TOKENS + 1}, r"num_draft_tokens must be an integer in \[1, 15\], got 16"),
           ({"num_draft_tokens": 2.5}, r"num_draft_tokens must be an integer in \[1, 15\], got 2.5"),
           ({"draft_speedup": 1}, r"draft_speedup must be a finite number > 1 \(1 = no draft\), got 1"),
           ({"draft_speedup": "2"}, r"draft_speedup must be a finite number > 1"),
           ({"draft_speedup": 4}, r"draft_speedup must be in \(1, 3\] for 6 layers \(the draft keeps at least two\), got 4"),
           ({"draft": 2}, r"speculative has unknown keys \['draft'\]; allowed: \['draft_speedup', 'num_draft_tokens'\]"),
           (2, r"speculative must be None, a SpeculativeConfig or a dict")]
    for spec, msg in bad:
        with pytest.raises(ValueError, match=msg):
            spec_generate(eng, PROMPTS, max_new_tokens=4, speculative=spec)
    s = {"draft_speedup": 2}
    for kw, msg in [(dict(num_beams=2), r"speculative decoding with beam search is not supported"),
                    (dict(repetition_penalty=1.2), r"with repetition_penalty / no_repeat_ngram_size is not supported"),
                    (dict(output_scores=True), r"output_scores with speculative decoding is not supported"),
                    (dict(max_new_tokens=66), r"prompt length 28 \+ max_new_tokens 66 \+ num_draft_tokens 4 = 98 "
                                              r"exceeds max_seq_len=96")]:
        with pytest.raises(ValueError, match=msg):
            spec_generate(eng, PROMPTS[1:3], **{"max_new_tokens": 4, **kw}, speculative=s)
    skip = Engine.from_hf_model(make_hf_model("llama", num_layers=6), target_speedup=2, max_seq_len=64)
    with pytest.raises(ValueError, match=r"verifies with all 6 layers, but this engine holds 3 \(\[0, 3, 5\]\); "
                                         r"load it with target_speedup=1"):
        skip.generate(PROMPTS, max_new_tokens=4, speculative=s)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_graphs_fp32_identical(family):
    """CUDA graphs for the draft steps and the verify pass, Triton kernels: the same tokens as the CPU."""
    model = near_skip(make_model(family), [0, 3, 5])
    cpu = engine(model, max_batch_size=8)
    ref = cpu.generate(PROMPTS, max_new_tokens=24).sequences
    gpu_eng = Engine.from_hf_model(model.cuda(), target_speedup=1, max_batch_size=8, max_seq_len=96)
    for k in (2, 5, 8):
        out = spec_generate(gpu_eng, PROMPTS, max_new_tokens=24, speculative={"draft_speedup": 2, "num_draft_tokens": k})
        assert out.sequences == ref, (family, k)
    model.cpu()
