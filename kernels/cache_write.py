"""The KV-cache write: k_cache[b, :, positions[b, t]] = k[b, t] (same for v), into one compact-cache slot.

The op is compiled C++/CUDA (csrc/cache_write*.c*, registered as torch.ops.ulskip.cache_write by the
extension ulskip._C), with a CPU version so that every device runs the same op, and graph-capturable on
CUDA. This module is its Python face: ulskip._C is imported lazily, so `import ulskip` works on a checkout
that was never built, and the first use says how to build. cache_write_ref is the reference.
"""
from __future__ import annotations

import functools

import torch

BUILD_HINT = (
    "ulskip._C (the compiled ops in csrc/) is not built or does not load; from the repository root run "
    "`pip install --no-build-isolation -e .` against the installed torch"
)


def cache_write_ref(k_cache, v_cache, k, v, positions) -> None:
    """k_cache[b, :, positions[b, t]] = k[b, t] (same for v). k_cache: [B, Hkv, S, D]; k: [B, T, Hkv, D]."""
    B, T = positions.shape
    b = torch.arange(B, device=positions.device).unsqueeze(1).expand(B, T)
    k_cache[b, :, positions] = k.to(k_cache.dtype)
    v_cache[b, :, positions] = v.to(v_cache.dtype)


@functools.lru_cache(maxsize=None)
def compiled():
    """The extension module ulskip._C (importing it registers torch.ops.ulskip.*)."""
    try:
        from ulskip import _C
    except ImportError as e:
        raise ImportError(f"{BUILD_HINT} ({e})") from e
    return _C


def is_available() -> bool:
    """True when ulskip._C imports (CPU ops at least)."""
    try:
        compiled()
    except ImportError:
        return False
    return True


def has_cuda_ops() -> bool:
    """True when ulskip._C was built with its CUDA kernels (nvcc + a CUDA build of torch)."""
    return is_available() and bool(compiled().with_cuda)


def cache_write(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                positions: torch.Tensor) -> None:
    """In place: k_cache[b, :, positions[b, t]] = k[b, t] (cast to the cache dtype); same for v.

    k_cache, v_cache: one cache slot [B, Hkv, S, D], any strides (e.g. cache[slot] of [K, B, Hkv, S, D]);
    k, v: [B, T, Hkv, D], any strides; positions: [B, T] int64 or int32. Same as cache_write_ref.
    The CPU op raises on a position outside [0, S); the CUDA op never syncs to check (callers validate
    lengths on the host) and skips such rows.
    """
    compiled()
    torch.ops.ulskip.cache_write(k_cache, v_cache, k, v, positions)
