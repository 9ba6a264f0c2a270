"""Timing and peak-memory helpers that ``tmd bench`` and the GPU check share."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work: a CUDA timing without it measures the launch, not the kernels."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def time_round_robin(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds per callable; every round runs each callable once, in order."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(seconds(fn, device))
    return {name: statistics.median(values) for name, values in samples.items()}


def median_seconds(fn: Callable[[], Any], repeats: int, device: torch.device, warmup: int = 1) -> float:
    return time_round_robin({"fn": fn}, repeats, warmup, device)["fn"]


def peak_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """CUDA memory a call allocates above what was in use before it; None on CPU.

    On CPU neither glibc's heap (it keeps freed tensor buffers and reuses them, so peak RSS rises only
    past earlier rows' peaks) nor returning large buffers with mmap (the kernel's peak RSS then misses
    them) gave a per-call peak when tried, so CPU rows say n/a rather than print a misleading number.
    """
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """The CUDA peak since ``reset_peak``; None on CPU (see ``peak_mib``)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
