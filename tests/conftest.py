"""Shared pytest setup: the `gpu` marker, Triton on the CPU interpreter when there is no GPU, the kernel
tests skipped where triton is not installed, and `helpers` importable by the test modules.

pytest runs with --import-mode=importlib (pyproject.toml), so it puts no test folder on sys.path: with
tests/ there, tests/kernels and tests/datasets would be found as top-level namespace packages `kernels`
and `datasets`, which transformers probes for (it would take them for the Hugging Face packages)."""
import importlib.util
import os
import sys

import pytest
import torch

# `python -m pytest` from the repo root puts the root on sys.path, and from there transformers' probe
# for the Hugging Face `kernels` package finds our kernels/ folder and imports it as a top-level
# module. The editable install serves `ulskip` (and ulskip.kernels) without the root, so drop it.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) not in (ROOT, os.path.join(ROOT, "tests"))]

# Must happen before any module with @triton.jit kernels is imported: triton reads the variable when a
# kernel is decorated. conftest.py is imported before the test modules, so this is early enough.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

HAS_TRITON = importlib.util.find_spec("triton") is not None

# after TRITON_INTERPRET: helpers imports kernel modules
_spec = importlib.util.spec_from_file_location("helpers", os.path.join(ROOT, "tests", "helpers.py"))
sys.modules["helpers"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sys.modules["helpers"])


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_triton = pytest.mark.skip(reason="needs triton (the kernels run in its interpreter on the CPU)")
    kernels_dir = os.path.join(ROOT, "tests", "kernels") + os.sep
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if not HAS_TRITON and str(item.fspath).startswith(kernels_dir):
            item.add_marker(no_triton)
