"""Triton, or a stand-in where it is not installed, and the one rule for when a Triton kernel runs.

Every op module in this package holds its PyTorch reference beside its kernels, so it must import on
machines without triton (macOS, a CPU-only wheel): there `triton` and `tl` below are a stand-in on
which `@triton.jit` returns the function unchanged and every other attribute is the stand-in again.
Such kernels are defined but never launched, because `use_triton` is False without triton.
"""
from __future__ import annotations

import contextlib
import functools
import os

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except Exception:  # noqa: BLE001  (not installed, or broken: the references still run)
    AVAILABLE = False

    class _Missing:
        def jit(self, fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

        def __getattr__(self, name):
            return self

    triton = tl = _Missing()


@functools.lru_cache(maxsize=None)
def enabled() -> bool:
    """triton imports and ULSKIP_NO_TRITON is not set (=1 forces the PyTorch references: debugging)."""
    return AVAILABLE and os.environ.get("ULSKIP_NO_TRITON", "0") in ("", "0")


def use_triton(t, interpreter: bool = False) -> bool:
    """The rule: a Triton kernel handles tensor `t` when Triton is enabled and `t` is on CUDA. With
    interpreter=True (the training kernels) also on any device under TRITON_INTERPRET=1: that is how
    CPU-only CI checks them against PyTorch autograd through a patched model. The engine passes False:
    its CPU path is the reference, which its exactness tests compare against transformers."""
    if not enabled():
        return False
    return t.is_cuda or (interpreter and os.environ.get("TRITON_INTERPRET") == "1")


@contextlib.contextmanager
def reference_ops():
    """Within the block every op runs its PyTorch reference, as with ULSKIP_NO_TRITON=1 (the bench's
    torch-compile peer: the project's own model in plain torch ops, for torch.compile to fuse)."""
    before = os.environ.get("ULSKIP_NO_TRITON")
    os.environ["ULSKIP_NO_TRITON"] = "1"
    enabled.cache_clear()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("ULSKIP_NO_TRITON", None)
        else:
            os.environ["ULSKIP_NO_TRITON"] = before
        enabled.cache_clear()
