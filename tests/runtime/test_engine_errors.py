"""Bad input to the engine gets a clear error naming the value and what is allowed."""
import pytest

from ulskip import Engine
from helpers import make_hf_model, save


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return save(make_hf_model("llama"), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def eng(path):
    return Engine.from_pretrained(path, max_seq_len=16, max_batch_size=4)


@pytest.mark.parametrize("speedup,match", [(0.5, r"\[1, 3\]"), (4, r"\[1, 3\]"), ("fast", "target_speedup"),
                                           (float("nan"), "target_speedup")])
def test_bad_target_speedup(path, speedup, match):
    with pytest.raises(ValueError, match=match):
        Engine.from_pretrained(path, target_speedup=speedup)


def test_bad_schedule_and_modes(path):
    with pytest.raises(ValueError, match="first .0. and last .5."):
        Engine.from_pretrained(path, schedule=[1, 2, 5])
    with pytest.raises(ValueError, match=r"distinct layer indices in \[0, 5\]"):
        Engine.from_pretrained(path, schedule=[0, 3, 3, 5])
    with pytest.raises(ValueError, match="not both"):
        Engine.from_pretrained(path, schedule=[0, 5], target_speedup=2)
    with pytest.raises(ValueError, match="prefill must be one of"):
        Engine.from_pretrained(path, prefill="half")
    with pytest.raises(ValueError, match="dtype must be one of"):
        Engine.from_pretrained(path, dtype="int8")
    with pytest.raises(ValueError, match="max_seq_len=1000 exceeds"):
        Engine.from_pretrained(path, max_seq_len=1000)


@pytest.mark.parametrize("prompts,match", [
    ([], "non-empty list"), ("1 2 3", "non-empty list"), ([[1, 2], []], "prompt 1 is empty"),
    ([[1, 2, 1000]], r"token ids in \[0, 101\)"), ([[1, -1]], r"token ids in \[0, 101\)"),
])
def test_bad_prompts(eng, prompts, match):
    with pytest.raises(ValueError, match=match):
        eng.generate(prompts, max_new_tokens=2)


def test_lengths_and_batch_limits(eng):
    with pytest.raises(ValueError, match=r"prompt length 10 \+ max_new_tokens 7 = 17 exceeds max_seq_len=16"):
        eng.generate([list(range(1, 11))], max_new_tokens=7)
    with pytest.raises(ValueError, match=r"5 prompts x 1 beams = 5 rows exceed max_batch_size=4"):
        eng.generate([[1]] * 5, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"2 prompts x 4 beams = 8 rows"):
        eng.generate([[1], [2]], max_new_tokens=2, num_beams=4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(num_beams=0), "num_beams must be a positive integer"),
    (dict(do_sample=True, temperature=0), "temperature must be > 0"),
    (dict(do_sample=True, top_p=0), r"top_p must be in \(0, 1\]"),
    (dict(do_sample=True, top_k=-1), "top_k must be an integer >= 0"),
    (dict(do_sample=True, num_beams=2), "beam search with sampling"),
])
def test_bad_generation_options(eng, kwargs, match):
    with pytest.raises(ValueError, match=match):
        eng.generate([[1, 2]], **{"max_new_tokens": 2, **kwargs})


def test_numpy_and_tensor_token_ids_are_accepted(eng):
    import numpy as np
    import torch
    ref = eng.generate([[1, 2, 3]], max_new_tokens=3).sequences
    assert eng.generate([list(np.array([1, 2, 3]))], max_new_tokens=3).sequences == ref
    assert eng.generate([torch.tensor([1, 2, 3])], max_new_tokens=3).sequences == ref


# ----------------------------------------------------------------------------- one rule for argument types
@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature="1", do_sample=True), r"temperature must be a finite number > 0, got '1'"),
    (dict(top_p="0.5", do_sample=True), r"top_p must be a number in \(0, 1\], got '0.5'"),
    (dict(do_sample="no"), r"do_sample must be True or False, got 'no'"),
    (dict(num_beams=True), r"num_beams must be a positive integer, got True"),
    (dict(max_new_tokens=2.0), r"max_new_tokens must be a positive integer, got 2.0"),
    (dict(top_k=True, do_sample=True), r"top_k must be an integer >= 0 \(0 = off\), got True"),
    (dict(seed=2 ** 64), r"seed must be None or an integer in \[-2\*\*63, 2\*\*64 - 1\]"),
    (dict(seed="1"), r"seed must be None or an integer"),
    (dict(eos_token_id=2.0), r"eos_token_id must be None, a token id or a list of token ids"),
    (dict(eos_token_id=[2, "x"]), r"eos_token_id must be None, a token id or a list of token ids"),
    (dict(eos_token_id=101), r"eos_token_id 101 is outside the vocabulary \[0, 101\)"),
    (dict(eos_token_id=-3), r"eos_token_id must be None, a token id"),
    (dict(output_scores="yes"), r"output_scores must be True or False"),
])
def test_argument_types(eng, kwargs, match):
    with pytest.raises(ValueError, match=match):
        eng.generate([[1, 2]], **{"max_new_tokens": 2, **kwargs})


