"""Timing helpers of every bench script: device sync, wall-clock of a call, CUDA-event and graph-replay
timings, and the copy bandwidth that every roofline is measured against."""
from __future__ import annotations

import statistics
import time

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(seconds, result) of fn(), the device synchronized before and after."""
    sync(device)
    t0 = time.perf_counter()
    r = fn()
    sync(device)
    return time.perf_counter() - t0, r


def events_us(fn, iters=50, warmup=3):
    """Microseconds per call of fn between CUDA events (launches included)."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def graph_us(fn, reps=10, iters=50, warmup=3):
    """Microseconds per call of fn, captured `reps` times in one CUDA graph and replayed `iters` times,
    so launch overhead is not counted (warm-up on a side stream first: Triton compiles, cuBLAS picks)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    return events_us(g.replay, iters, warmup=0) / reps


def measure_bandwidth(device, nbytes: int | None = None, iters: int = 10) -> dict:
    """Copy bandwidth: (read + write bytes) / time of a large same-device copy, median of `iters` after
    two untimed copies. 1 GiB on a GPU (many times the L2), 256 MiB on a CPU."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    nbytes = nbytes or (1 << 30 if gpu else 1 << 28)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    times = []
    for i in range(iters + 2):
        t, _ = timed(lambda: dst.copy_(src), device)
        if i >= 2:
            times.append(t)
    del src, dst
    if gpu:
        torch.cuda.empty_cache()
    t = statistics.median(times)
    return {"GBps": 2 * nbytes / t / 1e9, "bytes": nbytes, "iters": iters,
            "method": ("device-to-device copy (torch copy_), read+write bytes / time, median"
                       if gpu else "CPU memcpy (torch copy_ of host memory), read+write bytes / time, "
                       "median; a CPU roofline is only indicative")}
