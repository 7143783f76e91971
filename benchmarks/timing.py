"""Timing shared by the benchmarks: wall time with the GPU synchronised around the call."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """``fn()``'s wall seconds, the CPU seconds of the calling (GPU-driving) thread, and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.thread_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.thread_time() - cpu, out
