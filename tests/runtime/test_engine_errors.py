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
