"""What a running job has done: counts from the files written and the units committed, the rate over
the last minute, the time left, how long nothing happened (the watchdog's clock).

The driver's loop feeds a :class:`ProgressTracker` each file's summary as it arrives (before the
table's committer sees it) and the number of units committed; :meth:`ProgressTracker.snapshot` gives a
typed :class:`~pipeline.offline.summary.Progress`, which the command line renders (a line every
``job.progress_interval_s``, a bar in a terminal) and the job's metrics export.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import replace

from ..records import ShardSummary
from .metrics import JobMetrics
from .summary import Progress

__all__ = ["RATE_WINDOW_S", "ProgressTracker"]

RATE_WINDOW_S = 60.0
"""The rate (and the time left) is measured over this many seconds."""


class ProgressTracker:
    """This run's counts (see the module docstring); not thread-safe: the driver's loop owns it."""

    def __init__(
        self,
        *,
        images_planned: int | None,
        units_planned: int,
        metrics: JobMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.images_planned = images_planned
        self.units_planned = units_planned
        self.metrics = metrics
        self.clock = clock
        self.started = self.last_change = clock()
        self.images = self.ok = self.files = self.bytes_written = self.units_committed = 0
        self.errors: Counter[str] = Counter()
        self._window: deque[tuple[float, int, float]] = deque()
        """(time, images, fraction done) samples of the last :data:`RATE_WINDOW_S` seconds."""

    def file(self, summary: ShardSummary) -> None:
        """A data file written (count each file once: a retried file reports again)."""
        self.images += summary.rows
        self.ok += summary.ok
        self.errors.update(summary.errors)
        self.files += 1
        size = summary.file.size if summary.file is not None else 0
        self.bytes_written += size
        self.last_change = self.clock()
        if self.metrics is not None:
            self.metrics.file(rows=summary.rows, errors=summary.errors, size=size)

    def committed(self, units: int) -> None:
        """``units`` of this run are committed now (a running total)."""
        if units > self.units_committed:
            if self.metrics is not None:
                self.metrics.units(units - self.units_committed)
            self.units_committed = units
            self.last_change = self.clock()

    def idle_s(self) -> float:
        """Seconds since a file was written or a unit committed (or the run started)."""
        return self.clock() - self.last_change

    def snapshot(self, *, done: bool = False) -> Progress:
        """The run now (see :class:`~pipeline.offline.summary.Progress`)."""
        now = self.clock()
        elapsed = now - self.started
        if self.metrics is not None:  # set on every snapshot: Ray drops a gauge that is not refreshed
            self.metrics.planned(images=self.images_planned or 0, units=self.units_planned)
        progress = Progress(
            images=self.images,
            images_planned=self.images_planned,
            ok=self.ok,
            errors=dict(sorted(self.errors.items())),
            files=self.files,
            bytes_written=self.bytes_written,
            units_committed=self.units_committed,
            units_planned=self.units_planned,
            elapsed_s=elapsed,
            images_per_s=0.0,
            eta_s=None,
            idle_s=now - self.last_change,
            done=done,
        )
        window = self._window
        window.append((now, self.images, progress.fraction))
        while len(window) > 1 and now - window[1][0] >= RATE_WINDOW_S:
            window.popleft()
        then, images_then, fraction_then = window[0] if now - window[0][0] > 0 else (self.started, 0, 0.0)
        span = now - then
        if span <= 0:
            return progress
        rate = (self.images - images_then) / span
        fraction_rate = (progress.fraction - fraction_then) / span
        eta = (1.0 - progress.fraction) / fraction_rate if fraction_rate > 0 else None
        return replace(progress, images_per_s=rate, eta_s=0.0 if done else eta)
