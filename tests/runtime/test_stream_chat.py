"""Engine.stream, stop strings and chat, against Engine.generate and transformers' generate."""
import pytest
import torch

from ulskip import Engine
from helpers import FACTS, WORDS, make_checkpoint, make_train_model

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
                 "{% if add_generation_prompt %}answer :{% endif %}")
PROMPTS = ["question : where is paris ? answer :", "the sky is", "a cat says meow . a dog"]


def byte_bpe():
    """A byte-level BPE tokenizer (the kind transformers' stop-string matching supports) on the test text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [WORDS] + [f"question : {q} answer : {a}" for q, a in FACTS]
    # the alphabet of the text only: a random model then writes printable ASCII, not stray UTF-8 bytes
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral", "bloom"])
def ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    tok = byte_bpe()
    make_train_model(request.param, num_layers=4, vocab_size=len(tok), seed=1).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def eng(ckpt):
    return Engine.from_pretrained(ckpt, dtype="float32", device="cpu", max_batch_size=4, max_seq_len=64)


def test_stream_equals_generate(eng):
    for kw in (dict(), dict(do_sample=True, seed=3, top_k=20), dict(repetition_penalty=1.3, no_repeat_ngram_size=2)):
        out = eng.generate(PROMPTS, max_new_tokens=12, **kw)
        seqs, texts, reasons = [[] for _ in PROMPTS], [""] * len(PROMPTS), [None] * len(PROMPTS)
        for ev in eng.stream(PROMPTS, max_new_tokens=12, **kw):
            assert reasons[ev.index] is None, "no event after a sequence's last"
            seqs[ev.index].append(ev.token_id)
            texts[ev.index] += ev.text
            reasons[ev.index] = ev.finish_reason
        assert seqs == out.sequences, kw
        assert texts == out.texts
        assert reasons == out.finish_reasons == ["length"] * len(PROMPTS)


def test_stop_strings_match_transformers(ckpt, eng):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    # the n-gram ban (equal to transformers', tests/runtime/test_penalties.py) keeps random models from
    # repeating one token, so the outputs have stop strings to find
    kw = dict(max_new_tokens=12, no_repeat_ngram_size=1)
    full = eng.generate(PROMPTS, **kw)
    checked = 0
    for i, p in enumerate(PROMPTS):
        text = full.texts[i]
        # two characters of the output (they may end inside a token: an overhang) whose first occurrence
        # is there, not across the prompt's end (which transformers' criterion would match and ours not)
        starts = [k for k in range(2, len(text) - 1) if (p + text).find(text[k:k + 2]) == len(p) + k
                  and text[k:k + 2].strip()]
        if not starts:
            continue
        stop = text[starts[0]:starts[0] + 2]
        ours = eng.generate([p], stop=[stop, "never-generated"], **kw)
        ids = tok(p, return_tensors="pt")
        ref = hf.generate(**ids, do_sample=False, stop_strings=[stop, "never-generated"], tokenizer=tok,
                          pad_token_id=tok.pad_token_id, **kw)
        assert ours.sequences[0] == ref[0, ids["input_ids"].shape[1]:].tolist(), (p, stop)
        assert stop in ours.texts[0] and ours.finish_reasons == ["stop"]
        checked += 1
    assert checked >= 1


def test_stop_in_a_batch_ends_only_its_sequence(eng):
    full = eng.generate(PROMPTS, max_new_tokens=10)
    stop = full.texts[0].split()[1]
    out = eng.generate(PROMPTS, max_new_tokens=10, stop=stop)
    for i in range(len(PROMPTS)):
        if stop in full.texts[i]:
            n = len(out.sequences[i])
            assert out.sequences[i] == full.sequences[i][:n] and out.finish_reasons[i] == "stop"
            assert stop in out.texts[i] and stop not in eng.tokenizer.decode(out.sequences[i][:-1])
        else:
            assert out.sequences[i] == full.sequences[i] and out.finish_reasons[i] == "length"


def test_stop_with_speculation_equals_plain(eng):
    """Speculative rounds run ahead of the stop check: the sequences are cut where plain decoding stops."""
    import warnings
    full = eng.generate(PROMPTS, max_new_tokens=10)
    stop = full.texts[0].split()[1]
    plain = eng.generate(PROMPTS, max_new_tokens=10, stop=stop)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained model: the low-acceptance warning
        spec = eng.generate(PROMPTS, max_new_tokens=10, stop=stop, speculative={"draft_speedup": 2, "num_draft_tokens": 3})
    assert spec.sequences == plain.sequences and spec.texts == plain.texts
    assert spec.finish_reasons == plain.finish_reasons and "stop" in plain.finish_reasons


def test_stream_with_speculation_equals_generate(eng):
    """Round by round, the same events as plain streaming: tokens, text pieces, finish reasons (EOS, a stop
    string that ends one sequence mid-round, length)."""
    import warnings
    full = eng.generate(PROMPTS, max_new_tokens=10)
    for kw in (dict(), dict(stop=full.texts[0].split()[1]), dict(eos_token_id=full.sequences[1][4]),
               dict(max_new_tokens=1)):
        kw = {"max_new_tokens": 10, **kw}
        plain = [(e.index, e.token_id, e.text, e.finish_reason) for e in eng.stream(PROMPTS, **kw)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an untrained model: the low-acceptance warning
            spec = [(e.index, e.token_id, e.text, e.finish_reason)
                    for e in eng.stream(PROMPTS, speculative={"draft_speedup": 2, "num_draft_tokens": 3}, **kw)]
        for i in range(len(PROMPTS)):  # the order across rows differs (a round gives a row several tokens)
            assert [e for e in spec if e[0] == i] == [e for e in plain if e[0] == i], (kw, i)
        assert len(spec) == len(plain)


def test_eos_finishes_with_stop(eng):
    first = eng.generate(PROMPTS[:1], max_new_tokens=6).sequences[0]
    cut = first[:first.index(first[2]) + 1]
    out = eng.generate(PROMPTS[:1], max_new_tokens=6, eos_token_id=first[2])
    assert out.sequences[0] == cut and out.finish_reasons == ["stop"]
    evs = list(eng.stream(PROMPTS[:1], max_new_tokens=6, eos_token_id=first[2]))
    assert [e.token_id for e in evs] == cut and evs[-1].finish_reason == "stop"


def test_chat_uses_the_template(eng):
    eng.tokenizer.chat_template = CHAT_TEMPLATE
    msgs = [{"role": "user", "content": "where is paris ?"}]
    text = "user : where is paris ? . answer :"
    ids = eng.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert eng.chat_prompt(msgs) == ids
    assert eng.chat(msgs, max_new_tokens=5).sequences == eng.generate([ids], max_new_tokens=5).sequences
    batch = eng.chat([msgs, [{"role": "user", "content": "the sky"}]], max_new_tokens=5)
    assert len(batch.sequences) == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(stop=5), "stop must be"), (dict(stop=[""]), "non-empty"),
    (dict(stop="x", num_beams=2), "stop strings with beam search"),
    (dict(stop="x", output_scores=True), "output_scores with stop strings"),
])
def test_bad_stop_arguments(eng, kwargs, match):
    with pytest.raises(ValueError, match=match):
        eng.generate(PROMPTS[:1], max_new_tokens=3, **kwargs)


def test_bad_chat(eng, tmp_path):
    for bad in ([], [{"role": "user"}], [{"role": "user", "content": 3}], "hi"):
        with pytest.raises(ValueError, match="messages must be a non-empty list"):
            eng.chat_prompt(bad)
    eng2 = Engine.from_pretrained(make_checkpoint(tmp_path / "c", "llama"), device="cpu")
    eng2.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat needs a tokenizer with a chat template"):
        eng2.chat([{"role": "user", "content": "x"}])


def test_per_prompt_sampling_parameters(eng):
    """Lists of do_sample / temperature / top_k / top_p / seed, one value per prompt: each sequence gets what
    generate gives it alone (seeded rows draw from their own generator), in generate and in stream."""
    per = dict(do_sample=[False, True, True], temperature=[1.0, 0.7, 1.3], top_k=[0, 5, 0], top_p=[1.0, 1.0, 0.9],
               seed=[None, 3, 4])
    out = eng.generate(PROMPTS, max_new_tokens=10, **per)
    for i, p in enumerate(PROMPTS):
        alone = eng.generate([p], max_new_tokens=10, **{k: v[i] for k, v in per.items()})
        assert out.sequences[i] == alone.sequences[0], i
    seqs = [[] for _ in PROMPTS]
    for ev in eng.stream(PROMPTS, max_new_tokens=10, **per):
        seqs[ev.index].append(ev.token_id)
    assert seqs == out.sequences
    assert out.sequences[1] != eng.generate([PROMPTS[1]], max_new_tokens=10).sequences[0]  # row 1 really samples


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=[0.5, 1.0]), r"temperature as a list must hold one value per prompt \(3\), got 2"),
    (dict(do_sample=True, temperature=[1.0, -1.0, 1.0]), r"prompt 1: temperature must be > 0, got -1.0"),
    (dict(seed=[1, 2, 3], num_beams=2), r"per-prompt seed with beam search is not supported"),
    (dict(seed=[1, 2, 3], speculative={"draft_speedup": 2}), r"per-prompt seed with speculative decoding"),
])
def test_bad_per_prompt_arguments(eng, kwargs, match):
    with pytest.raises(ValueError, match=match):
        eng.generate(PROMPTS, max_new_tokens=4, **kwargs)
