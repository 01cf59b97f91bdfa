"""The GPU fast path (Triton/CUDA kernels + CUDA graphs) against the CPU reference path, every family.

fp32: identical greedy tokens. bf16: scores within twice the error that the PyTorch path makes at
bf16 against the fp32 reference (docs/design.md, "Tests"), measured on the same prompts.
"""
import pytest
import torch

from ulskip import Engine
from ulskip.runtime.graphs import prefill_bucket
from helpers import FAMILIES, make_hf_model, save

pytestmark = pytest.mark.gpu
PROMPTS = [[1, 17, 33, 5, 78, 12, 9], [4, 8], list(range(2, 40))]


@pytest.fixture(scope="module", params=FAMILIES)
def path(request, tmp_path_factory):
    return save(make_hf_model(request.param, num_layers=8), tmp_path_factory.mktemp(request.param))


def _run(path, device, dtype, graphs=True, prefill_graphs=True, **kw):
    eng = Engine.from_pretrained(path, target_speedup=2, device=device, dtype=dtype, max_seq_len=128,
                                 max_batch_size=8, cuda_graphs=graphs)
    if not prefill_graphs:
        eng.prefill_graphs = None
    return eng.generate(PROMPTS, max_new_tokens=12, output_scores=True, **kw)


def _rel_err(scores, ref):
    num = sum(((a.float().cpu() - b.float().cpu()) ** 2).sum() for a, b in zip(scores, ref))
    den = sum((b.float().cpu() ** 2).sum() for b in ref)
    return float((num / den).sqrt())


def test_fp32_tokens_identical(path):
    ref = _run(path, "cpu", "fp32")
    fast = _run(path, "cuda", "fp32")
    assert fast.sequences == ref.sequences
    assert _rel_err(fast.scores, ref.scores) < 1e-3  # tf32-level agreement at most


def test_bf16_scores_within_tolerance(path):
    """Teacher-force the reference tokens so both paths score the same sequences."""
    ref = _run(path, "cpu", "fp32")
    # PyTorch path in bf16 (no kernels, no graphs: the CPU) sets the error budget
    torch_bf16 = _run(path, "cpu", "bf16")
    fast = _run(path, "cuda", "bf16")
    n = min(_common_prefix(fast.sequences, ref.sequences), _common_prefix(torch_bf16.sequences, ref.sequences))
    assert n >= 1
    budget = _rel_err(torch_bf16.scores[:n], ref.scores[:n])
    err = _rel_err(fast.scores[:n], ref.scores[:n])
    assert err == err and err <= 2 * budget + 1e-3, (err, budget)


def _common_prefix(a, b):
    # steps on which every row produced the same token in both runs
    n = 0
    for t in range(min(min(len(x) for x in a), min(len(y) for y in b))):
        if any(x[t] != y[t] for x, y in zip(a, b)):
            break
        n += 1
    return n + 1  # scores of step n are computed from identical inputs too


