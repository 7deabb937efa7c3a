"""The replica's schedulers, plain asyncio (no Ray, no HTTP): unit-testable on one event loop.

- :class:`Admission`: requests one replica works on and holds waiting; past both, refused at once.
- :class:`PixelBudget`: decoded pixels in flight, granted first come first served.
- :class:`Inflow` and :func:`forming_batch_size`: images on their way to a batch, so that
  ``@serve.batch`` closes a batch as soon as no other image can join it;
- :class:`DeviceQueue`: the device's forward passes, one at a time on one thread; the groups
  ``@serve.batch`` cut that wait while a pass runs are merged into the next one, and offline work
  runs only when no online image waits;

Two batchers, measured (docs/benchmarks.md): the device queue alone, forming the batches with the
same window, made smaller batches (3.4 against 4.4 images per pass at concurrency 32 on the tiny
model) and cost more CPU per request than ``@serve.batch`` in front of it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from pipeline.model.errors import ErrorCode, RequestError

T = TypeVar("T")


class Admission:
    """Requests one replica works on (at most ``ongoing``) and holds waiting for a slot (at most
    ``queued``; None: no limit). A request past both is refused with 503 ``overloaded`` at once.
    Single event loop only."""

    def __init__(self, ongoing: int, queued: int | None) -> None:
        self.ongoing = ongoing
        self.queued = queued
        self._slots = asyncio.Semaphore(ongoing)
        self.inside = 0
        """Requests admitted (working or waiting)."""
        self.refused = 0

    @property
    def full(self) -> bool:
        """Whether a request arriving now would be refused."""
        return self.queued is not None and self.inside >= self.ongoing + self.queued

    def check(self) -> None:
        """Refuse (503 ``overloaded``) when full; counts the refusal."""
        if self.full:
            self.refused += 1
            raise RequestError(
                f"Server overloaded ({self.ongoing} requests in progress and {self.queued} waiting on this "
                "replica); retry later",
                code=ErrorCode.OVERLOADED,
            )

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self.check()
        self.inside += 1
        try:
            async with self._slots:
                yield
        finally:
            self.inside -= 1


class PixelBudget:
    """A budget of decoded pixels in flight, granted first come first served (a large image is not
    overtaken forever by small ones). ``acquire(n)`` waits until ``n`` more pixels fit (an image
    larger than the whole budget runs alone); ``release(n)`` gives them back. Single event loop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.waits = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def _fits(self, cost: int) -> bool:
        return self.used == 0 or self.used + cost <= self.limit

    def _grant(self, cost: int) -> None:
        self.used += cost
        self.peak = max(self.peak, self.used)

    async def acquire(self, cost: int) -> None:
        if not self._waiters and self._fits(cost):
            self._grant(cost)
            return
        self.waits += 1
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (cost, waiter)
        self._waiters.append(entry)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(cost)  # granted, but the caller went away before using it
            else:
                with contextlib.suppress(ValueError):  # _wake may have dropped it already
                    self._waiters.remove(entry)
                self._wake()
            raise

    def release(self, cost: int) -> None:
        self.used -= cost
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            cost, waiter = self._waiters[0]
            if waiter.done():
                self._waiters.popleft()
                continue
            if not self._fits(cost):
                return
            self._waiters.popleft()
            self._grant(cost)
            waiter.set_result(None)


