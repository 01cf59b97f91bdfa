"""Token sampling on the device: greedy, seeded draws, filtering equal to transformers' warpers, frequencies.
"""
import pytest
import torch

from helpers import GPU, gen, randn
from ulskip.runtime import sampling

def _sampling_devices():
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=GPU)]


@pytest.mark.parametrize("device", _sampling_devices())
def test_sample_greedy(device):
    logits = randn(6, 1000, g=gen(5, device), device=device)
    am = logits.argmax(-1)
    assert torch.equal(sampling.sample(logits, 1.0, 1, 1.0, gen(0, device)), am)
    assert torch.equal(sampling.sample(logits, 0.0, 0, 1.0), am)
    assert torch.equal(sampling.sample(logits, 0.7, 1, 0.5), am)


@pytest.mark.parametrize("device", _sampling_devices())
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 50, 1.0), (1.3, 0, 0.8), (0.9, 20, 0.9)])
def test_sample_seeded_matches_reference(device, temperature, top_k, top_p):
    logits = randn(8, 500, g=gen(6, device), device=device, scale=3.0).half()
    a = sampling.sample(logits, temperature, top_k, top_p, gen(42, device))
    b = sampling.sample(logits, temperature, top_k, top_p, gen(42, device))
    c = sampling.sample(logits, temperature, top_k, top_p, gen(43, device))
    assert a.dtype == torch.int64 and a.shape == (8,) and a.device.type == device
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("device", _sampling_devices())
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 3, 1.0), (1.0, 0, 0.6), (2.0, 5, 0.7)])
def test_sample_never_picks_filtered(device, temperature, top_k, top_p):
    base = randn(1, 40, g=gen(7, device), device=device, scale=2.0)
    logits = base.expand(4000, 40).contiguous()
    allowed = torch.isfinite(sampling.filter_logits(base, temperature, top_k, top_p))[0]
    tok = sampling.sample(logits, temperature, top_k, top_p, gen(8, device))
    assert allowed[tok].all()


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 5, 1.0), (1.5, 0, 0.85), (1.0, 6, 0.9), (1.0, 0, 0.3)])
def test_filtering_equals_transformers_warpers(temperature, top_k, top_p):
    from transformers import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)
    logits = randn(4, 300, g=gen(12), scale=3.0)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                  + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    ref = warpers(None, logits.clone())
    ours = sampling.filter_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    torch.testing.assert_close(ours[torch.isfinite(ours)], ref[torch.isfinite(ref)])


@pytest.mark.parametrize("device", _sampling_devices())
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.5, 0, 0.85), (1.0, 6, 0.9)])
def test_sample_frequencies(device, temperature, top_k, top_p):
    V, N = 8, 40000
    base = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]], device=device)
    p = torch.softmax(sampling.filter_logits(base, temperature, top_k, top_p), -1)[0].double().cpu()
    tok = sampling.sample(base.expand(N, V).contiguous(), temperature, top_k, top_p, gen(9, device))
    freq = torch.bincount(tok.cpu(), minlength=V).double() / N
    sigma = (p * (1 - p) / N).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-4).all(), (freq, p)
