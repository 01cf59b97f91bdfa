"""Everything the tests share (no tests here): one tiny-model factory, a reference for layer skipping built
only from transformers, a tiny word-level tokenizer and a small prefix/response data set for training, and
the kernel tests' comparison rule with its fp64 oracles."""
from __future__ import annotations

import copy
import inspect
import json
import os

import pytest
import torch
from transformers import (BloomConfig, BloomForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from ulskip.kernels.rotary import rotary_ref

FAMILIES = ("llama", "mistral", "qwen2", "bloom")
VOCAB = 101


def make_hf_model(family: str, num_layers: int = 6, seed: int = 0, widen: bool = True, **overrides):
    """The tests' one tiny random transformers model (vocab 101, hidden 64, 4 heads, 2 KV heads). widen:
    weights ~ N(0, 0.08) instead of HF's small init, so different layers give clearly different logits."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=None, bos_token_id=1, pad_token_id=0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**{**common, **overrides}))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**{**common, "sliding_window": None, **overrides}))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**{**common, "num_key_value_heads": 1, **overrides}))
    elif family == "bloom":
        model = BloomForCausalLM(BloomConfig(**{**dict(vocab_size=VOCAB, hidden_size=64, n_layer=num_layers, n_head=4,
                                                       eos_token_id=None, bos_token_id=1, pad_token_id=0),
                                                **overrides}))
    else:
        raise ValueError(family)
    if widen:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" not in name and "ln" not in name:
                    p.normal_(0, 0.08)
    return model.eval() if widen else model


def make_train_model(family="llama", num_layers=4, vocab_size=64, seed=0, tie=None):
    """make_hf_model as the training tests use it: HF's own init, EOS 2, train mode."""
    extra = {} if family == "bloom" else dict(intermediate_size=128, tie_word_embeddings=bool(tie))
    return make_hf_model(family, num_layers, seed, widen=False, vocab_size=vocab_size, eos_token_id=2, **extra)


def save(model, path):
    model.save_pretrained(path)
    return str(path)


def _layers(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def cache_kwarg(model):
    """transformers renamed `past_key_values` to `cache` (5.2x); the H200 has 5.17."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out):
    return getattr(out, "cache", None) or out.past_key_values


def reduced_copy(model, kept):
    """A copy of the model whose layer list holds only the kept layers (renumbered for the cache)."""
    m = copy.deepcopy(model)
    layers = torch.nn.ModuleList([_layers(m)[i] for i in kept])
    for j, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None) or layer.self_attention
        attn.layer_idx = j
    if hasattr(m, "transformer"):
        m.transformer.h = layers
        m.config.n_layer = len(kept)
    else:
        m.model.layers = layers
        m.config.num_hidden_layers = len(kept)
        if getattr(m.config, "layer_types", None):
            m.config.layer_types = [m.config.layer_types[i] for i in kept]
    return m


@torch.no_grad()
def reference_decode(model, prompt, kept, steps, prefill="full"):
    """Greedy ULS decode from transformers alone: the prompt through all layers (prefill="full") with a
    cache, keep the kept layers' entries, decode with the reduced copy. Returns (tokens, logits/step)."""
    small = reduced_copy(model, kept)
    ids = torch.tensor([prompt])
    if prefill == "full":
        out = model(ids, use_cache=True)
        cache = DynamicCache()
        for j, i in enumerate(kept):
            layer = output_cache(out).layers[i]
            cache.update(layer.keys, layer.values, j)
    else:
        out = small(ids, use_cache=True)
        cache = output_cache(out)
    logits = out.logits[0, -1].float()
    tokens, scores = [], []
    for t in range(steps):
        scores.append(logits)
        nxt = int(logits.argmax())
        tokens.append(nxt)
        if t == steps - 1:
            break
        pos = len(prompt) + t
        o = small(torch.tensor([[nxt]]), use_cache=True, position_ids=torch.tensor([[pos]]),
                  attention_mask=torch.ones(1, pos + 1, dtype=torch.long), **{cache_kwarg(small): cache})
        cache, logits = output_cache(o), o.logits[0, -1].float()
    return tokens, scores


def uls_reference_model(model, kept):
    """A transformers model that generates with ULS semantics (prefill="full"), for transformers' own
    generate() (beam search included): the reduced copy, whose prompt pass is delegated to the full
    model, keeping only the kept layers' cache entries in the cache object generate() handed in."""
    small = reduced_copy(model, kept)
    decode = small.forward

    def forward(input_ids=None, **kw):
        key = next((k for k in ("cache", "past_key_values") if kw.get(k) is not None), None)
        cache = kw.get(key) if key else None
        if cache is None or cache.get_seq_length() > 0:
            return decode(input_ids=input_ids, **kw)
        full_kw = {k: v for k, v in kw.items() if k not in (key, "use_cache")}
        out = model(input_ids=input_ids, use_cache=True, **full_kw)
        for j, i in enumerate(kept):
            layer = output_cache(out).layers[i]
            cache.update(layer.keys, layer.values, j)
        out[output_cache_key(out)] = cache
        return out

    small.forward = forward
    return small


def output_cache_key(out):
    return "cache" if "cache" in out else "past_key_values"


# ============================================================================ training data
WORDS = ("the sky is blue . grass is green . snow is white . the sun is hot . ice is cold . fire is hot . "
         "a cat says meow . a dog says woof . a cow says moo . two plus two is four . one plus one is two . "
         "three plus three is six . paris is in france . rome is in italy . tokyo is in japan .")
FACTS = [
    ("what color is the sky ?", "the sky is blue ."), ("what color is grass ?", "grass is green ."),
    ("what color is snow ?", "snow is white ."), ("is the sun hot or cold ?", "the sun is hot ."),
    ("is ice hot or cold ?", "ice is cold ."), ("is fire hot or cold ?", "fire is hot ."),
    ("what does a cat say ?", "a cat says meow ."), ("what does a dog say ?", "a dog says woof ."),
    ("what does a cow say ?", "a cow says moo ."), ("what is two plus two ?", "two plus two is four ."),
    ("what is one plus one ?", "one plus one is two ."), ("what is three plus three ?", "three plus three is six ."),
    ("where is paris ?", "paris is in france ."), ("where is rome ?", "rome is in italy ."),
    ("where is tokyo ?", "tokyo is in japan ."),
]


def records():
    return [{"prefix": f"question : {q} answer :", "text": a} for q, a in FACTS]


def make_tokenizer(path=None):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    text = [WORDS] + [f"question : {q} answer : {a}" for q, a in FACTS]
    tok.train_from_iterator(text, trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    if path is not None:
        fast.save_pretrained(path)
    return fast


def make_checkpoint(path, family="llama", num_layers=4, seed=0):
    tok = make_tokenizer()
    model = make_train_model(family, num_layers, vocab_size=len(tok), seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def write_train_data(folder) -> str:
    """The FACTS records as a .jsonl and a .json array file in `folder`; returns their glob."""
    write_jsonl(folder / "a.jsonl", records()[:8] * 3)
    with open(folder / "b.json", "w") as f:
        json.dump(records()[8:] * 3, f)
    return str(folder / "*.json*")


def write_jsonl(path, recs):
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return str(path)


def read_log_losses(output_dir):
    """Losses logged by the Trainer, from the last checkpoint's trainer_state.json."""
    ckpts = sorted((d for d in os.listdir(output_dir) if d.startswith("checkpoint-")),
                   key=lambda d: int(d.split("-")[1]))
    with open(os.path.join(output_dir, ckpts[-1], "trainer_state.json")) as f:
        return [h["loss"] for h in json.load(f)["log_history"] if "loss" in h]


# ============================================================================ kernel-test helpers
# Tolerance (docs/design.md, "Tests"): max |kernel - fp64 oracle| <= 2 * max |torch reference at the same
# dtype - oracle| + a tiny floor (a fraction of an ulp in 16-bit, a few ulps in fp32). NaN never passes;
# outputs are poisoned with NaN before the kernel writes them.
CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]


def gpu(f):
    """Real-shape test: marked `gpu`, skipped without CUDA."""
    for m in GPU:
        f = m(f)
    return f


# bf16 only on the GPU: the CPU interpreter's bf16 tl.dot is wrong, and (seen with triton 3.9) its
# fp32 -> bf16 conversion truncates instead of rounding to nearest, so bf16 errors there are not the GPU's.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
FLOOR_ULPS = {torch.float32: 16.0, torch.float16: 0.25, torch.bfloat16: 0.25}
# backward kernels against fp64 autograd: relative max error per dtype
TRAIN_TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def gen(seed=0, device=DEV):
    return torch.Generator(device=device).manual_seed(seed)


def randn(*shape, dtype=torch.float32, g=None, device=DEV, scale=1.0):
    return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)


def assert_close(out, oracle, torch_out, dtype, what=""):
    """out: kernel result; oracle: fp64 exact; torch_out: the PyTorch reference at the same dtype."""
    assert out.shape == oracle.shape, (what, out.shape, oracle.shape)
    assert not torch.isnan(out).any(), f"{what}: NaN in the kernel output (unwritten or bad math)"
    assert not torch.isnan(oracle).any(), f"{what}: NaN in the oracle (test bug)"
    err = (out.double() - oracle).abs().max().item()
    terr = (torch_out.double() - oracle).abs().max().item()
    scale = max(1.0, oracle.abs().max().item())
    floor = FLOOR_ULPS[dtype] * torch.finfo(dtype).eps * scale
    if os.environ.get("ULSKIP_TEST_ERRLOG"):  # optional: log every comparison's margin (tuning aid)
        with open(os.environ["ULSKIP_TEST_ERRLOG"], "a") as f:
            f.write(f"{what}\t{dtype}\t{err:.3e}\t{terr:.3e}\t{floor:.1e}\t{err / (2 * terr + floor):.2f}\n")
    assert err <= 2 * terr + floor, f"{what}: kernel error {err:.3e} > 2 x torch error {terr:.3e} + {floor:.1e}"


def nan_like(t, dtype=None):
    return torch.full(t.shape, float("nan"), dtype=dtype or t.dtype, device=t.device)


def rel_err(a, b):
    """max |a - b| / max |b| (NaN in a fails)."""
    assert not torch.isnan(a).any()
    return ((a.float() - b.float()).abs().max() / (b.float().abs().max() + 1e-12)).item()


def bad_tensor(*shape, dtype=torch.float16):
    return torch.randn(*shape, device=DEV).to(dtype)


# ============================================================================ fp64 oracles
def rms_oracle(h, w, eps):
    hd = h.double()
    return w.double() * (hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps))


def ln_oracle(h, w, b, eps):
    hd = h.double()
    mu = hd.mean(-1, keepdim=True)
    var = (hd - mu).pow(2).mean(-1, keepdim=True)
    return (hd - mu) / torch.sqrt(var + eps) * w.double() + b.double()


def rope_tables(B, T, D, dtype, g, device, expand=False):
    ang = torch.rand(1 if expand else B, T, D // 2, generator=g, device=device) * 50.0
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    if expand:
        cos, sin = cos.expand(B, T, D), sin.expand(B, T, D)
    return cos, sin


def rotary_oracle(x, cos, sin):
    return rotary_ref(x.double(), cos.double(), sin.double())


def attn_oracle(q, k_cache, v_cache, seq_lens, scale, slopes=None):
    """fp64, grouped (no repeat of K/V): q [B, Hq, D] -> [B, Hq, D]."""
    B, Hq, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    qd = q.double().view(B, Hkv, G, D)
    s = torch.einsum("bhgd,bhsd->bhgs", qd, k_cache.double()) * scale
    j = torch.arange(S, device=q.device)
    if slopes is not None:
        s = s + slopes.double().view(1, Hkv, G, 1) * j.double()
    s = s.masked_fill((j.view(1, S) >= seq_lens.view(B, 1)).view(B, 1, 1, S), float("-inf"))
    return torch.einsum("bhgs,bhsd->bhgd", torch.softmax(s, -1), v_cache.double()).reshape(B, Hq, D)


def silu_oracle(x):
    xd = x.double()
    gate, up = xd.chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


def gelu_oracle(x):
    xd = x.double()
    return xd * 0.5 * (1.0 + torch.tanh(0.79788456 * xd * (1 + 0.044715 * xd * xd)))
