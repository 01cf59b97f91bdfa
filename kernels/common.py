"""Input checks shared by the launchers: every bad input is a ValueError that names the value and what
is allowed, raised before any kernel writes anything."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def check_tensor(name: str, t, ndim: int | None = None, dtypes=FLOAT_DTYPES, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} has dtype {t.dtype}; allowed: {allowed}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all tensors on one device)")


def check_shape(name: str, t: torch.Tensor, shape) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def check_same_dtype(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype} (same as the input)")


def check_out(name: str, out, shape, dtype, device) -> None:
    """An optional caller-given output buffer must match exactly and have a unit last stride."""
    check_tensor(name, out, ndim=len(shape), dtypes=None, device=device)
    check_shape(name, out, shape)
    if out.dtype != dtype:
        raise ValueError(f"{name} has dtype {out.dtype}, expected {dtype}")
    if len(shape) and out.stride(-1) != 1:
        raise ValueError(f"{name} must have a unit stride in its last dim, got strides {out.stride()}")


def rows2d(t: torch.Tensor, width: int) -> torch.Tensor:
    """t [.., width] as a [rows, width] view with a unit last stride (a copy only when no such view exists),
    the layout every row kernel here takes."""
    t2 = t.reshape(-1, width)
    if width > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def row_warps(block: int) -> int:
    """num_warps for a one-row-per-program kernel over `block` elements (as Liger-Kernel does)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4
