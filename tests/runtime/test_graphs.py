"""The CUDA-graph buckets of the runtime, and what the prompt-pass graphs rely on, checked on the CPU."""
import pytest
import torch

from helpers import FAMILIES, make_hf_model, save
from ulskip import Engine
from ulskip.runtime.graphs import PREFILL_GRAPH_TOKENS, fill_static, prefill_bucket

PROMPT = [1, 17, 33, 5, 78, 12, 9]


@pytest.fixture(scope="module", params=FAMILIES)
def ckpt(request, tmp_path_factory):
    model = make_hf_model(request.param)
    return request.param, model, save(model, tmp_path_factory.mktemp(request.param))


def test_prefill_padding_to_the_graph_bucket_changes_nothing(ckpt):
    """What the prompt-pass graphs rely on (ulskip/runtime/graphs.py): right-padding prompts to the bucket's
    shape, with padding rows of length 1, leaves each prompt's logits and its live cache entries as they
    were (causal attention: pads come after every real token)."""
    family, model, path = ckpt
    eng = Engine.from_pretrained(path, target_speedup=2, device="cpu", max_seq_len=64, max_batch_size=4)
    prompts = [PROMPT, [3, 4], list(range(2, 15))]
    T = max(len(p) for p in prompts)
    tokens = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
    lengths = torch.tensor([len(p) for p in prompts])
    ref = eng.prefill(tokens, lengths, graphs=False)
    k_ref, v_ref = eng.cache.k.clone(), eng.cache.v.clone()
    eng.cache.k.fill_(7.0), eng.cache.v.fill_(7.0)  # the padded pass must rewrite every live entry

    b, t = prefill_bucket(3, T, max_batch_size=4, max_seq_len=64)
    assert (b, t) == (4, 16)
    tok, lens = torch.full((b, t), 99), torch.full((b,), 99)  # stale contents of a reused bucket
    fill_static(tok, lens, tokens, lengths)  # what PrefillGraphs does before each replay
    assert lens.tolist() == [7, 2, 13, 1] and tok[3].eq(0).all() and tok[1, 2:].eq(0).all()
    got = eng.prefill(tok, lens, graphs=False)[:3]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(eng.cache.k[:, i, :, :n], k_ref[:, i, :, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(eng.cache.v[:, i, :, :n], v_ref[:, i, :, :n], rtol=1e-5, atol=1e-5)


def test_prefill_graph_buckets():
    assert prefill_bucket(1, 1, 8, 2048) == (1, 16)             # at least 16 tokens
    assert prefill_bucket(1, 128, 8, 2048) == (1, 128)          # powers of two
    assert prefill_bucket(1, 129, 8, 2048) == (1, 256)
    assert prefill_bucket(3, 100, 8, 2048) == (4, 128)          # batch buckets as the decode graphs'
    assert prefill_bucket(1, 40, 8, 50) == (1, 50)              # never past the cache
    assert prefill_bucket(5, 10, 6, 2048) == (6, 16)            # the last batch bucket is max_batch_size
    assert prefill_bucket(1, PREFILL_GRAPH_TOKENS, 8, 4096) == (1, PREFILL_GRAPH_TOKENS)
    assert prefill_bucket(1, PREFILL_GRAPH_TOKENS + 1, 8, 4096) is None  # longer: eager (compute-bound)
    assert prefill_bucket(16, 128, 64, 2048) is None
