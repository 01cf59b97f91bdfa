"""Copies between the host and the GPU that do not make the host wait for the GPU.

A host that runs ahead of the GPU (continuous batching reads one step's tokens while the next step runs;
speculative decoding reads "all finished" one round late) loses that lead at every copy that waits for the
work queued before it: a copy from pageable memory, or a device-to-host read. Through pinned memory both
are queued like kernels, and an event says when a device-to-host copy has landed.
"""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, queued behind the GPU's work instead of waiting for it."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """A device tensor on its way to the host: values() waits for this copy only, not for the work queued
    after it (on a CPU the tensor itself)."""

    def __init__(self, t: torch.Tensor):
        if t.is_cuda:
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(t.device))
        else:
            self.host, self.event = t, None

    def values(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()
