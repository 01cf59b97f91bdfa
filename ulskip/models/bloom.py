"""Bloom: ALiBi attention, LayerNorm (also on the embeddings), GeLU MLP, tied embeddings.

Bloom's fused query_key_value weight is laid out per head as [H, 3, D, hidden]; the loader regroups
it into q|k|v blocks so the split below is the same as the Llama family's.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ulskip import ops
from ulskip.models.base import DecoderLM, Step, WeightSource, attention


class BloomLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        H = cfg.hidden_size
        self.h, self.d, self.eps = cfg.num_heads, cfg.head_dim, cfg.norm_eps
        self.post_norm_residual = cfg.residual_post_norm
        self.input_norm = nn.LayerNorm(H, eps=cfg.norm_eps)
        self.qkv = nn.Linear(H, 3 * H)
        self.o = nn.Linear(H, H)
        self.post_norm = nn.LayerNorm(H, eps=cfg.norm_eps)
        self.up = nn.Linear(H, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, H)

    def forward(self, x, residual, step: Step, layer: int):
        # Bloom keeps one stream (residual is unused): x <- x + attn(ln(x)); x <- x + mlp(ln(x))
        h = ops.layer_norm(x, self.input_norm.weight, self.input_norm.bias, self.eps)
        B, T, _ = h.shape
        qkv = ops.linear(h, self.qkv.weight, self.qkv.bias)
        q, k, v = (t.view(B, T, self.h, self.d) for t in qkv.chunk(3, dim=-1))
        a = attention(q, k, v, step, layer, self.d ** -0.5, step.slopes, rope=False)
        a = ops.linear(a, self.o.weight, self.o.bias)
        if self.post_norm_residual:
            x = h + a
            h = ops.layer_norm(x, self.post_norm.weight, self.post_norm.bias, self.eps)
        else:  # fused: x <- x + a, h <- ln(x)
            h, x = ops.add_layer_norm(a, x, self.post_norm.weight, self.post_norm.bias, self.eps)
        act = ops.linear_gelu(h, self.up.weight, self.up.bias)
        x = ops.linear_add(act, self.down.weight, self.down.bias, h if self.post_norm_residual else x)[0]
        return x, None


class BloomLM(DecoderLM):
    layer_prefix = "transformer.h."

    def __init__(self, cfg, layer_ids):
        super().__init__(cfg, layer_ids)
        H = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, H)
        self.embed_norm = nn.LayerNorm(H, eps=cfg.norm_eps)
        self.norm = nn.LayerNorm(H, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(H, cfg.vocab_size, bias=False)

    def init_buffers(self, device):
        self.slopes = ops.alibi_slopes(self.cfg.num_heads).to(device)

    @staticmethod
    def make_layer(cfg):
        return BloomLayer(cfg)

    def embed(self, tokens, step: Step):
        x = self.embed_tokens(tokens)
        step.slopes = self.slopes
        return ops.layer_norm(x, self.embed_norm.weight, self.embed_norm.bias, self.cfg.norm_eps)

    def head(self, x, residual):
        return ops.linear(ops.layer_norm(x, self.norm.weight, self.norm.bias, self.cfg.norm_eps), self.lm_head.weight)

    @staticmethod
    def weight_source(cfg, name: str) -> WeightSource:
        t = "transformer."
        top = {"embed_tokens.weight": t + "word_embeddings.weight", "lm_head.weight": t + "word_embeddings.weight",
               "embed_norm.weight": t + "word_embeddings_layernorm.weight",
               "embed_norm.bias": t + "word_embeddings_layernorm.bias",
               "norm.weight": t + "ln_f.weight", "norm.bias": t + "ln_f.bias"}
        if name in top:
            return WeightSource((top[name],))
        _, i, kind, suffix = name.split(".")  # layers.<i>.<module>.<weight|bias>
        sub = {"input_norm": "input_layernorm", "post_norm": "post_attention_layernorm",
               "qkv": "self_attention.query_key_value", "o": "self_attention.dense",
               "up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"}[kind]
        convert = (lambda w: regroup_qkv(cfg, w)) if kind == "qkv" else None
        return WeightSource((f"{t}h.{i}.{sub}.{suffix}",), convert=convert)


def regroup_qkv(cfg, tensor: torch.Tensor) -> torch.Tensor:
    """Bloom's per-head [H, 3, D] qkv rows (weight or bias) into q|k|v blocks."""
    rest = tensor.shape[1:]
    return tensor.view(cfg.num_heads, 3, cfg.head_dim, *rest).transpose(0, 1).reshape(tensor.shape)