def test_none_means_the_default_as_in_transformers(eng):
    """transformers' GenerationConfig leaves temperature, top_k, top_p, ... None: forwarding them works."""
    ref = eng.generate([[1, 2, 3]], max_new_tokens=4).sequences
    assert eng.generate([[1, 2, 3]], max_new_tokens=4, temperature=None, top_k=None, top_p=None, do_sample=None,
                        length_penalty=None, output_scores=None, num_beams=None).sequences == ref
    assert eng.generate([[1, 2, 3]], max_new_tokens=4, eos_token_id={7, 9}).sequences == \
        eng.generate([[1, 2, 3]], max_new_tokens=4, eos_token_id=[9, 7]).sequences
    eng.generate([[1, 2]], max_new_tokens=2, do_sample=True, seed=-1)  # torch takes negative seeds


def test_numpy_and_0d_tensor_numbers_are_accepted(eng):
    import numpy as np
    import torch
    ref = eng.generate([[1, 2, 3]], max_new_tokens=4, eos_token_id=7).sequences
    for eos in (np.int64(7), torch.tensor(7), [np.int32(7)], np.array([7])):
        assert eng.generate([[1, 2, 3]], max_new_tokens=4, eos_token_id=eos).sequences == ref
    assert eng.generate([[1, 2, 3]], max_new_tokens=np.int64(4), num_beams=np.int8(1),
                        do_sample=np.bool_(False), eos_token_id=7).sequences == ref
    a = eng.generate([[1, 2]], max_new_tokens=3, do_sample=True, temperature=np.float32(0.8), seed=np.int64(3))
    b = eng.generate([[1, 2]], max_new_tokens=3, do_sample=True, temperature=0.8, seed=3)
    assert a.sequences == b.sequences


def test_prompts_as_arrays(eng):
    import numpy as np
    import torch
    ref = eng.generate([[1, 2, 3], [4, 5, 6]], max_new_tokens=3).sequences
    assert eng.generate([np.array([1, 2, 3]), np.array([4, 5, 6])], max_new_tokens=3).sequences == ref
    assert eng.generate(np.array([[1, 2, 3], [4, 5, 6]]), max_new_tokens=3).sequences == ref
    assert eng.generate(torch.tensor([[1, 2, 3], [4, 5, 6]]), max_new_tokens=3).sequences == ref
    with pytest.raises(ValueError, match=r"prompt 0 must be a 1-d sequence of token ids, got shape \(1, 3\)"):
        eng.generate([np.array([[1, 2, 3]])], max_new_tokens=3)
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        eng.generate(np.array([1, 2, 3]), max_new_tokens=3)
    with pytest.raises(ValueError, match="prompt 0 must be a string or a sequence of token ids, got int"):
        eng.generate([5], max_new_tokens=3)


def test_engine_construction_arguments(path):
    import torch
    for kw, match in ((dict(dtype=torch.float64), "dtype must be one of"), (dict(dtype="int8"), "dtype must be one of"),
                      (dict(device="meta"), r"device must be 'cpu', 'cuda' or 'cuda:N', got 'meta'"),
                      (dict(device="gpu0"), r"device must be 'cpu', 'cuda' or 'cuda:N'"),
                      (dict(max_batch_size=True), "max_batch_size must be a positive integer, got True"),
                      (dict(max_batch_size=2.0), "max_batch_size must be a positive integer, got 2.0"),
                      (dict(max_batch_size=10 ** 7), r"the KV cache for max_batch_size=10000000 x max_seq_len=16 .* "
                                                     r"needs .* GiB, but cpu has .* GiB free")):
        with pytest.raises(ValueError, match=match):
            Engine.from_pretrained(path, max_seq_len=16, **kw)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available on this machine"):
            Engine.from_pretrained(path, device="cuda")


def test_decode_layers_must_be_cached(path):
    import torch
    eng = Engine.from_pretrained(path, target_speedup=2, max_seq_len=16)  # kept [0, 3, 5]: all loaded, 3 cached
    eng.prefill(torch.tensor([[1, 2, 3]]), torch.tensor([3]))
    for layers in ([0, 1, 5], [5, 3], [3, 3]):
        with pytest.raises(ValueError, match=r"decode layers must be distinct, sorted layers of the compact cache"):
            eng.decode(torch.tensor([4]), torch.tensor([3]), layers=layers)
    assert eng.decode(torch.tensor([4]), torch.tensor([3]), layers=[3, 5]).shape == (1, 101)
