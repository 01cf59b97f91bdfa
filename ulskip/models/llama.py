"""Llama family (Llama 1/2/3, Mistral, Qwen2): RMSNorm, rotary, GQA, SwiGLU.

Weights are fused at load time: q|k|v into one [(Hq + 2 Hkv) D, H] projection and gate|up into one
[2 I, H] projection, so each is one GEMM (DESIGN.md §4). Shapes: B batch, T new tokens, H hidden.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ulskip import ops
from ulskip.config import rope_inv_freq
from ulskip.models.base import DecoderLM, Step, attention


class LlamaLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        self.hq, self.hkv, self.d, self.eps = cfg.num_heads, cfg.num_kv_heads, D, cfg.norm_eps
        self.input_norm = nn.Parameter(torch.empty(H))
        self.qkv = nn.Linear(H, (self.hq + 2 * self.hkv) * D, bias=cfg.qkv_bias)
        self.o = nn.Linear(self.hq * D, H, bias=cfg.o_bias)
        self.post_norm = nn.Parameter(torch.empty(H))
        self.gate_up = nn.Linear(H, 2 * I, bias=cfg.mlp_bias)
        self.down = nn.Linear(I, H, bias=cfg.mlp_bias)

    def forward(self, x, residual, step: Step, layer: int):
        # x: [B, T, H] output of the previous sublayer; residual: the running stream (None at first).
        # Each norm runs inside the projection after it, the SwiGLU inside `down` (ops.*_linear).
        qkv, residual = ops.add_rms_norm_linear(x, residual, self.input_norm, self.eps,
                                                self.qkv.weight, self.qkv.bias)
        B, T, _ = qkv.shape
        q, k, v = qkv.split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        a = attention(q.view(B, T, self.hq, self.d), k.view(B, T, self.hkv, self.d),
                      v.view(B, T, self.hkv, self.d), step, layer, self.d ** -0.5)
        gate_up, residual = ops.add_rms_norm_linear(ops.linear(a, self.o.weight, self.o.bias), residual,
                                                    self.post_norm, self.eps, self.gate_up.weight,
                                                    self.gate_up.bias)
        return ops.silu_mul_linear(gate_up, self.down.weight, self.down.bias), residual


class LlamaLM(DecoderLM):
    def __init__(self, cfg, layer_ids):
        super().__init__(cfg, layer_ids)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.norm = nn.Parameter(torch.empty(cfg.hidden_size))
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

    def head(self, x, residual):
        return ops.add_rms_norm_linear(x, residual, self.norm, self.cfg.norm_eps, self.lm_head.weight)[0]

    @staticmethod
    def hf_names(cfg, ours: str) -> list[str]:
        """Our parameter name -> the Hugging Face tensor names it is built from (concatenated)."""
        top = {"embed_tokens.weight": ["model.embed_tokens.weight"], "norm": ["model.norm.weight"],
               "lm_head.weight": ["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]}
        if ours in top:
            return top[ours]
        _, i, name = ours.split(".", 2)
        p = f"model.layers.{i}."
        kind, _, suffix = name.partition(".")
        return {"input_norm": [p + "input_layernorm.weight"],
                "post_norm": [p + "post_attention_layernorm.weight"],
                "qkv": [p + f"self_attn.{x}_proj.{suffix}" for x in "qkv"],
                "o": [p + f"self_attn.o_proj.{suffix}"],
                "gate_up": [p + f"mlp.{x}_proj.{suffix}" for x in ("gate", "up")],
                "down": [p + f"mlp.down_proj.{suffix}"]}[kind]
