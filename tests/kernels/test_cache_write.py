"""Compiled ops of ulskip._C (csrc/) against their PyTorch reference (ulskip.kernels.cache_write.cache_write_ref).

The cache is poisoned with NaN first: rows the op writes must equal the reference bit for bit, every
other row must still be NaN.
"""
import importlib.util
import os

import pytest
import torch

from ulskip.kernels import cache_write as cw
from ulskip.kernels.cache_write import cache_write_ref

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# (B, Hq, Hkv, S, D, T): decode (T=1) and prefill (T>1), MHA and GQA, a full cache (T == S)
SHAPES = [
    (2, 2, 2, 16, 8, 1),
    (4, 32, 8, 64, 128, 1),
    (3, 8, 2, 32, 16, 5),
    (1, 4, 1, 8, 64, 8),
]


LAYOUTS = ["contiguous", "slot", "padded", "permuted", "strided"]


def make_slot(B, H, S, D, dtype, device, layout):
    """A NaN-poisoned cache slot [B, H, S, D] laid out as the engine (or a careless caller) might."""
    full = lambda *shape: torch.full(shape, float("nan"), dtype=dtype, device=device)  # noqa: E731
    if layout == "contiguous":
        return full(B, H, S, D), full(B, H, S, D)
    if layout == "slot":  # one kept layer's slot of a compact cache [K, B, H, S, D]
        return full(3, B, H, S, D)[1], full(3, B, H, S, D)[2]
    if layout == "padded":  # rows padded: last dim contiguous, other strides not multiples of D
        return full(B, H, S, D + 8)[..., :D], full(B, H, S, D + 3)[..., 1:D + 1]
    if layout == "permuted":  # stored [B, S, H, D]
        return full(B, S, H, D).transpose(1, 2), full(B, S, H, D).transpose(1, 2)
    if layout == "strided":  # last dim not contiguous
        return full(B, H, S, 2 * D)[..., ::2], full(B, H, S, 2 * D)[..., 1::2]
    raise ValueError(layout)


def make_kv(B, Hq, Hkv, T, D, dtype, device):
    """k, v as views into a fused QKV projection output [B, T, (Hq + 2 Hkv) D]."""
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, device=device).to(dtype)
    k = qkv[..., Hq * D:(Hq + Hkv) * D].view(B, T, Hkv, D)
    v = qkv[..., (Hq + Hkv) * D:].view(B, T, Hkv, D)
    return k, v


def make_positions(B, T, S, device, dtype=torch.int64, prefill_like=False):
    if prefill_like:  # consecutive positions from a per-sequence start
        start = torch.randint(0, S - T + 1, (B, 1))
        pos = start + torch.arange(T)
    else:  # distinct, scattered positions per sequence
        pos = torch.stack([torch.randperm(S)[:T] for _ in range(B)])
    return pos.to(device=device, dtype=dtype)


def check_against_ref(kc, vc, k, v, pos):
    kr, vr = kc.clone(), vc.clone()
    cache_write_ref(kr, vr, k, v, pos.long())
    cw.cache_write(kc, vc, k, v, pos)
    B, T = pos.shape
    written = torch.zeros(B, kc.shape[2], dtype=torch.bool, device=kc.device)
    written[torch.arange(B, device=kc.device).unsqueeze(1), pos.long()] = True
    for out, ref in ((kc, kr), (vc, vr)):
        rows = out.transpose(1, 2)[written]  # [n, H, D]
        assert not rows.isnan().any(), "a written row holds NaN"
        assert torch.equal(rows, ref.transpose(1, 2)[written])
        assert out.transpose(1, 2)[~written].isnan().all(), "a row outside positions was written"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_Hq{}_Hkv{}_S{}_D{}_T{}".format(*s))
