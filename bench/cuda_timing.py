"""Timing helpers shared by the bench scripts (run as `python bench/<script>.py`, so importable)."""
import torch


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
