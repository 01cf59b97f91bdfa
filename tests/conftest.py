"""Shared pytest setup: the `gpu` marker, and Triton on the CPU interpreter when there is no GPU."""
import importlib.util
import os
import sys

import pytest
import torch

# `python -m pytest` from the repo root puts the root on sys.path, and from there transformers' probe
# for the Hugging Face `kernels` package finds our kernels/ folder and imports it as a top-level
# module. The editable install serves `ulskip` (and ulskip.kernels) without the root, so drop it.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_saved = list(sys.path)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]
if importlib.util.find_spec("ulskip") is None:  # not installed: keep the root so ulskip imports
    sys.path[:] = _saved

# Must happen before any module with @triton.jit kernels is imported: triton reads the variable when a
# kernel is decorated. conftest.py is imported before the test modules, so this is early enough.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
