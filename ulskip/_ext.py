"""Thin Python face of the compiled core ulskip._C (csrc/).

Importing ulskip._C registers the ops as torch.ops.ulskip.*; this module imports it lazily so that
`import ulskip` works on a checkout that was never built, and says how to build when an op is used.
"""
from __future__ import annotations

import functools

import torch

_BUILD_HINT = (
    "ulskip._C (the compiled ops in csrc/) is not built or does not load; from the repository root run "
    "`pip install --no-build-isolation -e .` against the installed torch"
)


@functools.lru_cache(maxsize=None)
def _load():
    try:
        from ulskip import _C  # noqa: F401  (the import registers torch.ops.ulskip.*)
    except ImportError as e:
        raise ImportError(f"{_BUILD_HINT} ({e})") from e
    return _C


def is_available() -> bool:
    """True when ulskip._C imports (CPU ops at least)."""
    try:
        _load()
    except ImportError:
        return False
    return True


def has_cuda_ops() -> bool:
    """True when ulskip._C was built with its CUDA kernels (nvcc + a CUDA build of torch)."""
    return is_available() and bool(_load().with_cuda)


def cache_write(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                positions: torch.Tensor) -> None:
    """In place: k_cache[b, :, positions[b, t]] = k[b, t] (cast to the cache dtype); same for v.

    k_cache, v_cache: one cache slot [B, Hkv, S, D], any strides (e.g. cache[slot] of [K, B, Hkv, S, D]);
    k, v: [B, T, Hkv, D], any strides; positions: [B, T] int64 or int32. Same as ulskip.ops.cache_write_ref.
    The CPU op raises on a position outside [0, S); the CUDA op never syncs to check (callers validate
    lengths on the host) and skips such rows.
    """
    _load()
    torch.ops.ulskip.cache_write(k_cache, v_cache, k, v, positions)