def test_cache_write_matches_ref(shape, layout, dtype, device):
    torch.manual_seed(0)
    B, Hq, Hkv, S, D, T = shape
    kc, vc = make_slot(B, Hkv, S, D, dtype, device, layout)
    k, v = make_kv(B, Hq, Hkv, T, D, dtype, device)
    check_against_ref(kc, vc, k, v, make_positions(B, T, S, device, prefill_like=T > 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("pos_layout", ["contiguous", "transposed"])
def test_cache_write_positions_dtype_and_strides(pos_dtype, pos_layout, device):
    torch.manual_seed(1)
    B, Hq, Hkv, S, D, T = 3, 8, 2, 24, 32, 4
    kc, vc = make_slot(B, Hkv, S, D, torch.float16, device, "slot")
    k, v = make_kv(B, Hq, Hkv, T, D, torch.float16, device)
    pos = make_positions(B, T, S, device, pos_dtype)
    if pos_layout == "transposed":
        pos = pos.t().contiguous().t()
    check_against_ref(kc, vc, k, v, pos)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("src_dtype,cache_dtype", [(torch.float32, torch.float16), (torch.float32, torch.bfloat16),
                                                   (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)],
                         ids=str)
def test_cache_write_casts_like_to(src_dtype, cache_dtype, device):
    torch.manual_seed(2)
    B, Hq, Hkv, S, D, T = 2, 4, 2, 16, 64, 3
    kc, vc = make_slot(B, Hkv, S, D, cache_dtype, device, "slot")
    k, v = make_kv(B, Hq, Hkv, T, D, src_dtype, device)
    check_against_ref(kc, vc, k, v, make_positions(B, T, S, device))


@pytest.mark.parametrize("device", DEVICES)
def test_cache_write_empty_is_a_noop(device):
    kc, vc = make_slot(2, 2, 8, 4, torch.float32, device, "contiguous")
    k, v = make_kv(2, 2, 2, 0, 4, torch.float32, device)
    cw.cache_write(kc, vc, k, v, torch.zeros(2, 0, dtype=torch.long, device=device))
    assert kc.isnan().all() and vc.isnan().all()


# ----------------------------------------------------------------------------- bad input (CPU)
def _args(B=2, H=2, S=8, D=4, T=3, dtype=torch.float32):
    kc, vc = make_slot(B, H, S, D, dtype, "cpu", "contiguous")
    k, v = make_kv(B, H, H, T, D, dtype, "cpu")
    return kc, vc, k, v, make_positions(B, T, S, "cpu")


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.__setitem__(4, a[4].float()), r"positions has dtype torch\.float32; allowed: torch\.int64, torch\.int32"),
    (lambda a: a.__setitem__(4, a[4][:, None]), r"positions must be \[B, T\] \(2-d\), got shape \[2, 1, 3\]"),
    (lambda a: a.__setitem__(4, a[4][:1]), r"positions shape \[1, 3\] has batch 1 but the cache slot \[2, 2, 8, 4\]"),
    (lambda a: a.__setitem__(2, a[2][:, :, :1]), r"k must be \[B, T, Hkv, D\] = \[2, 3, 2, 4\].*got \[2, 3, 1, 4\]"),
    (lambda a: a.__setitem__(3, a[3][:, :2]), r"v must be \[B, T, Hkv, D\] = \[2, 3, 2, 4\].*got \[2, 2, 2, 4\]"),
    (lambda a: a.__setitem__(1, a[1][:, :, :4]), r"v_cache shape \[2, 2, 4, 4\] must equal k_cache shape \[2, 2, 8, 4\]"),
    (lambda a: a.__setitem__(0, a[0][0]), r"k_cache must be \[B, Hkv, S, D\] \(4-d\), got shape \[2, 8, 4\]"),
    (lambda a: a.__setitem__(1, a[1].half()), r"v_cache dtype torch\.float16 must equal k_cache dtype torch\.float32"),
    (lambda a: a.__setitem__(3, a[3].half()), r"v dtype torch\.float16 must equal k dtype torch\.float32"),
    (lambda a: (a.__setitem__(0, a[0].double()), a.__setitem__(1, a[1].double())), r"k_cache has dtype torch\.float64"),
    (lambda a: a.__setitem__(4, a[4].to("meta")), r"all tensors must be on one device"),
], ids=["pos_float", "pos_3d", "pos_batch", "k_heads", "v_tokens", "v_cache_len", "k_cache_3d", "cache_dtypes",
        "kv_dtypes", "cache_float64", "device"])
def test_cache_write_bad_input(mutate, match):
    args = list(_args())
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        cw.cache_write(*args)


@pytest.mark.parametrize("bad", [8, -1, 1000])
def test_cache_write_out_of_range_position_writes_nothing(bad):
    kc, vc, k, v, pos = _args(S=8)
    pos[1, 2] = bad  # the last row checked: rows before it are fine and must still not be written
    with pytest.raises(RuntimeError, match=rf"positions\[1, 2\] = {bad} is out of range for a cache of length "
                                           r"S = 8 \(allowed: 0 <= position < 8\)"):
        cw.cache_write(kc, vc, k, v, pos)
    assert kc.isnan().all() and vc.isnan().all()


