"""Triton kernels of ulskip, imported as `ulskip.kernels` (setup.py maps this folder; never import it as a
top-level `kernels`: that name belongs to a Hugging Face package).

Submodules (each imports triton; import them only where triton is available):
  norm              rms_norm, add_rms_norm, layer_norm, add_layer_norm
  rotary            rotary_cache_write (rotary on q/k fused with the compact-cache write of k/v)
  decode_attention  decode_attention (split-KV flash-decoding, GQA, ALiBi, per-sequence lengths)
  activation        silu_mul, gelu_tanh
  gemv              fused_gemv (decode projections with norm / SwiGLU / GeLU / residual-add epilogues)

The PyTorch references that define every kernel's semantics live in `ulskip.ops` (the *_ref functions);
`ulskip.ops` dispatches to these kernels for CUDA tensors.
"""
