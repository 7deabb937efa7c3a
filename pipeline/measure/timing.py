"""Timing a call: on a device (CUDA events on a GPU, ``perf_counter`` on a CPU), warm-up calls first, then
the median of timed repeats; latency percentiles of samples."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["Timing", "percentiles_ms", "synchronize", "time_callable", "time_wall"]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on a CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call: median (the figure reported), min and max of the timed repeats."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int
    method: str
    """``cuda-events`` or ``perf_counter``."""

    @classmethod
    def of(cls, seconds: Sequence[float], method: str) -> Timing:
        """The timing of these per-call ``seconds``."""
        return cls(statistics.median(seconds), min(seconds), max(seconds), len(seconds), method)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_callable(
    fn: Callable[[], Any], device: torch.device, *, warmup: int = 2, repeats: int = 5
) -> Timing:
    """Time ``fn()`` on ``device``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    On a GPU each call is bracketed by CUDA events recorded on the current stream (the device
    time of everything ``fn`` enqueued, including on streams it waited for) and the device is
    synchronised after each; on a CPU, ``perf_counter`` around the call.
    """
    import torch

    if device.type != "cuda":
        return time_wall(fn, device, warmup=warmup, repeats=repeats)
    for _ in range(max(0, warmup)):
        fn()
    synchronize(device)
    times: list[float] = []
    for _ in range(max(1, repeats)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3)
    return Timing.of(times, "cuda-events")


def time_wall(fn: Callable[[], Any], device: torch.device, *, warmup: int = 1, repeats: int = 3) -> Timing:
    """Like :func:`time_callable` but wall-clock (``perf_counter`` + synchronize) on every device:
    for host→host paths whose time is not all on the current stream."""
    for _ in range(max(0, warmup)):
        fn()
    synchronize(device)
    times = []
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return Timing.of(times, "perf_counter")


def percentiles_ms(samples_s: Sequence[float]) -> dict[str, float]:
    """p50, p99 and the mean of ``samples_s`` (seconds), in milliseconds (zeros when there are none)."""
    ms = sorted(s * 1000 for s in samples_s)
    if not ms:
        return {"p50": 0.0, "p99": 0.0, "mean": 0.0}

    def pct(q: float) -> float:
        return ms[min(len(ms) - 1, max(0, round(q * (len(ms) - 1))))]

    return {"p50": pct(0.50), "p99": pct(0.99), "mean": statistics.fmean(ms)}
