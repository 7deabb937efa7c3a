"""The Ray Serve application: one deployment whose replicas serve the HTTP API and encode.

``FeaturesEncoder`` (one deployment, a FastAPI ingress): each replica holds one
:class:`pipeline.encoder.FeatureEncoder` (CLIP vision tower + projector, one GPU when the cluster
has GPUs) and answers HTTP itself, so a request goes proxy → replica and its features are copied
once. Inside a replica (:class:`FeaturesEncoderImpl`):

1. admission (:class:`Admission`): ``serve.max_ongoing_requests`` requests are worked on at once
   (at least ``max_batch_size``), ``serve.max_queued_requests`` more wait for a slot before their
   body is read; beyond that a request is answered 503 ``overloaded`` (our JSON, ``Retry-After``).
   Ray Serve hands a replica twice what it admits, so that these answers are ours and Serve's own
   queue at the proxy (plain-text 503) only fills while replicas are missing;
2. the body is read with a size limit, the API key and the request timeout are checked;
3. decode (``encode_pre``: the decode guard + preprocessing) in the replica's thread pool
   (``serve.decode_threads``), behind a budget of decoded pixels in flight (:class:`PixelBudget`,
   ``serve.max_decode_pixels``): an image waits until its declared pixels fit, so a burst of huge
   images cannot exhaust memory, and the allocator's free memory is handed back to the system
   after such bursts (:func:`release_free_memory`);
4. ``@serve.batch`` groups the decoded images of concurrent requests, waiting up to
   ``serve.batch_wait_timeout_s`` only while other images are still being decoded; the groups go
   to the replica's :class:`DeviceQueue`, whose one device thread runs the forward passes
   (``encode_core`` + ``encode_post``) one at a time and merges the groups that wait while a pass
   runs into the next one. :meth:`FeaturesEncoderImpl.encode_pixels` (uint8 pixel batches through
   a deployment handle) is the non-HTTP entry point into the same queue.

The same replicas encode the offline job's shards when it runs with ``--serve-app`` (one GPU pool for
both front doors): :meth:`FeaturesEncoderImpl.describe_pool` tells the job the encoder fingerprint,
:meth:`FeaturesEncoderImpl.encode_shard` takes a typed :class:`~pipeline.records.DecodedShard`, runs
its device work in chunks of ``serve.offline_chunk_size`` on the device queue's low-priority lane
(a chunk starts only when no online batch waits: online first), commits its Parquet file with
:class:`pipeline.shards.ShardWriter` and returns the small summary. LLaVA-NeXT (anyres) images are
carried as their tiles and batched by tiles (``encode_tiles``: the offline job's features).

A request in progress on a replica that dies cannot be answered by us: Ray Serve's proxy answers
it (plain-text 500); a request that finds no replica running waits in the proxy up to its
``http_options.request_timeout_s`` (:func:`proxy_request_timeout_s`).

Autoscaled between ``serve.min_replicas`` and ``serve.max_replicas``.

``build_app(args)`` is the application builder named by ``configs/serve.yaml``
(``import_path: deployments.app:build_app``), so ``serve run configs/serve.yaml`` / ``serve
deploy`` and ``llava-features serve`` run the same thing. Its ``args``:

``config``
    Path of one of our YAML configs (``configs/*.yaml``); optional.
``model``
    A checkpoint directory (or a bare CLIP vision model directory, or a model id in the local HF
    cache), like ``--model``; or a mapping of ``model:`` section overrides.
``decode`` / ``encoder`` / ``serve``
    Section overrides on top of ``config`` (e.g. ``serve: {max_batch_size: 16}``). (``job`` is
    accepted too, for configs shared with the offline job; the endpoint does not read it.)
``make_tiny_if_missing``
    When true and ``model`` is a path that does not exist, write a tiny random-weight LLaVA
    checkpoint there first (``pipeline.model.tiny``). For demos and fresh clones only: its
    features are meaningless.
``ray_actor_options``
    ``{"encoder": {...}}`` merged over the replicas' defaults (1 CPU and
    ``serve.num_gpus_per_replica`` GPUs). There is no separate ingress deployment, so an
    ``ingress`` key is an error that says so.

Relative paths are resolved against the working directory of the process that builds the app
(the directory ``serve run`` / ``llava-features serve`` was started from).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pipeline.config import Config, config_to_dict, load_config
from pipeline.constants import SERVE_ENCODER_DEPLOYMENT
from pipeline.model.errors import ConfigError, DecodeError, ErrorCode, LlavaFeaturesError, RequestError

from . import http
from .listen import announce

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve.deployment import Application

    from pipeline.encoder import EncodedBatch
    from pipeline.images.preprocess import PreparedImage
    from pipeline.records import DecodedShard, PoolInfo, ShardSummary, ShardTarget
    from pipeline.shards import ShardWriter

logger = logging.getLogger(__name__)

T = TypeVar("T")

APP_NAME = "llava-features"
"""Application name used by ``llava-features serve`` and ``configs/serve.yaml``."""
ENCODER_DEPLOYMENT = SERVE_ENCODER_DEPLOYMENT
"""The one deployment: its replicas serve HTTP and encode (online requests and offline shards)."""
API_KEY_ENV = "LLAVA_FEATURES_API_KEY"
SECTION_ARGS = ("decode", "encoder", "job", "serve")
"""``build_app`` args that override a config section."""
BUILD_ARGS = ("config", "model", *SECTION_ARGS, "make_tiny_if_missing", "ray_actor_options")
ACTOR_OPTION_KEYS = ("encoder",)
"""Keys of ``build_app``'s ``ray_actor_options``: one per deployment."""
DEFAULT_ENCODER_CPUS = 1.0
MIN_SERVE_ONGOING = 64
"""Fewest requests Ray Serve hands a replica at once (those past our own admission limit are
answered 503 by the replica, in our JSON shape, instead of waiting in the proxy)."""
MIN_DECODE_THREADS = 2
"""Fewest decode threads per replica when ``serve.decode_threads`` is unset (more when Ray gives the
replica more CPUs)."""
MERGED_BATCHES = 8
"""Batches ``@serve.batch`` may hand over while the device is busy (the device queue merges them)."""
PROXY_TIMEOUT_MARGIN_S = 5.0
"""Seconds past ``serve.request_timeout_s`` after which Serve's proxy gives up on a request itself
(``http_options.request_timeout_s``, a plain-text 408): our own 504 comes first; the proxy's limit
bounds the wait of a request that finds no replica running (nobody of ours to answer it)."""
TRIM_AFTER_PIXELS = 16_000_000
"""Decoded pixels after which an idle replica hands its allocator's free memory back (malloc_trim)."""