class Inflow:
    """Images of one replica on their way to a batch (waiting for the decode budget or decoding),
    and the largest batch: what a forming batch may still wait for."""

    def __init__(self, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size
        self.decoding = 0


def forming_batch_size(items: list[tuple[Any, Inflow]]) -> int:
    """``@serve.batch``'s size of a forming batch: its images, or the largest batch once no other
    image of the replica is on its way, so that the batch closes then instead of waiting out
    ``batch_wait_timeout_s`` for images that are not coming."""
    inflow = items[0][1]
    return len(items) if inflow.decoding else max(len(items), inflow.max_batch_size)


class DeviceQueue:
    """The replica's device: forward passes run on one thread, one at a time, first come first served.

    Online images arrive in the groups that ``@serve.batch`` cut (:meth:`encode`); groups that wait
    while a pass runs are merged, whole and up to ``max_batch_size`` images, into the next pass, so a
    busy device runs full batches however short the batching window was. :meth:`call` runs any
    other device work (``encode_pixels``) as one job of its own, in the same order. ``observe``
    gets (images, seconds each image waited for its pass, seconds the pass took) of every online
    pass, on the event loop. :meth:`offline` jobs (chunks of the offline job's files) run only
    when nothing else waits: online first. One event loop only.
    """

    def __init__(
        self,
        forward: Callable[[Any], tuple[Any, ...]],
        max_batch_size: int,
        observe: Callable[[int, list[float], float], None] | None = None,
        *,
        size: Callable[[Any], int] | None = None,
        collate: Callable[[list[Any]], Any] = np.stack,
    ) -> None:
        self.forward = forward
        self.max_batch_size = max_batch_size
        """Largest pass, in ``size`` units (images; anyres: tiles). A larger group runs alone."""
        self.observe = observe
        self.size = size or (lambda _: 1)
        self.collate = collate
        """The images of a pass → ``forward``'s argument (default: stacked into one array)."""
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="device")
        self._queue: collections.deque[_DeviceWork] = collections.deque()
        self._offline: collections.deque[_DeviceWork] = collections.deque()
        self._busy = False
        self.offline_passes = 0
        """Offline jobs run (:meth:`offline`)."""
        self.offline_max_s = 0.0
        """The longest offline job (what an online request may wait for)."""

    @property
    def waiting(self) -> int:
        """Online images waiting for a pass."""
        return sum(len(w.images) for w in self._queue if w.images is not None)

    async def encode(self, images: list[Any]) -> list[tuple[Any, ...]]:
        """Images (uint8 ``(3, H, W)``; anyres: ``(tiles, grid)``) → per image, its row of each array
        ``forward`` returns."""
        return await self._submit(_DeviceWork(images=images, queued=time.perf_counter()))  # type: ignore[no-any-return]

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the device thread, as one job in the queue."""
        return await self._submit(_DeviceWork(job=lambda: fn(*args, **kwargs)))  # type: ignore[no-any-return]

    async def offline(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the device thread at low priority: it starts only when no other work waits
        (online images, :meth:`call` jobs), so online work waits at most for one such job."""
        return await self._submit(_DeviceWork(job=fn), self._offline)  # type: ignore[no-any-return]

    async def _submit(self, work: _DeviceWork, lane: collections.deque[_DeviceWork] | None = None) -> Any:
        loop = asyncio.get_running_loop()
        work.future = loop.create_future()
        (self._queue if lane is None else lane).append(work)
        self._next(loop)
        return await work.future

    def _next(self, loop: asyncio.AbstractEventLoop) -> None:
        for lane in (self._queue, self._offline):
            while lane and lane[0].future.done():  # cancelled while waiting
                lane.popleft()
        if self._busy or not (self._queue or self._offline):
            return
        if not self._queue:  # nothing online waits: one offline job
            first = self._offline.popleft()
            self.offline_passes += 1
            self._busy = True
            running = self._thread.submit(self._timed_offline, first.job)  # type: ignore[arg-type]
            running.add_done_callback(
                lambda done: loop.call_soon_threadsafe(self._finished, loop, [first], done)
            )
            return
        first = self._queue.popleft()
        group = [first]
        if first.images is None:
            job = first.job
        else:
            size = sum(map(self.size, first.images))
            while self._queue and self._queue[0].images is not None:
                nxt = self._queue[0]
                if nxt.future.done():
                    self._queue.popleft()
                    continue
                more = sum(map(self.size, nxt.images))
                if size + more > self.max_batch_size:
                    break
                group.append(self._queue.popleft())
                size += more
            pixels = [image for work in group for image in work.images]  # type: ignore[union-attr]
            job = functools.partial(self._timed_forward, pixels)
        self._busy = True
        running = self._thread.submit(job)  # type: ignore[arg-type]
        running.add_done_callback(lambda done: loop.call_soon_threadsafe(self._finished, loop, group, done))

    def _timed_offline(self, job: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        try:
            return job()
        finally:
            self.offline_max_s = max(self.offline_max_s, time.perf_counter() - started)

    def _timed_forward(self, pixels: list[Any]) -> tuple[float, float, tuple[Any, ...]]:
        started = time.perf_counter()
        out = self.forward(self.collate(pixels))
        return started, time.perf_counter(), out

    def _finished(self, loop: asyncio.AbstractEventLoop, group: list[_DeviceWork], done: Future[Any]) -> None:
        self._busy = False
        try:
            try:
                result = done.result()
            except BaseException as exc:  # the pass failed: every caller in it gets the error
                for work in group:
                    if not work.future.done():
                        work.future.set_exception(exc)
                return
            if group[0].images is None:
                if not group[0].future.done():
                    group[0].future.set_result(result)
                return
            started, ended, arrays = result
            offset = 0
            for work in group:
                n = len(work.images)  # type: ignore[arg-type]
                if not work.future.done():
                    work.future.set_result([tuple(a[i] for a in arrays) for i in range(offset, offset + n)])
                offset += n
            if self.observe is not None:
                waits = [started - work.queued for work in group for _ in work.images]  # type: ignore[union-attr]
                self.observe(offset, waits, ended - started)
        finally:
            self._next(loop)


@dataclass
class _DeviceWork:
    """One entry of a :class:`DeviceQueue`: online images (mergeable) or an opaque job."""

    images: list[np.ndarray] | None = None
    job: Callable[[], Any] | None = None
    queued: float = 0.0
    future: asyncio.Future[Any] = dataclasses.field(init=False)
