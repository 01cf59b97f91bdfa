"""The one rule for when the training code runs its Triton kernels (`use_triton`).

The kernels themselves are loaded with `ulskip.ops._kernel(name)` (which also maps the repo's kernels/
folder to `ulskip.kernels` in a plain source checkout).

Why not `ulskip.ops._use_triton`: that one is for the inference engine and means "CUDA tensor and triton
imports" only. Training additionally runs the kernels on any device under TRITON_INTERPRET=1 (Triton's
CPU interpreter), which is how the CPU tests check every training kernel against PyTorch autograd. Both
rules share `ulskip.ops._triton_ok()` (triton imports and ULSKIP_NO_TRITON is not set).
"""
from __future__ import annotations

import os

import torch

from ulskip import ops


def use_triton(t: torch.Tensor) -> bool:
    """True when the Triton kernels should handle tensor `t`: triton is usable (ulskip.ops._triton_ok)
    and `t` is on CUDA, or TRITON_INTERPRET=1 (the interpreter runs them on CPU tensors too)."""
    return ops._triton_ok() and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