OFFLINE_WRITE_THREADS = 2
"""Threads per replica writing offline shards' Parquet files (off the event loop and the device)."""
KEPT_WRITERS = 4
"""Offline jobs' shard writers a replica keeps (one per job target; the oldest are dropped)."""

_LATENCY_MS_BOUNDARIES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000]
_BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
_ENCODING_ROUTES = frozenset({"/v1/features", "/v1/features:batch", "/v1/embeddings", "/healthz"})
"""Routes that decode and encode images: they go through admission (the others only read state)."""


@dataclass
class EncodeResult:
    """What encoding one image gives (plain data: it may cross a deployment handle)."""

    ok: bool
    image_id: str | None
    fingerprint: str
    features: np.ndarray | None = None
    """(tokens, dim) in ``dtype`` (bfloat16 as its uint16 bit pattern); anyres: the image's own shape
    (``tiles`` [1 + tiles, tokens, dim], ``packed`` [tokens, dim]); None for ``want="pooled"``."""
    dtype: str = "float32"
    """The encoder's returned dtype of ``features`` (``encoder.output_dtype``)."""
    pooled: np.ndarray | None = None
    """(dim,) float32 mean over tokens; None for ``want="features"``."""
    width: int | None = None
    height: int | None = None
    error_code: str | None = None
    error_message: str | None = None

    def raise_for_error(self) -> None:
        if not self.ok:
            raise LlavaFeaturesError(
                self.error_message or "error", code=ErrorCode(self.error_code or "internal")
            )

    def response_array(self, pooled: bool) -> np.ndarray:
        """What a response carries: the pooled float32 vector, or the features (bfloat16 widened to float32)."""
        if pooled:
            assert self.pooled is not None
            return self.pooled
        assert self.features is not None
        return http.response_array(self.features, self.dtype)

    def item(self, pooled: bool) -> dict[str, Any]:
        """The per-item JSON of ``/v1/features:batch``."""
        if not self.ok:
            return {
                "ok": False,
                "image_id": self.image_id,
                "error_code": self.error_code,
                "error_message": self.error_message,
            }
        return {
            "ok": True,
            "image_id": self.image_id,
            "width": self.width,
            "height": self.height,
            **http.array_payload(self.response_array(pooled)),
        }


def model_id(config: Config) -> str:
    """Public name of the served model: the checkpoint's (or tower's) folder name."""
    source = config.model.checkpoint or config.model.vision_tower
    return Path(source.rstrip("/")).name if source else "llava-features"


def redacted_config(config: Config) -> dict[str, Any]:
    """``config_to_dict`` with the API key masked."""
    out = config_to_dict(config)
    if out.get("serve", {}).get("api_key"):
        out["serve"]["api_key"] = "***"
    return out


def decode_budget(config: Config) -> int:
    """``serve.max_decode_pixels``, or ``decode.max_image_pixels`` when unset; never below the latter
    (an image the decode guard accepts must fit the budget), checked with an error naming both keys."""
    budget = config.serve.max_decode_pixels
    if budget is None:
        return config.decode.max_image_pixels
    if budget < config.decode.max_image_pixels:
        raise ConfigError(
            f"serve.max_decode_pixels ({budget}) must be at least decode.max_image_pixels "
            f"({config.decode.max_image_pixels}): an image the decode guard accepts must fit the budget"
        )
    return budget


def _histogram(name: str, description: str, boundaries: list[float], tag_keys: tuple[str, ...] = ()) -> Any:
    from ray.serve.metrics import Histogram

    return Histogram(name, description=description, boundaries=boundaries, tag_keys=tag_keys)


