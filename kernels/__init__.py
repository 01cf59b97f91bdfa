"""The ops of ulskip, one module per op, imported as `ulskip.kernels` (setup.py maps this folder; never
import it as a top-level `kernels`: that name belongs to a Hugging Face package that transformers probes).

Each module holds the op's PyTorch reference (`*_ref`: the semantics every kernel is tested against), its
Triton kernels and launchers, and, where training needs one, its torch.autograd.Function:
  norm              rms_norm, add_rms_norm, layer_norm, add_layer_norm (+ backward, RMSNorm/LayerNormFunction)
  activation        silu_mul, gelu_tanh, silu_mul_split (+ backward, SwiGLUFunction, GeluTanhFunction)
  gemv              fused_gemv: decode projections with norm / SwiGLU / GeLU / residual-add epilogues
  rotary            rotary_cache_write: rotary on q/k fused with the compact-cache write of k/v
  decode_attention  split-KV flash-decoding (GQA, ALiBi, per-sequence lengths); attention_ref
  cache_write       the compiled cache-write op of ulskip._C (csrc/), CPU and CUDA
  cross_entropy     chunked fused linear + cross-entropy for training
`backend` imports triton (or a stand-in where it is missing) and holds the rule for when Triton runs;
`ulskip.ops` is the dispatch table the models call.
"""
from . import activation, backend, cache_write, common, cross_entropy, decode_attention, gemv, norm, rotary

__all__ = ["activation", "backend", "cache_write", "common", "cross_entropy", "decode_attention", "gemv",
           "norm", "rotary"]
