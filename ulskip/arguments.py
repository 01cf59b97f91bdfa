"""The one rule for argument types across the Python API, with one message form.

Integers: Python and numpy integers (and 0-d integer tensors) are accepted; bools, floats and strings are
not. Numbers: any of those plus Python / numpy floats; never bools or strings. Flags: Python or numpy
bools only (a string such as "no" is refused rather than taken as true). Every refusal is a ValueError
"<name> must be <what is allowed>, got <value>".
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch


def _unwrap(v):
    """numpy scalars and 0-d tensors -> the Python number or bool they hold."""
    if (isinstance(v, torch.Tensor) and v.dim() == 0) or isinstance(v, np.generic):
        return v.item()
    return v


def is_int(v) -> bool:
    v = _unwrap(v)
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def integer(name: str, v, lo: int | None = None, hi: int | None = None, what: str | None = None) -> int:
    """v as a Python int within [lo, hi] (either bound optional)."""
    u = _unwrap(v)
    ok = isinstance(u, numbers.Integral) and not isinstance(u, bool)
    if ok:
        u = int(u)
        ok = (lo is None or u >= lo) and (hi is None or u <= hi)
    if not ok:
        if what is None:
            what = ("an integer" + (f" >= {lo}" if lo is not None and hi is None else "")
                    + (f" in [{lo}, {hi}]" if lo is not None and hi is not None else "")
                    + (f" <= {hi}" if hi is not None and lo is None else ""))
        raise ValueError(f"{name} must be {what}, got {v!r}")
    return u


def number(name: str, v, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           what: str | None = None) -> float:
    """v as a finite Python float within [lo, hi] ((lo, hi] when lo_open)."""
    u = _unwrap(v)
    ok = isinstance(u, numbers.Real) and not isinstance(u, bool)
    if ok:
        u = float(u)
        ok = math.isfinite(u) and (lo is None or (u > lo if lo_open else u >= lo)) and (hi is None or u <= hi)
    if not ok:
        if what is None:
            low = "" if lo is None else (f" > {lo:g}" if lo_open else f" >= {lo:g}")
            what = "a finite number" + low + ("" if hi is None else f" and <= {hi:g}")
        raise ValueError(f"{name} must be {what}, got {v!r}")
    return u


def flag(name: str, v) -> bool:
    u = _unwrap(v)
    if not isinstance(u, bool):
        raise ValueError(f"{name} must be True or False, got {v!r}")
    return u


def token_ids(name: str, v, what: str = "None, a token id or a list of token ids (integers >= 0)") -> list[int]:
    """None, one token id, or a list / tuple / set / 1-d array of them -> sorted distinct Python ints >= 0."""
    if v is None:
        return []
    if is_int(v):
        return [integer(name, v, 0, what=what)]
    if isinstance(v, (list, tuple, set, frozenset)) or (hasattr(v, "tolist") and getattr(v, "ndim", 0) == 1):
        return sorted({integer(name, e, 0, what=what) for e in list(v)})
    raise ValueError(f"{name} must be {what}, got {v!r}")