def _counter(name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
    from ray.serve.metrics import Counter as RayCounter

    return RayCounter(name, description=description, tag_keys=tag_keys)


# -- admission, decode memory, the allocator ------------------------------------------------------


class Admission:
    """Requests one replica works on (at most ``ongoing``) and holds waiting for a slot (at most
    ``queued``; None: no limit). A request past both is refused with 503 ``overloaded`` at once,
    before its body is read. Single event loop only."""

    def __init__(self, ongoing: int, queued: int | None) -> None:
        self.ongoing = ongoing
        self.queued = queued
        self._slots = asyncio.Semaphore(ongoing)
        self.inside = 0
        """Requests admitted (working or waiting)."""
        self.refused = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.queued is not None and self.inside >= self.ongoing + self.queued:
            self.refused += 1
            raise RequestError(
                f"Server overloaded ({self.ongoing} requests in progress and {self.queued} waiting on this "
                "replica); retry later",
                code=ErrorCode.OVERLOADED,
            )
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


def declared_pixels(data: bytes) -> int:
    """Pixels that the header of ``data`` declares (what decoding it allocates, a few bytes each);
    0 when no image header can be read: the decode guard then refuses the input before decoding."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception:  # not an image, or a size PIL itself refuses to open: no pixels decoded
        return 0
    return max(0, width) * max(0, height)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


def release_free_memory() -> bool:
    """Hand the allocator's free memory back to the system (glibc ``malloc_trim(0)``: every arena).

    Decoding a large image allocates hundreds of MB in blocks that glibc keeps in its per-thread
    arenas once freed (its mmap threshold grows after the first large free), so a burst of large
    images would otherwise leave the replica holding hundreds of MB (docs/benchmarks.md). False
    where there is no ``malloc_trim``."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def rss_bytes() -> int | None:
    """This process's resident set size (Linux ``/proc/self/statm``), or None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _replica_cpus() -> float:
    """CPUs Ray reserved for this replica (1 outside Ray)."""
    try:
        import ray

        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
    except Exception:
        return 1.0


class Inflow:
    """Images of one replica on their way to a batch (waiting for the decode budget or decoding),
    and the largest batch: what a forming batch may still wait for."""

    def __init__(self, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size
        self.decoding = 0


def forming_batch_size(items: list[tuple[np.ndarray, Inflow]]) -> int:
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
    pass, on the event loop. :meth:`offline` jobs (chunks of the offline job's shards) run only
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


# -- the deployment ---------------------------------------------------------------------------


def _bool_param(value: str | None, name: str) -> bool:
    if value is None or value == "":
        return False
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise RequestError(f"Query parameter {name!r} must be true or false, not {value!r}")


class FeaturesEncoderImpl:
    """One CLIPVisionTower + projector per replica, its HTTP API, decode and dynamic batching
    (the ``FeaturesEncoder`` deployment; see the module docstring for a request's path)."""

    def __init__(self, config: Config) -> None:
        from pipeline.encoder import FeatureEncoder

        self.config = config
        self.limits = config.serve
        self.api_key = config.serve.api_key or os.environ.get(API_KEY_ENV) or None
        self.encoder = FeatureEncoder(config)
        self.fingerprint = self.encoder.fingerprint
        self.model_id = model_id(config)
        self.encode_batch.set_max_batch_size(config.serve.max_batch_size)
        s = config.serve
        per_replica = max(s.max_ongoing_requests, s.max_batch_size)
        self.admission = Admission(per_replica, s.max_queued_requests if s.max_queued_requests >= 0 else None)
        self.budget = PixelBudget(decode_budget(config))
        self.decode_threads = s.decode_threads or max(MIN_DECODE_THREADS, math.ceil(_replica_cpus()))
        self._decode_pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
        self.anyres = self.encoder.anyres_output
        """``tiles`` or ``packed`` for a LLaVA-NeXT checkpoint (its images are batched by tiles), else None."""
        self.device = (
            DeviceQueue(self._forward, config.serve.max_batch_size, self._observe_pass)
            if self.anyres is None
            else DeviceQueue(
                self._forward_tiles,
                config.serve.max_batch_size,
                self._observe_pass,
                size=lambda image: len(image[0]),
                collate=list,
            )
        )
        self.inflow = Inflow(config.serve.max_batch_size)
        self._pixels_since_trim = 0
        self._trims = 0
        self._writers: collections.OrderedDict[str, ShardWriter] = collections.OrderedDict()
        self._write_pool = ThreadPoolExecutor(OFFLINE_WRITE_THREADS, thread_name_prefix="write")
        self._offline: Counter[str] = Counter()
        warm_s = self.encoder.warmup(1)
        if self.encoder.device.type == "cuda" and config.serve.max_batch_size > 1:
            warm_s += self.encoder.warmup(config.serve.max_batch_size)
        try:
            import ray

            self.replica = ray.get_runtime_context().get_actor_name() or "local"
        except Exception:  # outside Ray (unit use)
            self.replica = "local"
        self._batch_sizes: Counter[int] = Counter()
        self._wait_max_s = self._pass_max_s = 0.0
        self._results: Counter[str] = Counter()
        self._started = time.time()
        self._m_batch = _histogram("llava_features_batch_size", "Images per forward pass.", _BATCH_BOUNDARIES)
        self._m_queue = _histogram(
            "llava_features_queue_ms",
            "Time an image waits for its batch to start (ms).",
            _LATENCY_MS_BOUNDARIES,
        )
        self._m_decode = _histogram(
            "llava_features_decode_ms", "Decode + preprocess time per image (ms).", _LATENCY_MS_BOUNDARIES
        )
        self._m_forward = _histogram(
            "llava_features_forward_ms", "Forward pass time per batch (ms).", _LATENCY_MS_BOUNDARIES
        )
        self._m_images = _counter(
            "llava_features_images", "Images encoded, by result (ok or error code).", ("result",)
        )
        self._m_requests = _counter(
            "llava_features_http_requests", "HTTP requests by route and status.", ("route", "status")
        )
        self._m_latency = _histogram(
            "llava_features_http_latency_ms",
            "HTTP request latency by route (ms).",
            _LATENCY_MS_BOUNDARIES,
            ("route",),
        )
        logger.info(
            "Encoder replica %s ready (fingerprint %s, warmup %.2fs, %d decode threads, decode budget %d pixels)",
            self.replica,
            self.fingerprint[:12],
            warm_s,
            self.decode_threads,
            self.budget.limit,
        )

    def _count(self, result: str) -> None:
        self._results[result] += 1
        self._m_images.inc(tags={"result": result})

    # -- decode (thread pool, pixel budget) -------------------------------------------------------

    async def _prepare(self, data: bytes, image_id: str | None) -> PreparedImage:
        """``encode_pre`` in the decode pool once the image's declared pixels fit the budget; raises
        DecodeError. The pixels are given back when the decode ends, even if the caller went away."""
        loop = asyncio.get_running_loop()
        cost = declared_pixels(data)
        if cost > self.config.decode.max_image_pixels:
            cost = 0  # refused by the guard from its header, before any pixel is decoded
        self.inflow.decoding += 1
        try:
            await self.budget.acquire(cost)
            future: Future[PreparedImage] = self._decode_pool.submit(self.encoder.encode_pre, data, image_id)
            future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._decoded, cost))
            return await asyncio.wrap_future(future)
        finally:
            self.inflow.decoding -= 1

    def _decoded(self, cost: int) -> None:
        """A decode ended: its pixels go back to the budget; after a burst, memory goes back too."""
        self.budget.release(cost)
        self._pixels_since_trim += cost
        if self.budget.used == 0 and self._pixels_since_trim >= TRIM_AFTER_PIXELS:
            self._pixels_since_trim = 0
            self._trims += 1
            self._decode_pool.submit(release_free_memory)

    # -- batching and the forward pass (device thread) -----------------------------------------

    @serve.batch(
        max_batch_size=32,
        batch_wait_timeout_s=0.005,
        max_concurrent_batches=MERGED_BATCHES,
        batch_size_fn=forming_batch_size,
    )
    async def encode_batch(self, items: list[tuple[Any, Inflow]]) -> list[tuple[np.ndarray, ...]]:
        """uint8 (3,H,W) images (anyres: (tiles, grid)) queued by ``encode`` → [(features, pooled)]: one group of the
        device's next pass (groups cut while a pass runs are merged into the next one). A group
        closes when it is full, when no other image of the replica is on its way (at once if none
        is when its first image comes), or ``batch_wait_timeout_s`` after its first image."""
        return await self.device.encode([pixels for pixels, _ in items])

    def _batch_window(self) -> float:
        """How long the batch an image starts may wait for more: ``serve.batch_wait_timeout_s``
        while other images are on their way (decoding), none when no other image could join it."""
        return self.limits.batch_wait_timeout_s if self.inflow.decoding else 0.0

    def _forward(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.encoder.encode_post(self.encoder.encode_core(pixels), pooled=True)
        assert out.features is not None and out.pooled is not None
        return out.features, out.pooled

    def _forward_tiles(self, images: list[tuple[np.ndarray, Any]]) -> tuple[Any, np.ndarray]:
        """anyres: [(tiles, grid)] → (ragged features, pooled): ``encode_tiles``, as the offline job."""
        out = self.encoder.encode_tiles(
            np.concatenate([tiles for tiles, _ in images]),
            [len(tiles) for tiles, _ in images],
            [grid for _, grid in images],
            pooled=True,
        )
        assert out.features is not None and out.pooled is not None
        return out.features, out.pooled

    def _observe_pass(self, size: int, waits: list[float], seconds: float) -> None:
        self._batch_sizes[size] += 1
        self._wait_max_s = max(self._wait_max_s, *waits)
        self._pass_max_s = max(self._pass_max_s, seconds)
        self._m_batch.observe(size)
        for wait in waits:
            self._m_queue.observe(wait * 1000)
        self._m_forward.observe(seconds * 1000)

    async def encode_pixels(self, pixels: np.ndarray, pooled: bool | None = None) -> EncodedBatch:
        """uint8 ``(N, 3, H, W)`` preprocessed images → :class:`~pipeline.encoder.EncodedBatch` (the
        config's feature kinds, in ``encoder.batch_size`` forward passes), as one job of the device
        queue the online batches use: the entry point for callers that decode elsewhere (through a
        deployment handle). Not for LLaVA-NeXT (anyres) checkpoints, whose images are several tiles:
        a ConfigError says so (their features come from the HTTP routes or the offline job)."""
        if self.anyres is not None:
            raise ConfigError(
                "encode_pixels takes single preprocessed tiles; this LLaVA-NeXT (anyres) checkpoint encodes "
                "each image as its base image and grid tiles: send the image to the HTTP routes instead"
            )
        return await self.device.call(self.encoder.encode_pixels, pixels, pooled=pooled)

    # -- offline shards (the shared pool: ``llava-features encode --serve-app``) -----------------
    # Their names are pipeline.constants' SERVE_DESCRIBE_METHOD and SERVE_SHARD_METHOD (the job calls
    # them through a deployment handle).

    async def describe_pool(self) -> PoolInfo:
        """This replica's encoder fingerprint and offline settings, for a job about to send shards."""
        from pipeline.records import PoolInfo

        s = self.limits
        return PoolInfo(
            fingerprint=self.fingerprint,
            offline_chunk_size=s.offline_chunk_size,
            max_offline_shards=s.max_offline_shards,
            max_replicas=s.max_replicas,
            replica=self.replica,
        )

    def _writer(self, target: ShardTarget) -> ShardWriter:
        """The writer of a job's files (one per job target, the last few kept)."""
        from pipeline.shards import ShardWriter, check_fingerprint

        check_fingerprint(self.encoder, target)
        key = json.dumps(dataclasses.asdict(target), sort_keys=True, default=str)
        writer = self._writers.pop(key, None) or ShardWriter(self.encoder, target)
        self._writers[key] = writer
        while len(self._writers) > KEPT_WRITERS:
            self._writers.popitem(last=False)
        return writer

    async def encode_shard(self, target: ShardTarget, record: DecodedShard) -> ShardSummary:
        """One decoded file of an offline job → committed in ``target.output``; its summary back.

        Its device work runs in chunks of ``serve.offline_chunk_size`` images (anyres: tiles) on the
        device queue's low-priority lane (a chunk starts only when no online batch waits), the
        Parquet write in the replica's write threads. Raises ConfigError (``fingerprint_mismatch``)
        for a job whose fingerprint is not this replica's."""
        writer = self._writer(target)
        started = time.perf_counter()
        encoded = None
        if len(record):
            chunks = writer.chunks(record, self.limits.offline_chunk_size)
            encoded = writer.join([await self.device.offline(chunk) for chunk in chunks])
            self._offline["chunks"] += len(chunks)
        loop = asyncio.get_running_loop()
        summary = await loop.run_in_executor(self._write_pool, writer.write, record, encoded)
        self._offline["shards"] += 1
        self._offline["images"] += record.num_ok
        logger.debug(
            "Committed %s (%d rows) in %.2fs",
            summary.file or "an empty unit",
            summary.rows,
            time.perf_counter() - started,
        )
        return summary

    # -- images → results -----------------------------------------------------------------------

    async def encode(
        self, data: bytes, image_id: str | None = None, want: str = "features", *, count: bool = True
    ) -> EncodeResult:
        """One image → its features (``want="features"``) or pooled vector (``want="pooled"``).

        Undecodable inputs come back as ``ok=False`` results with the decode guard's code.
        ``count=False`` (health checks) leaves the per-result counters alone.
        """
        started = time.perf_counter()
        try:
            prepared = await self._prepare(data, image_id)
        except DecodeError as exc:
            if count:
                self._count(str(exc.code))
            return EncodeResult(
                False, image_id, self.fingerprint, error_code=str(exc.code), error_message=exc.message
            )
        self._m_decode.observe((time.perf_counter() - started) * 1000)
        self.encode_batch.set_batch_wait_timeout_s(self._batch_window())
        image = prepared.pixels if self.anyres is None else (prepared.tiles, prepared.grid)
        features, pooled = await self.encode_batch((image, self.inflow))
        if count:
            self._count("ok")
        return EncodeResult(
            True,
            image_id,
            self.fingerprint,
            features=features if want != "pooled" else None,
            dtype=self.encoder.output_dtype_name,
            pooled=pooled if want != "features" else None,
            width=prepared.width,
            height=prepared.height,
        )

    async def encode_many(
        self, items: list[tuple[bytes, str | None]], want: str = "features"
    ) -> list[EncodeResult]:
        """Several images; they join the same batches. Per-item failures don't fail the others."""
        return list(await asyncio.gather(*(self.encode(data, image_id, want) for data, image_id in items)))

    # -- state ------------------------------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        """Model card: ``FeatureEncoder.info()`` with the API key masked, plus the model id."""
        info = self.encoder.info()
        info["config"] = redacted_config(self.config)
        return {"id": self.model_id, "replica": self.replica, "started": int(self._started), **info}

    async def stats(self) -> dict[str, Any]:
        """This replica's counters: batch sizes ({size: batches}), results, admission, decode memory, the
        offline shards' work and the longest waits (an online image's for its pass, an offline chunk)."""
        batches = sum(self._batch_sizes.values())
        images = sum(size * n for size, n in self._batch_sizes.items())
        return {
            "replica": self.replica,
            "pid": os.getpid(),
            "batch_sizes": {str(k): v for k, v in sorted(self._batch_sizes.items())},
            "batches": batches,
            "images": images,
            "mean_batch_size": images / batches if batches else 0.0,
            "max_batch_size": max(self._batch_sizes, default=0),
            "results": dict(self._results),
            "requests_inside": self.admission.inside,
            "requests_refused": self.admission.refused,
            "decode_threads": self.decode_threads,
            "decode_budget_pixels": self.budget.limit,
            "decode_pixels_in_flight": self.budget.used,
            "decode_pixels_peak": self.budget.peak,
            "decode_budget_waits": self.budget.waits,
            "memory_trims": self._trims,
            "rss_bytes": rss_bytes(),
            "offline_shards": self._offline["shards"],
            "offline_images": self._offline["images"],
            "offline_chunks": self._offline["chunks"],
            "offline_chunk_size": self.limits.offline_chunk_size,
            "offline_chunk_ms_max": round(self.device.offline_max_s * 1000, 3),
            "online_wait_ms_max": round(self._wait_max_s * 1000, 3),
            "online_pass_ms_max": round(self._pass_max_s * 1000, 3),
        }

    async def reset_stats(self) -> None:
        self._batch_sizes.clear()
        self._results.clear()
        self.admission.refused = 0
        self.budget.peak = self.budget.used
        self.budget.waits = 0
        self._wait_max_s = self._pass_max_s = self.device.offline_max_s = 0.0

    # -- HTTP plumbing ----------------------------------------------------------------------------

    async def _run(
        self, request: Request, route: str, handler: Callable[[], Awaitable[Response]]
    ) -> Response:
        """Auth, admission, timeout, error → response mapping and metrics around one route handler."""
        started = time.perf_counter()
        status = 499  # client went away (the task was cancelled)
        try:
            try:
                if route != "/healthz":
                    http.check_api_key(request, self.api_key)
                async with asyncio.timeout(self.limits.request_timeout_s):
                    if route in _ENCODING_ROUTES:
                        async with self.admission.slot():
                            response = await handler()
                    else:
                        response = await handler()
            except TimeoutError:
                response = http.error_response(
                    RequestError(
                        f"Request took longer than {self.limits.request_timeout_s:g}s", code=ErrorCode.TIMEOUT
                    )
                )
            except LlavaFeaturesError as exc:
                response = http.error_response(exc)
            except Exception:
                logger.exception("Unhandled error on %s", route)
                response = http.error_response(
                    LlavaFeaturesError("Internal server error", code=ErrorCode.INTERNAL)
                )
            status = response.status_code
            return response
        finally:
            self._m_requests.inc(tags={"route": route, "status": str(status)})
            self._m_latency.observe((time.perf_counter() - started) * 1000, tags={"route": route})

    # -- routes -----------------------------------------------------------------------------------

    async def features(self, request: Request) -> Response:
        params = request.query_params
        pooled = _bool_param(params.get("pooled"), "pooled")
        output = http.choose_format(request.headers.get("accept"), params.get("format"))
        images = await http.read_images(request, self.limits.max_body_bytes, max_files=1)
        if not images:
            raise RequestError("No image in the request: send it as the body or as a multipart file part")
        name, data = images[0]
        image_id = params.get("image_id") or name
        result = await self.encode(data, image_id, "pooled" if pooled else "features")
        result.raise_for_error()
        array = result.response_array(pooled)
        if output == "json":
            return JSONResponse(
                {
                    "image_id": result.image_id,
                    "width": result.width,
                    "height": result.height,
                    "model": self.model_id,
                    "fingerprint": result.fingerprint,
                    "pooled": pooled,
                    **http.array_payload(array),
                }
            )
        headers = {
            "X-Image-Width": str(result.width),
            "X-Image-Height": str(result.height),
            "X-Model-Fingerprint": result.fingerprint,
        }
        if result.image_id:
            headers["X-Image-Id"] = result.image_id
        return http.npy_response(array, headers)

    async def features_batch(self, request: Request) -> Response:
        pooled = _bool_param(request.query_params.get("pooled"), "pooled")
        if http.media_type(request) != "multipart/form-data":
            raise RequestError(
                "/v1/features:batch takes a multipart/form-data body with one file part per image",
                code=ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            )
        files = await http.read_multipart_files(request, self.limits.max_body_bytes)
        if not files:
            raise RequestError("No file parts in the multipart body")
        results = await self.encode_many(
            [(data, name) for name, data in files], "pooled" if pooled else "features"
        )
        fingerprint = next((r.fingerprint for r in results if r.ok), "")
        body = [r.item(pooled) for r in results]
        return JSONResponse(body, headers={"X-Model-Fingerprint": fingerprint} if fingerprint else None)

    async def embeddings(self, request: Request) -> Response:
        body = await http.read_json(request, self.limits.max_body_bytes)
        inputs, encoding_format, requested_model = http.embedding_inputs(body)
        items = [
            (http.image_from_data_url(value, f"input[{i}]"), f"input[{i}]") for i, value in enumerate(inputs)
        ]
        results = await self.encode_many(items, "pooled")
        for result in results:
            result.raise_for_error()
        vectors = [r.pooled for r in results if r.pooled is not None]
        return JSONResponse(http.embeddings_body(vectors, requested_model or self.model_id, encoding_format))

    async def models(self, request: Request) -> Response:
        info = await self.info()
        card = {
            "id": info["id"],
            "object": "model",
            "created": info["started"],
            "owned_by": "llava-features",
            **info,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def healthz(self, request: Request) -> Response:
        """A real request's path on a generated image (decode, batch, forward, host copy, the npy
        response a request would get), on this replica."""
        started = time.perf_counter()
        try:
            result = await self.encode(_health_image(self.encoder.input_shape[1:]), "healthz", count=False)
            result.raise_for_error()
            http.npy_bytes(result.response_array(pooled=False))
        except LlavaFeaturesError as exc:
            logger.error("Health check failed: %s", exc)
            raise RequestError(f"Health check failed: {exc.message}", code=ErrorCode.UNAVAILABLE) from exc
        except Exception as exc:  # the forward pass itself failed
            logger.exception("Health check failed")
            raise RequestError(f"Health check failed: {exc}", code=ErrorCode.UNAVAILABLE) from exc
        return JSONResponse(
            {
                "status": "ok",
                "model": self.model_id,
                "replica": self.replica,
                "fingerprint": self.fingerprint,
                "anyres_output": self.anyres,
                "forward_ms": round((time.perf_counter() - started) * 1000, 3),
            }
        )

    async def debug_stats(self, request: Request) -> Response:
        return JSONResponse(await self.stats())

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The FastAPI app of this replica (routes are closures over ``self``)."""
        from fastapi import FastAPI

        from pipeline import __version__

        api = FastAPI(
            title="llava-features", version=__version__, docs_url=None, redoc_url=None, openapi_url=None
        )
        http.install_error_handlers(api)  # 404/405 in our error shape
        routes: list[tuple[str, str, Callable[[Request], Awaitable[Response]]]] = [
            ("POST", "/v1/features", self.features),
            ("POST", "/v1/features:batch", self.features_batch),
            ("POST", "/v1/embeddings", self.embeddings),
            ("GET", "/v1/models", self.models),
            ("GET", "/healthz", self.healthz),
            ("GET", "/debug/stats", self.debug_stats),
        ]
        for method, path, handler in routes:
            api.add_api_route(path, self._endpoint(path, handler), methods=[method], include_in_schema=True)

        async def openapi(request: Request) -> Response:
            return await self._run(request, "/openapi.json", lambda: _json(api.openapi()))

        api.add_api_route("/openapi.json", openapi, methods=["GET"], include_in_schema=False)
        return api

    def _endpoint(
        self, route: str, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await self._run(request, route, lambda: handler(request))

        endpoint.__name__ = handler.__name__
        endpoint.__doc__ = handler.__doc__
        return endpoint


async def _json(payload: Any) -> Response:
    return JSONResponse(payload)


def _health_image(size: tuple[int, int]) -> bytes:
    """A small PNG of the encoder's input size (mid-grey with a gradient) for health checks."""
    from PIL import Image

    height, width = size
    ramp = np.linspace(0, 255, width, dtype=np.uint8)
    pixels = np.repeat(np.repeat(ramp[None, :, None], height, axis=0), 3, axis=2)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# The deployment wraps a class that stays importable under its own name, so replicas import this
# module's code instead of receiving a pickled copy of it (FastAPI reads the routes' annotations).
FeaturesEncoder = serve.deployment(name=ENCODER_DEPLOYMENT)(serve.ingress()(FeaturesEncoderImpl))


# -- building the application -----------------------------------------------------------------


def _cluster_has_gpus() -> bool:
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    import torch

    return torch.cuda.is_available()


def _model_overrides(model: Any) -> dict[str, Any]:
    if model is None:
        return {}
    if isinstance(model, dict):
        return dict(model)
    if not isinstance(model, str):
        raise ConfigError(
            f"'model' must be a path/model id or a mapping of model settings, not {type(model).__name__}"
        )
    path = Path(model).expanduser()
    # Any layout (LLaVA, llava-hf, a bare CLIP model): resolve_model tells them apart.
    return {"checkpoint": str(path.resolve()) if path.exists() else model}  # else a model id in the HF cache


def _make_tiny(path: Path) -> None:
    """Write a tiny random-weight LLaVA checkpoint at ``path`` (atomically: temp dir + rename)."""
    from pipeline.model.tiny import make_tiny_model
    from pipeline.model.tower import quiet_progress_bars

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        with quiet_progress_bars():
            make_tiny_model(tmp / "model", "llava")
        try:
            os.replace(tmp / "model", path)
        except OSError:
            if not path.exists():  # lost a race with another builder: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.warning("Wrote a tiny random-weight demo checkpoint to %s (features are meaningless)", path)


def resolve_app_config(args: dict[str, Any] | None = None) -> Config:
    """Our :class:`Config` from ``build_app``'s args (see the module docstring)."""
    args = dict(args or {})
    unknown = sorted(set(args) - set(BUILD_ARGS))
    if unknown:
        raise ConfigError(f"Unknown build_app arg(s) {unknown}; known: {list(BUILD_ARGS)}")
    model = args.get("model")
    if args.get("make_tiny_if_missing") and isinstance(model, str):
        path = Path(model).expanduser()
        if not path.exists():
            _make_tiny(path.resolve())
    overrides: dict[str, dict[str, Any]] = {"model": _model_overrides(model)}
    for section in SECTION_ARGS:
        value = args.get(section)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"build_app arg {section!r} must be a mapping of {section} settings")
        overrides[section] = dict(value or {})
    config_path = args.get("config")
    return load_config(Path(config_path).expanduser() if config_path else None, overrides)


def deployable_args(config: Config) -> dict[str, Any]:
    """``build_app`` args that rebuild ``config`` (its sections as overrides; for benchmarks and tools)."""
    return {k: v for k, v in config_to_dict(config).items() if k in ("model", *SECTION_ARGS)}


def proxy_request_timeout_s(config: Config) -> float:
    """``http_options.request_timeout_s`` for Serve's proxy: ``serve.request_timeout_s`` plus a margin."""
    return config.serve.request_timeout_s + PROXY_TIMEOUT_MARGIN_S


def with_api_key_from_env(config: Config) -> Config:
    """``serve.api_key`` from ``LLAVA_FEATURES_API_KEY`` when the config has none."""
    key = os.environ.get(API_KEY_ENV)
    if config.serve.api_key or not key:
        return config
    return dataclasses.replace(config, serve=dataclasses.replace(config.serve, api_key=key))


def deployment_options(
    config: Config, ray_actor_options: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """``.options()`` of the deployment derived from ``config.serve``, as ``{"encoder": {...}}``
    (returned for inspection); ``ray_actor_options`` is ``{"encoder": {...}}``."""
    s = config.serve  # ranges and the replica ordering were checked when the config was loaded
    extra = dict(ray_actor_options or {})
    if "ingress" in extra:
        raise ConfigError(
            "ray_actor_options: there is no ingress deployment any more (the encoder replicas serve "
            "HTTP themselves); pass {'encoder': {...}} only, e.g. {'encoder': {'num_cpus': 2}}"
        )
    unknown = sorted(set(extra) - set(ACTOR_OPTION_KEYS))
    if unknown:
        raise ConfigError(f"ray_actor_options takes {list(ACTOR_OPTION_KEYS)}, not {unknown}")
    decode_budget(config)  # serve.max_decode_pixels against decode.max_image_pixels, at build time
    gpus = s.num_gpus_per_replica if s.num_gpus_per_replica is not None else (1 if _cluster_has_gpus() else 0)
    # A replica works on at least a full batch of requests at once, or batches never fill, and holds
    # max_queued_requests more waiting (Admission); past that it answers 503 itself, in our JSON
    # shape. Ray Serve hands a replica more than that (those extra are refused by the replica at
    # once), so that its own queue at the proxy, whose 503 is plain text, is only the last guard: it
    # holds as many as a replica is handed (a burst waits there for a replica to be chosen, so a
    # queue as short as ours would shed a burst in plain text before any replica saw it).
    per_replica = max(s.max_ongoing_requests, s.max_batch_size)
    admitted = per_replica + s.max_queued_requests if s.max_queued_requests >= 0 else 2 * per_replica
    handed = max(MIN_SERVE_ONGOING, 2 * admitted)
    encoder = {
        "autoscaling_config": {
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "initial_replicas": s.initial_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        },
        "max_ongoing_requests": handed,
        "max_queued_requests": handed if s.max_queued_requests >= 0 else -1,
        "backpressure_config": {"status_code": 503, "retry_after_s": http.RETRY_AFTER_S},
        "ray_actor_options": {
            "num_cpus": DEFAULT_ENCODER_CPUS,
            "num_gpus": gpus,
            **(extra.get("encoder") or {}),
        },
    }
    return {"encoder": encoder}


def build_app_from_config(config: Config, *, ray_actor_options: dict[str, Any] | None = None) -> Application:
    """The bound application (one deployment, its own HTTP ingress) for a resolved config."""
    config = with_api_key_from_env(config)
    options = deployment_options(config, ray_actor_options)
    return FeaturesEncoder.options(**options["encoder"]).bind(config)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve application builder (``import_path: deployments.app:build_app``); see the module docstring."""
    args = dict(args or {})
    config = resolve_app_config(args)
    logger.info("Building %s for %s", APP_NAME, config.model.checkpoint or config.model.vision_tower)
    app = build_app_from_config(config, ray_actor_options=args.get("ray_actor_options"))
    announce(APP_NAME)  # serve run / serve deploy: where the proxy listens
    return app
