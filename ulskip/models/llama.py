"""Llama family (Llama 1/2/3, Mistral, Qwen2): RMSNorm, rotary, GQA, SwiGLU.

Weights are fused at load time: q|k|v into one [(Hq + 2 Hkv) D, H] projection and gate|up into one
[2 I, H] projection, so each is one GEMM (DESIGN.md §4), and each RMSNorm weight is folded into the
projection after it (fold_norms). Shapes: B batch, T new tokens, H hidden.
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

    def forward(self, h, stats, step: Step, layer: int):
        # h: [B, T, H] the residual stream; stats: partial sums of h**2 for the next norm, or None.
        # The norms' weights live in qkv / gate_up (LlamaLM.fold_norms), so each norm runs inside the
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

    def fold_norms(self):
        """After loading: multiply each RMSNorm's weight into the projection that follows it (exact in
        real arithmetic: rms_norm(h, g) @ W^T = rms_norm(h) @ (W * g)^T; one rounding of W * g in the
        model dtype), so the norm needs no kernel of its own. The head gets its own tensor (a tied
        embedding is left as it is)."""
        def fold(w, g):
            return nn.Parameter((w.float() * g.float()).to(w.dtype), requires_grad=False)
        for layer in self.layers.values():
            layer.qkv.weight = fold(layer.qkv.weight, layer.input_norm)
            layer.gate_up.weight = fold(layer.gate_up.weight, layer.post_norm)
            del layer.input_norm, layer.post_norm
        self.lm_head.weight = fold(self.lm_head.weight, self.norm)
        del self.norm

    def head(self, h, stats):
        return ops.rms_norm_linear(h, stats, self.cfg.norm_eps, self.lm_head.weight)

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
