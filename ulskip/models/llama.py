"""Llama family (Llama 1/2/3, Mistral, Qwen2): RMSNorm, rotary, GQA, SwiGLU.

Weights are fused at load time: q|k|v into one [(Hq + 2 Hkv) D, H] projection and gate|up into one
[2 I, H] projection, so each is one GEMM, and each RMSNorm weight is folded into the projection after it
(the `fold` of weight_source), so no norm has a weight or a kernel of its own at run time.
Shapes: B batch, T new tokens, H hidden.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ulskip import ops
from ulskip.loading.config import ModelConfig
from ulskip.models.base import DecoderLM, Step, WeightSource, attention


class LlamaLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        self.hq, self.hkv, self.d, self.eps = cfg.num_heads, cfg.num_kv_heads, D, cfg.norm_eps
        self.qkv = nn.Linear(H, (self.hq + 2 * self.hkv) * D, bias=cfg.qkv_bias)
        self.o = nn.Linear(self.hq * D, H, bias=cfg.o_bias)
        self.gate_up = nn.Linear(H, 2 * I, bias=cfg.mlp_bias)
        self.down = nn.Linear(I, H, bias=cfg.mlp_bias)

    def forward(self, h, stats, step: Step, layer: int):
        # h: [B, T, H] the residual stream; stats: partial sums of h**2 for the next norm, or None.
        # The norms' weights live in qkv / gate_up (folded at load), so each norm runs inside the
        # projection after it and each residual add inside the projection before it (ops.*).
        qkv = ops.rms_norm_linear(h, stats, self.eps, self.qkv.weight, self.qkv.bias)
        B, T, _ = qkv.shape
        q, k, v = qkv.split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        a = attention(q.view(B, T, self.hq, self.d), k.view(B, T, self.hkv, self.d),
                      v.view(B, T, self.hkv, self.d), step, layer, self.d ** -0.5)
        h, stats = ops.linear_add(a, self.o.weight, self.o.bias, h)
        act = ops.rms_norm_linear(h, stats, self.eps, self.gate_up.weight, self.gate_up.bias, glu=True)
        return ops.linear_add(act, self.down.weight, self.down.bias, h)


class LlamaLM(DecoderLM):
    layer_prefix = "model.layers."

    def __init__(self, cfg, layer_ids):
        super().__init__(cfg, layer_ids)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def init_buffers(self, device):
        inv_freq, self.rope_scale = rope_inv_freq(self.cfg)
        self.inv_freq = inv_freq.to(device)

    @staticmethod
    def make_layer(cfg):
        return LlamaLayer(cfg)

    def embed(self, tokens, step: Step):
        x = self.embed_tokens(tokens)
        # rotary tables as transformers builds them: fp32 angles, cast to the activation dtype
        freqs = step.positions.unsqueeze(-1).float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        step.cos = (emb.cos() * self.rope_scale).to(x.dtype)
        step.sin = (emb.sin() * self.rope_scale).to(x.dtype)
        return x

    def head(self, h, stats):
        return ops.rms_norm_linear(h, stats, self.cfg.norm_eps, self.lm_head.weight)

    @staticmethod
    def weight_source(cfg, name: str) -> WeightSource:
        """The head gets the final norm folded in (a tied head: a folded copy of the embedding)."""
        if name == "embed_tokens.weight":
            return WeightSource(("model.embed_tokens.weight",))
        if name == "lm_head.weight":
            head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
            return WeightSource((head,), fold="model.norm.weight")
        _, i, kind, suffix = name.split(".")  # layers.<i>.<module>.<weight|bias>
        p = f"model.layers.{i}."
        fold = {"qkv": p + "input_layernorm.weight", "gate_up": p + "post_attention_layernorm.weight"}
        tensors = {"qkv": [p + f"self_attn.{x}_proj.{suffix}" for x in "qkv"],
                   "o": [p + f"self_attn.o_proj.{suffix}"],
                   "gate_up": [p + f"mlp.{x}_proj.{suffix}" for x in ("gate", "up")],
                   "down": [p + f"mlp.down_proj.{suffix}"]}[kind]
        return WeightSource(tuple(tensors), fold=fold.get(kind) if suffix == "weight" else None)


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Rotary inverse frequencies [head_dim/2] (fp32) and the cos/sin scale, as transformers computes
    them; scaled variants (llama3, linear, yarn) come from transformers' own rope functions."""
    c = cfg.hf_config
    params = getattr(c, "rope_parameters", None) or {}
    scaling = getattr(c, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(c, "rope_theta", 10000.0))
        d = cfg.head_dim
        return 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)), 1.0
    if rope_type in ("dynamic", "longrope"):
        raise ValueError(f"rope type {rope_type!r} changes with sequence length and is not supported; "
                         "supported: default, linear, llama3, yarn")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unknown rope type {rope_type!r}; supported: default, linear, llama3, yarn")
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](c, "cpu")
    return inv_freq.float(), float(scale)