def test_decode_graphs_equal_eager(path):
    """The decode graph replays the eager step's kernels: bit for bit (same prompt pass on both sides)."""
    g = _run(path, "cuda", "bf16", graphs=True, prefill_graphs=False)
    e = _run(path, "cuda", "bf16", graphs=False)
    assert g.sequences == e.sequences
    for a, b in zip(g.scores, e.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_all_graphs_equal_eager(path):
    """With the prompt pass a graph too (padded to its bucket: other GEMM shapes, so not bit for bit)."""
    g = _run(path, "cuda", "fp32", graphs=True)
    e = _run(path, "cuda", "fp32", graphs=False)
    assert g.sequences == e.sequences
    assert _rel_err(g.scores, e.scores) < 1e-5


def _same(a, b):
    # a wrong row, a stale buffer or garbage shows as an O(1) difference; rounding is ~1e-3 of the scale
    assert float((a.float() - b.float()).abs().max()) <= 1e-2 * float(b.float().abs().max())


def test_prefill_graph_equals_eager_at_the_padded_shape(path):
    """A prompt-pass replay equals the eager pass over the bucket's padded shape (logits and live cache
    entries; to bf16 rounding, should cuBLAS pick other kernels under capture); one graph per bucket,
    reused by other batch sizes and lengths in it."""
    eng = Engine.from_pretrained(path, target_speedup=2, device="cuda", dtype="bf16", max_seq_len=128,
                                 max_batch_size=8)
    for prompts in (PROMPTS, PROMPTS[:2] + [[5] * 40, [6] * 50], [[3] * 20]):
        T = max(len(p) for p in prompts)
        tokens = torch.tensor([p + [0] * (T - len(p)) for p in prompts], device="cuda")
        lengths = torch.tensor([len(p) for p in prompts], device="cuda")
        with torch.inference_mode():
            got = eng.prefill(tokens, lengths).clone()
        k, v = eng.cache.k.clone(), eng.cache.v.clone()
        b, t = prefill_bucket(len(prompts), T, 8, 128)
        assert (b, t) in eng.prefill_graphs.graphs
        padded = torch.zeros(b, t, dtype=torch.long, device="cuda")
        padded[:len(prompts), :T] = tokens
        padded_lengths = torch.ones(b, dtype=torch.long, device="cuda")
        padded_lengths[:len(prompts)] = lengths
        with torch.inference_mode():
            want = eng.prefill(padded, padded_lengths, graphs=False)[:len(prompts)]
        _same(got, want)
        for i, n in enumerate(lengths.tolist()):
            _same(k[:, i, :, :n], eng.cache.k[:, i, :, :n])
            _same(v[:, i, :, :n], eng.cache.v[:, i, :, :n])
    assert sorted(eng.prefill_graphs.graphs) == [(1, 32), (4, 64)]  # the 4-prompt call replayed (4, 64)


def test_beam_and_sampling_on_gpu(path):
    ref = Engine.from_pretrained(path, target_speedup=2, device="cpu", max_seq_len=64, max_batch_size=8)
    fast = Engine.from_pretrained(path, target_speedup=2, device="cuda", dtype="fp32", max_seq_len=64, max_batch_size=8)
    kw = dict(max_new_tokens=8, num_beams=4, eos_token_id=7)
    assert fast.generate(PROMPTS[:2], **kw).sequences == ref.generate(PROMPTS[:2], **kw).sequences
    a = fast.generate(PROMPTS, max_new_tokens=8, do_sample=True, top_p=0.9, top_k=20, seed=1).sequences
    b = fast.generate(PROMPTS, max_new_tokens=8, do_sample=True, top_p=0.9, top_k=20, seed=1).sequences
    assert a == b


def test_graph_buckets_reused_across_batch_sizes_and_full_cache(path):
    """One engine, several generate calls: bucket 4 captured for 3 rows then replayed for 4, bucket 2
    for 2 rows; the last call fills the cache to max_seq_len. Each equals the eager GPU path."""
    kw = dict(target_speedup=2, device="cuda", dtype="fp32", max_seq_len=50, max_batch_size=4)
    g = Engine.from_pretrained(path, **kw)
    e = Engine.from_pretrained(path, cuda_graphs=False, **kw)
    for prompts, n in ((PROMPTS, 12), (PROMPTS + [[7, 7, 7]], 12), (PROMPTS[:2], 12), ([PROMPTS[2][:36]], 14)):
        assert g.generate(prompts, max_new_tokens=n).sequences == e.generate(prompts, max_new_tokens=n).sequences


def test_decode_runs_the_fused_projections(path, monkeypatch):
    """At decode sizes every projection goes through kernels/gemv.py with its epilogues: Llama's norms
    (from the previous projection's partial sums), SwiGLU and residual adds; Bloom's GeLU and add."""
    from ulskip.kernels import gemv
    seen = set()
    real = gemv.fused_gemv

    def spy(x, weight, bias=None, **kw):
        seen.add(tuple(sorted(k for k, v in kw.items() if k in ("norm_parts", "glu", "gelu", "add", "parts_out")
                              and v is not None and v is not False)))
        return real(x, weight, bias, **kw)
    monkeypatch.setattr(gemv, "fused_gemv", spy)
    _run(path, "cuda", "bf16", graphs=False)
    import json
    import os
    bloom = json.load(open(os.path.join(path, "config.json")))["model_type"] == "bloom"
    want = {(), ("gelu",), ("add", "parts_out")} if bloom else \
        {("norm_parts",), ("glu", "norm_parts"), ("add", "parts_out")}
    assert seen == want, (seen, want)


def test_chunked_prompt_pass_graphs_on_the_gpu(path):
    """Engine.prefill_chunk through its chunk graphs (padded lengths, a graph captured in the middle of a
    prompt, padding past the row's end): the last chunk's logits and the row's K/V equal the whole prompt
    pass (fp32)."""
    eng = Engine.from_pretrained(path, target_speedup=2, device="cuda", dtype="fp32", max_seq_len=64, max_batch_size=2)
    prompt = [(7 * i + 3) % 50 + 4 for i in range(45)]
    want = eng.prefill(torch.tensor([prompt], device="cuda"), torch.tensor([45], device="cuda"), graphs=False)[0].clone()
    k, v = eng.cache.k[:, 0, :, :45].clone(), eng.cache.v[:, 0, :, :45].clone()
    for chunks in ([20, 20, 5], [45], [1, 44], [40, 5]):
        start = 0
        for n in chunks:
            logits = eng.prefill_chunk(prompt, 1, start, n)
            start += n
        torch.testing.assert_close(logits[0], want, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(eng.cache.k[:, 1, :, :45], k, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(eng.cache.v[:, 1, :, :45], v, rtol=1e-4, atol=1e-4)
    assert sorted(eng._chunk_graphs.graphs) == [16, 32, 64]
    prompt = [(5 * i + 1) % 50 + 4 for i in range(64)]  # up to the row's end: the last chunk's padding runs past it
    want = eng.prefill(torch.tensor([prompt], device="cuda"), torch.tensor([64], device="cuda"), graphs=False)[0].clone()
    k = eng.cache.k[:, 0].clone()
    for start, n in ((0, 40), (40, 24)):
        logits = eng.prefill_chunk(prompt, 1, start, n)
    torch.testing.assert_close(logits[0], want, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(eng.cache.k[:, 1], k, rtol=1e-4, atol=1e-4)


def test_warm_up_captures_every_graph_serving_replays(path):
    """After Scheduler.warm_up(), a run of short, shared and chunked prompts captures no new graph, and each
    request still gets generate()'s tokens alone (fp32)."""
    from ulskip.runtime.scheduler import Scheduler
    eng = Engine.from_pretrained(path, target_speedup=2, device="cuda", dtype="fp32", max_seq_len=128,
                                 max_batch_size=4)
    sched = Scheduler(eng, prefill_chunk=24)
    assert sched.warm_up() > 0

    def count():
        return len(eng.graphs.graphs) + len(eng.row_prefill_graphs.graphs) + len(eng._chunk_graphs.graphs)

    before = count()
    prompts = [[(3 * i + 7 * j) % 60 + 4 for j in range(n)] for i, n in enumerate([3, 30, 17, 5, 60, 9, 24, 25, 1])]
    outs = []
    for p in prompts:
        got = []
        sched.request(p, lambda ev, got=got: got.extend(ev.token_ids), max_new_tokens=6, eos_token_id=[])
        outs.append(got)
    while sched.step():
        pass
    assert count() == before
    for p, got in zip(prompts, outs):
        assert got == eng.generate([p], max_new_tokens=6).sequences[0]


@pytest.mark.parametrize("dtype,chunk", [("fp32", 512), ("bf16", 512), ("fp32", 6), ("bf16", 6)])
def test_continuous_batching_on_the_gpu(path, dtype, chunk):
    """Rows joining and leaving a running batch of CUDA-graph decode steps, waiting prompts sharing one
    prompt-pass graph into their rows, and (chunk 6) prompts longer than the chunk in pieces between decode
    steps: each request's tokens equal generate() alone on the same engine (fp32 exactly; bf16 on at least
    85% of tokens, where a batch bucket's different kernel can flip a near-tie of these random models: a
    shared prompt pass runs other GEMM shapes than the prompt alone; 69 of 78 measured on the H200)."""
    from ulskip.runtime.scheduler import Scheduler
    eng = Engine.from_pretrained(path, target_speedup=2, device="cuda", dtype=dtype, max_seq_len=128,
                                 max_batch_size=4)
    prompts = [[3 + i, 17, 33 + 2 * i][:1 + i % 3] + list(range(5, 5 + 3 * i)) for i in range(9)]
    lengths = [12, 5, 9, 14, 3, 8, 11, 6, 10]
    outs = []
    sched = Scheduler(eng, prefill_chunk=chunk)
    for p, n in zip(prompts, lengths):
        got = []
        sched.request(p, lambda ev, got=got: got.extend(ev.token_ids), max_new_tokens=n, eos_token_id=[])
        outs.append(got)
    while sched.step():
        pass
    same = total = 0
    for p, n, got in zip(prompts, lengths, outs):
        alone = eng.generate([p], max_new_tokens=n).sequences[0]
        if dtype == "fp32":
            assert got == alone
        k = next((i for i, (a, b) in enumerate(zip(got, alone)) if a != b), n)
        same, total = same + k, total + n
    assert same >= 0.85 * total
