"""Following a running dataset: the file summaries as they arrive, and once a second between them the
progress (the job's callback) and the watchdog.

The dataset is read on a thread of its own, so that the driver's loop still ticks while nothing
arrives (a stalled run must be seen, reported and stopped). A run that stops early ends the
dataset's execution before Ray may be shut down.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..records import ShardSummary, rows_of_batch
from ..table import TableRun
from .progress import ProgressTracker
from .ray_runtime import quiet_logger
from .summary import Progress
from .watchdog import Watchdog

logger = logging.getLogger(__name__)

__all__ = ["TICK_S", "follow"]

TICK_S = 1.0
"""How often the driver's loop reports progress and checks the watchdog."""
STOP_WAIT_S = 10.0
"""How long a run that stops early waits for the dataset's execution to end."""
PROGRESS_NOTICE_LOGGER = "ray.data._internal.progress"
"""Ray Data's logger of the notice "Progress bars disabled" (a WARNING): the job disables them on
purpose, its own progress replaces them."""

_END = object()


def follow(
    ds: Any,
    *,
    tracker: ProgressTracker,
    run: TableRun,
    watchdog: Watchdog,
    progress: Callable[[Progress], None] | None,
) -> Iterator[ShardSummary]:
    """The file summaries of ``ds`` as they arrive; between them, once a second, the progress and the
    watchdog (the dataset is read on a thread, so that a stalled one still lets the loop tick)."""
    results: queue.Queue[Any] = queue.Queue(maxsize=4)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=TICK_S)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            # No prefetch: Ray Data would hold each summary back until the next one arrives (the last
            # file before a stall would be neither counted nor committed).
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
                if not put(batch):
                    return  # the driver stopped: closing the iterator ends the execution
            put(_END)
        except BaseException as exc:
            put(exc)

    reader = threading.Thread(target=read, name="job-results", daemon=True)
    next_tick = time.monotonic() + TICK_S
    with quiet_logger(PROGRESS_NOTICE_LOGGER):
        reader.start()
        try:
            while True:
                try:
                    item = results.get(timeout=max(0.0, next_tick - time.monotonic()))
                except queue.Empty:
                    item = None
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                if item is not None:
                    for row in rows_of_batch(item):
                        yield ShardSummary.from_row(row)
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + TICK_S
                    tracker.committed(len(run.committed))
                    if progress is not None:
                        progress(tracker.snapshot())
                    watchdog.check(tracker.idle_s())
        finally:
            stop.set()
            if reader.is_alive():  # the run stops early: end the execution before Ray may be shut down
                _stop_execution(ds)
                reader.join(timeout=STOP_WAIT_S)


def _stop_execution(ds: Any) -> None:
    """Stop ``ds``'s running execution from another thread than the one reading it. Ray Data has no
    public call for it: its executor (``Dataset._current_executor``) is shut down as Ray Data itself
    does when a dataset is deleted; where that moved, the execution ends with Ray."""
    executor = getattr(ds, "_current_executor", None)
    if executor is None:
        return
    try:
        executor.shutdown(force=True)
    except Exception as exc:
        logger.debug("could not stop the dataset's execution: %s", exc)
