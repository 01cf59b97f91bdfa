"""Measurements: `ulskip bench` (sweep.py, models.py, report.py) and the GPU scripts run as modules:

    python -m ulskip.bench.kernels          kernels at Llama-7B decode shapes, % of copy bandwidth
    python -m ulskip.bench.profile_decode   where one decode step's time goes
    python -m ulskip.bench.gemv_probe       Triton GEMV configs against cuBLAS
    python -m ulskip.bench.train            fine-tuning tokens/s with and without the fused kernels

timing.py is the one place for timing and copy bandwidth. Results live in the top-level bench/ folder.
"""
