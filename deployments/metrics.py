"""The replica's Prometheus metrics (Ray's metrics export, prefixed ``ray_``), built in one place.

Names: ``llava_features_http_requests{route,status}``, ``llava_features_http_latency_ms{route}``,
``llava_features_batch_size``, ``llava_features_queue_ms``, ``llava_features_decode_ms``,
``llava_features_forward_ms``, ``llava_features_images{result}``. Built when a replica starts (Ray's
metrics need a running Ray), never at import.
"""

from __future__ import annotations

from typing import Any

LATENCY_MS_BOUNDARIES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class ReplicaMetrics:
    """One replica's metrics; each method records one event."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        def histogram(name: str, doc: str, boundaries: list[float], tags: tuple[str, ...] = ()) -> Any:
            return Histogram(name, description=doc, boundaries=boundaries, tag_keys=tags)

        self._batch = histogram("llava_features_batch_size", "Images per forward pass.", BATCH_BOUNDARIES)
        self._queue = histogram(
            "llava_features_queue_ms",
            "Time an image waits for its batch to start (ms).",
            LATENCY_MS_BOUNDARIES,
        )
        self._decode = histogram(
            "llava_features_decode_ms", "Decode + preprocess time per image (ms).", LATENCY_MS_BOUNDARIES
        )
        self._forward = histogram(
            "llava_features_forward_ms", "Forward pass time per batch (ms).", LATENCY_MS_BOUNDARIES
        )
        self._latency = histogram(
            "llava_features_http_latency_ms",
            "HTTP request latency by route (ms).",
            LATENCY_MS_BOUNDARIES,
            ("route",),
        )
        self._images = Counter(
            "llava_features_images",
            description="Images encoded, by result (ok or error code).",
            tag_keys=("result",),
        )
        self._requests = Counter(
            "llava_features_http_requests",
            description="HTTP requests by route and status.",
            tag_keys=("route", "status"),
        )

    def image(self, result: str, n: int = 1) -> None:
        """``n`` images with this result (one call per request and result, not per image: each call
        into Ray's metrics hands the GIL over)."""
        self._images.inc(n, tags={"result": result})

    def decoded(self, ms: float) -> None:
        self._decode.observe(ms)

    def forward_pass(self, size: int, waits_s: list[float], seconds: float) -> None:
        self._batch.observe(size)
        for wait in waits_s:
            self._queue.observe(wait * 1000)
        self._forward.observe(seconds * 1000)

    def request(self, route: str, status: int, ms: float) -> None:
        self._requests.inc(tags={"route": route, "status": str(status)})
        self._latency.observe(ms, tags={"route": route})