def test_cache_write_meta_and_opcheck():
    # Meta kernel: shape checks only, so FakeTensor / torch.compile can trace the op.
    kc, vc, k, v, pos = (t.to("meta") for t in _args())
    cw.cache_write(kc, vc, k, v, pos)
    with pytest.raises(RuntimeError, match="k must be"):
        cw.cache_write(kc, vc, k[:, :, :1], v, pos)
    # Schema (the (a!)/(b!) mutation annotations) and fake-tensor registration agree with the kernel.
    kc, vc, k, v, pos = _args()
    torch.library.opcheck(torch.ops.ulskip.cache_write.default, (kc.zero_(), vc.zero_(), k, v, pos),
                          test_utils=("test_schema", "test_faketensor"))


def test_ext_reports_build():
    assert cw.is_available()
    if torch.version.cuda is None:
        assert not cw.has_cuda_ops()
    assert hasattr(torch.ops.ulskip, "cache_write")


def test_kernels_folder_is_not_a_top_level_module():
    # transformers imports a top-level `kernels` if it can find one (the Hugging Face package); ours
    # must only ever be ulskip.kernels.
    spec = importlib.util.find_spec("kernels")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert spec is None or not (spec.origin or "").startswith(os.path.join(root, "kernels"))
    if os.path.isdir(os.path.join(root, "kernels")):
        assert importlib.util.find_spec("ulskip.kernels") is not None


# ----------------------------------------------------------------------------- CUDA only
@pytest.mark.gpu
def test_cache_write_cuda_is_built():
    assert cw.has_cuda_ops(), "ulskip._C was built without CUDA: rebuild with nvcc (bench/gpu_build.sh)"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D,offset", [(128, 0), (128, 1), (6, 0), (72, 0)])  # 1: misaligned -> scalar path
def test_cache_write_cuda_alignment_paths(dtype, D, offset):
    torch.manual_seed(3)
    B, Hkv, S, T = 3, 4, 32, 5
    kc, vc = make_slot(B, Hkv, S, D, dtype, "cuda", "slot")
    buf = torch.randn(2 * B * T * Hkv * D + offset, device="cuda").to(dtype)[offset:]
    k, v = buf.view(2, B, T, Hkv, D).unbind(0)
    check_against_ref(kc, vc, k, v, make_positions(B, T, S, "cuda"))


@pytest.mark.gpu
def test_cache_write_cuda_skips_out_of_range_without_sync():
    # Documented CUDA behaviour: no host-side check, a row at an invalid position is skipped.
    B, Hkv, S, D, T = 2, 2, 8, 16, 2
    kc, vc = make_slot(B, Hkv, S, D, torch.float16, "cuda", "contiguous")
    k, v = make_kv(B, Hkv, Hkv, T, D, torch.float16, "cuda")
    pos = torch.tensor([[0, 1], [S, 3]], device="cuda")
    cw.cache_write(kc, vc, k, v, pos)
    torch.cuda.synchronize()
    assert torch.equal(kc[1, :, 3], k[1, 1]) and torch.equal(kc[0, :, 1], k[0, 1])
    assert kc[1, :, [0, 1, 2, 4, 5, 6, 7]].isnan().all()


@pytest.mark.gpu
def test_cache_write_cuda_graph_capture():
    torch.manual_seed(4)
    B, Hq, Hkv, S, D = 4, 8, 2, 64, 64
    kc, vc = make_slot(B, Hkv, S, D, torch.bfloat16, "cuda", "slot")
    k_in, v_in = make_kv(B, Hq, Hkv, 1, D, torch.bfloat16, "cuda")
    pos_in = torch.zeros(B, 1, dtype=torch.long, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up off the default stream, as graph capture wants
        cw.cache_write(kc, vc, k_in, v_in, pos_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cw.cache_write(kc, vc, k_in, v_in, pos_in)
    kc.fill_(float("nan"))
    vc.fill_(float("nan"))
    kr, vr = kc.clone(), vc.clone()
    for step in range(3):  # replay with new tokens at new positions: the graph reads the static inputs
        k, v = make_kv(B, Hq, Hkv, 1, D, torch.bfloat16, "cuda")
        pos = torch.randint(0, S, (B, 1), device="cuda")
        k_in.copy_(k)
        v_in.copy_(v)
        pos_in.copy_(pos)
        graph.replay()
        cache_write_ref(kr, vr, k, v, pos)
    torch.cuda.synchronize()
    torch.testing.assert_close(kc, kr, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, vr, rtol=0, atol=0, equal_nan=True)
