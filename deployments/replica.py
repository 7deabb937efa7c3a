"""One encoder replica (the ``FeaturesEncoder`` deployment's class): its encoder, decode, batching,
the offline job's files, its counters and its HTTP app.

A request's path on a replica (the HTTP side is :mod:`deployments.router`):

1. admission (:class:`~deployments.scheduling.Admission`) once its body has arrived: at most
   ``serve.max_ongoing_requests`` in progress and ``serve.max_queued_requests`` waiting;
2. decode (``encode_pre``: the decode guard + preprocessing) in the replica's thread pool
   (``serve.decode_threads``), behind a budget of decoded pixels in flight
   (:class:`~deployments.scheduling.PixelBudget`, ``serve.max_decode_pixels``); the allocator's free
   memory is handed back to the system after bursts (:func:`pipeline.memory.release_free_memory`);
3. ``@serve.batch`` groups the decoded images of concurrent requests, waiting up to
   ``serve.batch_wait_timeout_s`` only while other images are still being decoded; the groups go
   to the device queue (:class:`~deployments.scheduling.DeviceQueue`), whose one device thread runs
   the forward passes (``encode_core`` + ``encode_post``) one at a time and merges the groups that
   wait while a pass runs into the next one (why both: docs/benchmarks.md). The images of one
   ``/v1/features:batch`` or ``/v1/embeddings`` request skip ``@serve.batch``: once decoded they go
   to the device queue as one group (:meth:`FeaturesEncoderImpl.encode_many`).

:meth:`FeaturesEncoderImpl.encode_pixels` (uint8 pixel batches through a deployment handle) is the
non-HTTP entry point into the same queue; :meth:`~FeaturesEncoderImpl.describe_pool` and
:meth:`~FeaturesEncoderImpl.encode_shard` serve the offline job (:mod:`deployments.offline`);
:meth:`~FeaturesEncoderImpl.record_autoscaling_stats` reports both doors' load to Serve's autoscaler
(:mod:`deployments.autoscaling`).
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import os
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve

from pipeline.config import Config, config_to_dict
from pipeline.memory import release_free_memory, rss_bytes
from pipeline.model.errors import ConfigError, DecodeError
from pipeline.shards import chunk_ranges

from .autoscaling import replica_load
from .build import API_KEY_ENV, decode_budget
from .metrics import ReplicaMetrics
from .offline import OfflineShards
from .result import EncodeResult
from .scheduling import Admission, DeviceQueue, Inflow, PixelBudget, forming_batch_size

if TYPE_CHECKING:
    from pipeline.encoder import EncodedBatch
    from pipeline.images.preprocess import PreparedImage
    from pipeline.records import DecodedShard, PoolInfo, ShardSummary, ShardTarget

    from .router import Router

logger = logging.getLogger(__name__)

MERGED_BATCHES = 8
"""Batches ``@serve.batch`` may hand over while the device is busy (the device queue merges them)."""
MIN_DECODE_THREADS = 2
"""Fewest decode threads per replica when ``serve.decode_threads`` is unset (more when Ray gives the
replica more CPUs)."""
TRIM_AFTER_PIXELS = 16_000_000
"""Decoded pixels after which an idle replica hands its allocator's free memory back (malloc_trim)."""


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


def _replica_cpus() -> float:
    """CPUs Ray reserved for this replica (1 outside Ray)."""
    try:
        import ray

        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
    except Exception:
        return 1.0


