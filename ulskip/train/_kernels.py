"""Import `ulskip.kernels.<name>` (the repo's kernels/ folder, mapped by setup.py).

In a source checkout that was not pip-installed, `ulskip.kernels` is not importable as such; then the
folder next to the package is registered under that name (never as a top-level `kernels`).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys


def load(name: str):
    try:
        return importlib.import_module(f"ulskip.kernels.{name}")
    except ModuleNotFoundError as e:
        if e.name not in ("ulskip.kernels", f"ulskip.kernels.{name}"):
            raise
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "kernels")
    init = os.path.join(folder, "__init__.py")
    if "ulskip.kernels" not in sys.modules and os.path.exists(init):
        spec = importlib.util.spec_from_file_location("ulskip.kernels", init,
                                                      submodule_search_locations=[folder])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["ulskip.kernels"] = mod
        spec.loader.exec_module(mod)
        import ulskip
        ulskip.kernels = mod
    return importlib.import_module(f"ulskip.kernels.{name}")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False
