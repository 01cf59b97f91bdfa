"""What a training step reads back to the host. On a GPU every .item() / .tolist() / nonzero / bool(tensor)
drains the stream and makes the host wait; the step of a small model is bound by the host, so the per-step
code keeps such reads to the few that set shapes. On the CPU there is no sync to see: these tests count the
calls that would be one (a dispatch mode for the aten ops, a wrapper for Tensor.tolist), attributed to the
project's own frames. No timings are asserted."""
import contextlib
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import make_tokenizer, make_train_model, records
from ulskip.kernels.cross_entropy import LinearCrossEntropyFunction, fused_linear_cross_entropy
from ulskip.train import apply_uls
from ulskip.train.data import PackedULSDataset, PackingCollator, encode
from ulskip.train.patching import patch_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROJECT = tuple((os.path.join(ROOT, d) + os.sep).replace(os.sep, "/") for d in ("ulskip", "kernels"))
READS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique2", "aten.unique_dim",
         "aten.unique_consecutive", "aten.is_nonzero", "aten.equal"}


def _project_frame():
    """'file:line' of the innermost caller outside torch when that is the project's code; None when it is
    anything else (transformers' own reads are not the project's to remove)."""
    for f in reversed(traceback.extract_stack()[:-2]):
        path = f.filename.replace(os.sep, "/")
        if "/torch/" in path or path == __file__.replace(os.sep, "/") or "contextlib" in path:
            continue
        return f"{os.path.basename(path)}:{f.lineno}" if path.startswith(PROJECT) else None
    return None


class _Reads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sites = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in READS or (name == "aten.repeat_interleave" and not (kwargs or {}).get("output_size")):
            site = _project_frame()
            if site is not None:
                self.sites.append((name, site))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads(monkeypatch):
    """Yields the list of (what, project site) of every host read in the block."""
    mode = _Reads()
    orig = torch.Tensor.tolist

    def tolist(self):
        site = _project_frame()
        if site is not None:
            mode.sites.append(("tolist", site))
        return orig(self)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    with mode:
        yield mode.sites
    monkeypatch.setattr(torch.Tensor, "tolist", orig)


def _ce_case(seed=0, n=37, H=16, V=50):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g, requires_grad=True)
    W = torch.randn(V, H, generator=g, requires_grad=True)
    t = torch.randint(0, V, (n,), generator=g)
    t[torch.rand(n, generator=g) < 0.5] = -100
    return h, W, t


@pytest.mark.parametrize("num_items", [None, 23, "tensor"])
def test_fused_ce_reads_the_host_once(monkeypatch, num_items):
    h, W, t = _ce_case()
    items = torch.tensor(23) if num_items == "tensor" else num_items
    with host_reads(monkeypatch) as sites:
        loss = fused_linear_cross_entropy(h, W, t, num_items_in_batch=items, chunk_rows=8, use_triton=False)
    assert [s[0] for s in sites] == ["tolist"], sites
    loss.backward()


@pytest.mark.parametrize("num_items", [None, 23, "tensor"])
def test_fused_ce_same_rows_and_numbers_as_nonzero(num_items):
    """The kept rows (a stable sort instead of nonzero) and the denominator (read with the row count) are
    exactly what the nonzero / .item() version used: loss and gradients bitwise equal."""
    h, W, t = _ce_case(seed=3)
    items = torch.tensor(23) if num_items == "tensor" else num_items
    loss = fused_linear_cross_entropy(h, W, t, num_items_in_batch=items, chunk_rows=8, use_triton=False)
    gh, gw = torch.autograd.grad(loss, (h, W))
    keep = (t != -100).nonzero().squeeze(1)
    denom = float(keep.numel()) if num_items is None else 23.0
    ref = LinearCrossEntropyFunction.apply(h.index_select(0, keep), W, None, t.index_select(0, keep), 1.0 / denom,
                                           8, False, -100)
    rh, rw = torch.autograd.grad(ref, (h, W))
    assert torch.equal(loss, ref) and torch.equal(gh, rh) and torch.equal(gw, rw)


def test_fused_ce_edge_cases():
    h, W, t = _ce_case()
    with pytest.raises(ValueError, match="target holds 50, outside the vocabulary"):
        fused_linear_cross_entropy(h, W, torch.where(t == -100, t, torch.full_like(t, 50)), use_triton=False)
    with pytest.raises(ValueError, match="target holds -3, outside the vocabulary"):
        fused_linear_cross_entropy(h, W, torch.where(t == -100, t, torch.full_like(t, -3)), use_triton=False)
    # every row ignored, and no rows at all: a zero that keeps the graph
    for hh, tt in ((h, torch.full_like(t, -100)), (h[:0], t[:0])):
        loss = fused_linear_cross_entropy(hh, W, tt, use_triton=False)
        assert loss.item() == 0.0 and loss.requires_grad


def test_packed_uls_training_step_host_reads(monkeypatch):
    """A packed ULS forward + backward through the patched model (fused loss, num_items_in_batch a tensor
    as the Trainer passes it) reads the host once in the project's code: the fused loss's row count."""
    tok = make_tokenizer()
    exs = [encode(tok, r, 256, f"r{i}") for i, r in enumerate(records()[:7])]
    batch = PackingCollator(tok.pad_token_id)(PackedULSDataset(exs, block_size=60).rows)
    model = make_train_model("llama", num_layers=4, vocab_size=len(tok)).float().train()
    apply_uls(model, target_speedup=2)
    patch_model(model)
    items = batch["labels"][:, 1:].ne(-100).sum()
    with host_reads(monkeypatch) as sites:
        loss = model(**batch, num_items_in_batch=items).loss
        loss.backward()
    assert [s[0] for s in sites] == ["tolist"], sites