def health_image(size: tuple[int, int]) -> bytes:
    """A small PNG of the encoder's input size (mid-grey with a gradient) for health checks."""
    from PIL import Image

    height, width = size
    ramp = np.linspace(0, 255, width, dtype=np.uint8)
    pixels = np.repeat(np.repeat(ramp[None, :, None], height, axis=0), 3, axis=2)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class FeaturesEncoderImpl:
    """One CLIPVisionTower + projector per replica, its HTTP API, decode and dynamic batching
    (the ``FeaturesEncoder`` deployment; see the module docstring for a request's path)."""

    def __init__(self, config: Config) -> None:
        from pipeline.encoder import FeatureEncoder

        self.config = config
        self.limits = s = config.serve
        self.api_key = s.api_key or os.environ.get(API_KEY_ENV) or None
        self.encoder = FeatureEncoder(config)
        self.fingerprint = self.encoder.fingerprint
        self.model_id = model_id(config)
        per_replica = max(s.max_ongoing_requests, s.max_batch_size)
        self.admission = Admission(per_replica, s.max_queued_requests if s.max_queued_requests >= 0 else None)
        self.budget = PixelBudget(decode_budget(config))
        self.decode_threads = s.decode_threads or max(MIN_DECODE_THREADS, math.ceil(_replica_cpus()))
        self._decode_pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
        self.anyres = self.encoder.anyres_output
        """``tiles`` or ``packed`` for a LLaVA-NeXT checkpoint (its images are batched by tiles), else None."""
        self.encode_batch.set_max_batch_size(s.max_batch_size)
        self.inflow = Inflow(s.max_batch_size)
        batching: dict[str, Any] = {}
        if self.anyres is not None:
            batching.update(size=lambda image: len(image[0]), collate=list)
        self.device = DeviceQueue(
            self._forward if self.anyres is None else self._forward_tiles,
            s.max_batch_size,
            self._observe_pass,
            **batching,
        )
        self.offline = OfflineShards(self.encoder, self.device, s.offline_chunk_size)
        self._pixels_since_trim = 0
        self._trims = 0
        self._handle_calls = 0
        """``encode_pixels`` calls in progress (online work that came through a deployment handle)."""
        warm_s = self.encoder.warmup(1)
        if self.encoder.device.type == "cuda" and s.max_batch_size > 1:
            warm_s += self.encoder.warmup(s.max_batch_size)
        try:
            import ray

            self.replica = ray.get_runtime_context().get_actor_name() or "local"
        except Exception:  # outside Ray (unit use)
            self.replica = "local"
        self._batch_sizes: Counter[int] = Counter()
        self._wait_max_s = self._pass_max_s = 0.0
        self._results: Counter[str] = Counter()
        self._started = time.time()
        self.metrics = ReplicaMetrics()
        self.health_png = health_image(self.encoder.input_shape[1:])
        logger.info(
            "Encoder replica %s ready (fingerprint %s, warmup %.2fs, %d decode threads, decode budget %d pixels)",
            self.replica,
            self.fingerprint[:12],
            warm_s,
            self.decode_threads,
            self.budget.limit,
        )

    def _count(self, result: str, n: int = 1) -> None:
        self._results[result] += n
        self.metrics.image(result, n)

    # -- decode (thread pool, pixel budget) -------------------------------------------------------

    async def _prepare(self, data: bytes, image_id: str | None) -> PreparedImage:
        """``encode_pre`` in the decode pool once the image's declared pixels fit the budget; raises
        DecodeError. The pixels are given back when the decode ends, even if the caller went away."""
        loop = asyncio.get_running_loop()
        cost = declared_pixels(data)
        if cost > self.config.decode.max_image_pixels:
            cost = 0  # refused by the guard from its header, before any pixel is decoded
        await self.budget.acquire(cost)
        future: Future[PreparedImage] = self._decode_pool.submit(self.encoder.encode_pre, data, image_id)
        waiter: asyncio.Future[PreparedImage] = loop.create_future()
        # One wake-up of the event loop per decode (the budget and the result together), where
        # asyncio.wrap_future and a callback of our own would take two.
        future.add_done_callback(
            lambda done: loop.call_soon_threadsafe(self._decode_done, cost, done, waiter)
        )
        waiter.add_done_callback(lambda w: future.cancel() if w.cancelled() else None)
        return await waiter

    def _decode_done(
        self, cost: int, done: Future[PreparedImage], waiter: asyncio.Future[PreparedImage]
    ) -> None:
        self._decoded(cost)
        if waiter.done():  # the caller went away
            return
        if done.cancelled():
            waiter.cancel()
        elif (exc := done.exception()) is not None:
            waiter.set_exception(exc)
        else:
            waiter.set_result(done.result())

    def _decoded(self, cost: int) -> None:
        """A decode ended: its pixels go back to the budget; after a burst, memory goes back too."""
        self.budget.release(cost)
        self._pixels_since_trim += cost
        if self.budget.used == 0 and self._pixels_since_trim >= TRIM_AFTER_PIXELS:
            self._pixels_since_trim = 0
            self._trims += 1
            self._decode_pool.submit(release_free_memory)

    # -- the forward pass (device thread) ----------------------------------------------------------

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
        self.metrics.forward_pass(size, waits, seconds)

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
        self._handle_calls += 1
        try:
            return await self.device.call(self.encoder.encode_pixels, pixels, pooled=pooled)
        finally:
            self._handle_calls -= 1

    # -- offline files (the shared pool: ``llava-features encode --serve-app``) ------------------
    # Their names are pipeline.constants' SERVE_DESCRIBE_METHOD and SERVE_SHARD_METHOD (the job calls
    # them through a deployment handle).

    async def describe_pool(self) -> PoolInfo:
        """This replica's encoder fingerprint and offline settings, for a job about to send files."""
        from pipeline.records import PoolInfo

        s = self.limits
        return PoolInfo(
            fingerprint=self.fingerprint,
            offline_chunk_size=s.offline_chunk_size,
            max_offline_shards=s.max_offline_shards,
            max_replicas=s.max_replicas,
            replica=self.replica,
        )

    async def encode_shard(self, target: ShardTarget, record: DecodedShard) -> ShardSummary:
        """One decoded file of an offline job → committed in ``target.output``; its summary back
        (:meth:`deployments.offline.OfflineShards.encode`)."""
        return await self.offline.encode(target, record)

    # -- images → results -----------------------------------------------------------------------

    async def _decode(
        self, data: bytes, image_id: str | None, *, count: bool = True
    ) -> PreparedImage | EncodeResult:
        """One image decoded (:meth:`_prepare`, its time in the decode histogram), or the ``ok=False``
        result of an input the decode guard refused (counted unless ``count`` is false)."""
        started = time.perf_counter()
        try:
            prepared = await self._prepare(data, image_id)
        except DecodeError as exc:
            if count:
                self._count(str(exc.code))
            return EncodeResult(
                False, image_id, self.fingerprint, error_code=str(exc.code), error_message=exc.message
            )
        self.metrics.decoded((time.perf_counter() - started) * 1000)
        return prepared

    def _device_input(self, prepared: PreparedImage) -> Any:
        """What the device queue takes for one image: its pixels (anyres: (tiles, grid))."""
        return prepared.pixels if self.anyres is None else (prepared.tiles, prepared.grid)

    def _result(
        self, prepared: PreparedImage, image_id: str | None, want: str, outputs: tuple[np.ndarray, ...]
    ) -> EncodeResult:
        features, pooled = outputs
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

    async def encode(
        self, data: bytes, image_id: str | None = None, want: str = "features", *, count: bool = True
    ) -> EncodeResult:
        """One image → its features (``want="features"``) or pooled vector (``want="pooled"``).

        Undecodable inputs come back as ``ok=False`` results with the decode guard's code.
        ``count=False`` (health checks) leaves the per-result counters alone.
        """
        self.inflow.decoding += 1  # a forming batch may wait for this image while it decodes
        try:
            prepared = await self._decode(data, image_id, count=count)
        finally:
            self.inflow.decoding -= 1
        if isinstance(prepared, EncodeResult):
            return prepared
        self.encode_batch.set_batch_wait_timeout_s(self._batch_window())
        outputs = await self.encode_batch((self._device_input(prepared), self.inflow))
        if count:
            self._count("ok")
        return self._result(prepared, image_id, want, outputs)

    @serve.batch(
        max_batch_size=32,
        batch_wait_timeout_s=0.005,
        max_concurrent_batches=MERGED_BATCHES,
        batch_size_fn=forming_batch_size,
    )
    async def encode_batch(self, items: list[tuple[Any, Inflow]]) -> list[tuple[np.ndarray, ...]]:
        """Decoded images (anyres: (tiles, grid)) → [(features, pooled)]: one group of the device's next
        pass (groups cut while a pass runs are merged into the next one). A group closes when it is
        full, when no other image of the replica is on its way (at once if none is when its first
        image comes), or ``batch_wait_timeout_s`` after its first image."""
        return await self.device.encode([image for image, _ in items])

    def _batch_window(self) -> float:
        """How long the batch an image starts may wait for more: ``serve.batch_wait_timeout_s``
        while other images are on their way (decoding), none when no other image could join it."""
        return self.limits.batch_wait_timeout_s if self.inflow.decoding else 0.0

    async def encode_many(
        self, items: list[tuple[bytes, str | None]], want: str = "features"
    ) -> list[EncodeResult]:
        """Several images of one request; per-item failures don't fail the others.

        They are decoded side by side, then go to the device queue as one group (in groups of at
        most ``serve.max_batch_size`` images; anyres: tiles), not one ``@serve.batch`` item each: they
        are already a batch, and per image the batching costs the event loop more than it saves
        (docs/benchmarks.md). The device queue still merges them with whatever waits beside them.
        """
        decoded = await asyncio.gather(*(self._decode(data, image_id) for data, image_id in items))
        ready = [(i, p) for i, p in enumerate(decoded) if not isinstance(p, EncodeResult)]
        inputs = [self._device_input(p) for _, p in ready]
        sizes = np.fromiter(map(self.device.size, inputs), np.int64, len(inputs))
        groups = [inputs[a:b] for a, b in chunk_ranges(sizes, self.limits.max_batch_size)]
        outputs = [row for rows in await asyncio.gather(*map(self.device.encode, groups)) for row in rows]
        results = [r if isinstance(r, EncodeResult) else None for r in decoded]
        for (i, prepared), row in zip(ready, outputs, strict=True):
            results[i] = self._result(prepared, items[i][1], want, row)
        if ready:
            self._count("ok", len(ready))
        return [r for r in results if r is not None]

    # -- state ------------------------------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        """Model card: ``FeatureEncoder.info()`` with the API key masked, plus the model id."""
        info = self.encoder.info()
        info["config"] = redacted_config(self.config)
        return {"id": self.model_id, "replica": self.replica, "started": int(self._started), **info}

    async def stats(self) -> dict[str, Any]:
        """This replica's counters: batch sizes ({size: batches}), results, admission, decode memory, the
        offline files' work and the longest waits (an online image's for its pass, an offline chunk)."""
        batches = sum(self._batch_sizes.values())
        images = sum(size * n for size, n in self._batch_sizes.items())
        offline = self.offline.counts
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
            "offline_shards": offline["shards"],
            "offline_images": offline["images"],
            "offline_chunks": offline["chunks"],
            "offline_in_flight": self.offline.in_flight,
            "offline_chunk_size": self.limits.offline_chunk_size,
            "offline_chunk_ms_max": round(self.device.offline_max_s * 1000, 3),
            "online_wait_ms_max": round(self._wait_max_s * 1000, 3),
            "online_pass_ms_max": round(self._pass_max_s * 1000, 3),
            **self.autoscaling_load(),
        }

    async def reset_stats(self) -> None:
        self._batch_sizes.clear()
        self._results.clear()
        self.admission.refused = 0
        self.budget.peak = self.budget.used
        self.budget.waits = 0
        self._wait_max_s = self._pass_max_s = self.device.offline_max_s = 0.0

    # -- autoscaling ------------------------------------------------------------------------------

    def autoscaling_load(self) -> dict[str, float]:
        """Both doors' load on this replica, in ongoing requests (:func:`deployments.autoscaling.replica_load`):
        online, the HTTP requests admitted and the ``encode_pixels`` calls in progress."""
        return replica_load(self.admission.inside + self._handle_calls, self.offline.in_flight, self.limits)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve calls this on every replica a few times per look-back window and hands the values
        to the autoscaling policy (:func:`deployments.autoscaling.both_doors_policy`)."""
        return self.autoscaling_load()

    # -- HTTP -------------------------------------------------------------------------------------

    def __serve_build_asgi_app__(self) -> Router:
        """This replica's ASGI app: the routes (:mod:`deployments.routes`) behind the thin router."""
        from .routes import build_router

        return build_router(self)
