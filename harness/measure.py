"""Latency and memory measurement: CUDA events on GPU, wall clock on CPU (and the records say which)."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class _Span:
    def __init__(self, timer: Timer):
        self.timer = timer
        self._seconds: float | None = None
        self.start = self.end = None

    @property
    def seconds(self) -> float:
        if self._seconds is None:
            torch.cuda.synchronize(self.timer.device)
            self._seconds = self.start.elapsed_time(self.end) / 1000.0
        return self._seconds


class Timer:
    """``with timer.span() as t: ...`` then ``t.seconds``. CUDA events on CUDA (no host sync inside the span)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    @property
    def kind(self) -> str:
        return "cuda_events" if self.cuda else "wall_clock"

    @contextmanager
    def span(self):
        s = _Span(self)
        if self.cuda:
            s.start = torch.cuda.Event(enable_timing=True)
            s.end = torch.cuda.Event(enable_timing=True)
            s.start.record()
            yield s
            s.end.record()
        else:
            t0 = time.perf_counter()
            yield s
            s._seconds = time.perf_counter() - t0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def timing_kind(device) -> str:
    return Timer(device).kind


class PeakMemory:
    """Peak CUDA memory allocated above what was allocated when the block started (the weights); None on CPU."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        return False


def device_name(device) -> str:
    d = torch.device(device)
    if d.type == "cuda":
        return torch.cuda.get_device_name(d)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
