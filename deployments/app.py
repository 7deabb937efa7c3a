"""The Ray Serve application: a FastAPI ingress in front of batching encoder replicas.

Two deployments:

- ``FeaturesEncoder``: each replica holds one :class:`pipeline.encoder.FeatureEncoder` (CLIP
  vision tower + projector, one GPU when the cluster has GPUs). Requests are decoded in a thread
  (``encode_pre``: the decode guard + preprocessing), then grouped by ``@serve.batch`` into one
  forward pass (``encode_core`` + ``encode_post``, also in a thread, so the replica's event loop
  keeps accepting requests and forming the next batch while a batch runs). Autoscaled between
  ``serve.min_replicas`` and ``serve.max_replicas``.
- ``FeaturesIngress``: the HTTP API (built per replica by ``__serve_build_asgi_app__``): reads
  bodies with a size limit, checks the API key, applies the request timeout, calls the encoder
  through its handle and encodes responses (``deployments.http``).

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
    ``{"encoder": {...}, "ingress": {...}}`` merged over the defaults (encoder: 1 CPU and
    ``serve.num_gpus_per_replica`` GPUs; ingress: 0.5 CPU).

Relative paths are resolved against the working directory of the process that builds the app
(the directory ``serve run`` / ``llava-features serve`` was started from).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pipeline.config import Config, config_to_dict, load_config
from pipeline.model.errors import ConfigError, DecodeError, ErrorCode, LlavaFeaturesError, RequestError

from . import http
from .listen import announce

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve.deployment import Application
    from ray.serve.handle import DeploymentHandle

logger = logging.getLogger(__name__)

APP_NAME = "llava-features"
"""Application name used by ``llava-features serve`` and ``configs/serve.yaml``."""
ENCODER_DEPLOYMENT = "FeaturesEncoder"
INGRESS_DEPLOYMENT = "FeaturesIngress"
API_KEY_ENV = "LLAVA_FEATURES_API_KEY"
SECTION_ARGS = ("decode", "encoder", "job", "serve")
"""``build_app`` args that override a config section."""
BUILD_ARGS = ("config", "model", *SECTION_ARGS, "make_tiny_if_missing", "ray_actor_options")
DEFAULT_ENCODER_CPUS = 1.0
DEFAULT_INGRESS_CPUS = 0.5
INGRESS_MIN_ONGOING = 64
"""Fewest concurrent requests an ingress replica accepts (each holds at most serve.max_body_bytes)."""

_LATENCY_MS_BOUNDARIES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000]
_BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


@dataclass
class EncodeResult:
    """What an encoder replica returns for one image (crosses the handle, so plain data)."""

    ok: bool
    image_id: str | None
    fingerprint: str
    features: np.ndarray | None = None
    """(tokens, dim) in ``dtype`` (bfloat16 as its uint16 bit pattern); None for ``want="pooled"``."""
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


def _histogram(name: str, description: str, boundaries: list[float], tag_keys: tuple[str, ...] = ()) -> Any:
    from ray.serve.metrics import Histogram

    return Histogram(name, description=description, boundaries=boundaries, tag_keys=tag_keys)


def _counter(name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
    from ray.serve.metrics import Counter as RayCounter

    return RayCounter(name, description=description, tag_keys=tag_keys)


# -- the encoder deployment ---------------------------------------------------------------------


class FeaturesEncoderImpl:
    """One CLIPVisionTower + projector per replica, with dynamic batching (``FeaturesEncoder``)."""

    def __init__(self, config: Config) -> None:
        from pipeline.encoder import FeatureEncoder

        self.config = config
        self.encoder = FeatureEncoder(config)
        self.fingerprint = self.encoder.fingerprint
        self.model_id = model_id(config)
        self.encode_batch.set_max_batch_size(config.serve.max_batch_size)
        self.encode_batch.set_batch_wait_timeout_s(config.serve.batch_wait_timeout_s)
        warm_s = self.encoder.warmup(1)
        if self.encoder.device.type == "cuda" and config.serve.max_batch_size > 1:
            warm_s += self.encoder.warmup(config.serve.max_batch_size)
        try:
            import ray

            self.replica = ray.get_runtime_context().get_actor_name() or "local"
        except Exception:  # outside Ray (unit use)
            self.replica = "local"
        self._batch_sizes: Counter[int] = Counter()
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
        logger.info(
            "Encoder replica %s ready (fingerprint %s, warmup %.2fs)",
            self.replica,
            self.fingerprint[:12],
            warm_s,
        )

    def _count(self, result: str) -> None:
        self._results[result] += 1
        self._m_images.inc(tags={"result": result})

    async def encode(
        self, data: bytes, image_id: str | None = None, want: str = "features", *, count: bool = True
    ) -> EncodeResult:
        """One image → its features (``want="features"``) or pooled vector (``want="pooled"``).

        Undecodable inputs come back as ``ok=False`` results with the decode guard's code.
        ``count=False`` (health checks) leaves the per-result counters alone.
        """
        started = time.perf_counter()
        try:
            prepared = await asyncio.to_thread(self.encoder.encode_pre, data, image_id)
        except DecodeError as exc:
            if count:
                self._count(str(exc.code))
            return EncodeResult(
                False, image_id, self.fingerprint, error_code=str(exc.code), error_message=exc.message
            )
        queued = time.perf_counter()
        self._m_decode.observe((queued - started) * 1000)
        features, pooled = await self.encode_batch((prepared.pixels, queued))
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
        """Several images in one call; they join the same batches. Per-item failures don't fail the call."""
        return list(await asyncio.gather(*(self.encode(data, image_id, want) for data, image_id in items)))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def encode_batch(
        self, items: list[tuple[np.ndarray, float]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """uint8 (3,H,W) images queued by ``encode`` → [(features, pooled)] from one forward pass."""
        started = time.perf_counter()
        size = len(items)
        self._batch_sizes[size] += 1
        self._m_batch.observe(size)
        for _, queued in items:
            self._m_queue.observe((started - queued) * 1000)
        pixels = np.stack([p for p, _ in items])
        features, pooled = await asyncio.to_thread(self._forward, pixels)
        self._m_forward.observe((time.perf_counter() - started) * 1000)
        return [(features[i], pooled[i]) for i in range(size)]

    def _forward(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.encoder.encode_post(self.encoder.encode_core(pixels), pooled=True)
        assert out.features is not None and out.pooled is not None
        return out.features, out.pooled

    async def healthz(self) -> dict[str, Any]:
        """A real request's path on a generated image: decode, batch, forward, host copy. The ingress
        encodes the result into a response as it would for ``/v1/features``."""
        started = time.perf_counter()
        result = await self.encode(_health_image(self.encoder.input_shape[1:]), "healthz", count=False)
        return {
            "replica": self.replica,
            "fingerprint": self.fingerprint,
            "forward_ms": round((time.perf_counter() - started) * 1000, 3),
            "result": result,
        }

    async def info(self) -> dict[str, Any]:
        """Model card: ``FeatureEncoder.info()`` with the API key masked, plus the model id."""
        info = self.encoder.info()
        info["config"] = redacted_config(self.config)
        return {"id": self.model_id, "replica": self.replica, "started": int(self._started), **info}

    async def stats(self) -> dict[str, Any]:
        """This replica's counters: histogram of batch sizes ({size: batches}) and results."""
        batches = sum(self._batch_sizes.values())
        images = sum(size * n for size, n in self._batch_sizes.items())
        return {
            "replica": self.replica,
            "batch_sizes": {str(k): v for k, v in sorted(self._batch_sizes.items())},
            "batches": batches,
            "images": images,
            "mean_batch_size": images / batches if batches else 0.0,
            "max_batch_size": max(self._batch_sizes, default=0),
            "results": dict(self._results),
        }

    async def reset_stats(self) -> None:
        self._batch_sizes.clear()
        self._results.clear()


def _health_image(size: tuple[int, int]) -> bytes:
    """A small PNG of the encoder's input size (mid-grey with a gradient) for health checks."""
    import io

    from PIL import Image

    height, width = size
    ramp = np.linspace(0, 255, width, dtype=np.uint8)
    pixels = np.repeat(np.repeat(ramp[None, :, None], height, axis=0), 3, axis=2)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# -- the ingress deployment -------------------------------------------------------------------


def _bool_param(value: str | None, name: str) -> bool:
    if value is None or value == "":
        return False
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise RequestError(f"Query parameter {name!r} must be true or false, not {value!r}")


class FeaturesIngressImpl:
    """HTTP API in front of the encoder deployment (``FeaturesIngress``)."""

    def __init__(self, encoder: DeploymentHandle, config: Config) -> None:
        self.encoder = encoder
        self.config = config
        self.limits = config.serve
        self.api_key = config.serve.api_key or os.environ.get(API_KEY_ENV) or None
        self.model_id = model_id(config)
        self._m_requests = _counter(
            "llava_features_http_requests", "HTTP requests by route and status.", ("route", "status")
        )
        self._m_latency = _histogram(
            "llava_features_http_latency_ms",
            "HTTP request latency by route (ms).",
            _LATENCY_MS_BOUNDARIES,
            ("route",),
        )

    # -- plumbing ------------------------------------------------------------------------------

    async def _run(
        self, request: Request, route: str, handler: Callable[[], Awaitable[Response]]
    ) -> Response:
        """Auth, timeout, error → response mapping and metrics around one route handler."""
        started = time.perf_counter()
        status = 499  # client went away (the task was cancelled)
        try:
            try:
                if route != "/healthz":
                    http.check_api_key(request, self.api_key)
                async with asyncio.timeout(self.limits.request_timeout_s):
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

    async def _call(self, method: str, *args: Any) -> Any:
        """Call the encoder deployment; backpressure and dead replicas become 503s."""
        try:
            return await getattr(self.encoder, method).remote(*args)
        except BackPressureError as exc:
            raise RequestError(
                f"Server overloaded ({exc.message}); retry later", code=ErrorCode.OVERLOADED
            ) from exc
        except (DeploymentUnavailableError, RayActorError) as exc:
            raise RequestError(
                f"Encoder unavailable ({type(exc).__name__}); retry later", code=ErrorCode.UNAVAILABLE
            ) from exc

    async def _encode_items(self, items: list[tuple[bytes, str | None]], want: str) -> list[EncodeResult]:
        """Items in chunks of ``max_batch_size`` (one handle call each, spread over replicas)."""
        step = max(1, self.limits.max_batch_size)
        chunks = [items[i : i + step] for i in range(0, len(items), step)]
        outcomes = await asyncio.gather(
            *(self._call("encode_many", chunk, want) for chunk in chunks), return_exceptions=True
        )
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures and len(failures) == len(outcomes):
            raise failures[0]  # nothing got through (overloaded, encoder down): the request fails
        results: list[EncodeResult] = []
        for chunk, outcome in zip(chunks, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome
                err = outcome if isinstance(outcome, LlavaFeaturesError) else LlavaFeaturesError(str(outcome))
                if not isinstance(outcome, LlavaFeaturesError):
                    logger.error("encode_many failed: %r", outcome)
                results.extend(
                    EncodeResult(False, image_id, "", error_code=str(err.code), error_message=err.message)
                    for _, image_id in chunk
                )
            else:
                results.extend(outcome)
        return results

    # -- routes --------------------------------------------------------------------------------

    async def features(self, request: Request) -> Response:
        params = request.query_params
        pooled = _bool_param(params.get("pooled"), "pooled")
        output = http.choose_format(request.headers.get("accept"), params.get("format"))
        images = await http.read_images(request, self.limits.max_body_bytes, max_files=1)
        if not images:
            raise RequestError("No image in the request: send it as the body or as a multipart file part")
        name, data = images[0]
        image_id = params.get("image_id") or name
        result: EncodeResult = await self._call("encode", data, image_id, "pooled" if pooled else "features")
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
        results = await self._encode_items(
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
        results = await self._encode_items(items, "pooled")
        for result in results:
            result.raise_for_error()
        vectors = [r.pooled for r in results if r.pooled is not None]
        return JSONResponse(http.embeddings_body(vectors, requested_model or self.model_id, encoding_format))

    async def models(self, request: Request) -> Response:
        info = await self._call("info")
        card = {
            "id": info["id"],
            "object": "model",
            "created": info["started"],
            "owned_by": "llava-features",
            **info,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def healthz(self, request: Request) -> Response:
        try:
            health = await self._call("healthz")
            result: EncodeResult = health.pop("result")
            result.raise_for_error()
            http.npy_bytes(result.response_array(pooled=False))  # the response a request would get
        except LlavaFeaturesError as exc:
            if exc.code in (ErrorCode.OVERLOADED, ErrorCode.UNAVAILABLE):
                raise
            logger.error("Health check failed: %s", exc)
            raise RequestError(f"Health check failed: {exc.message}", code=ErrorCode.UNAVAILABLE) from exc
        except Exception as exc:  # the forward pass itself failed
            logger.exception("Health check failed")
            raise RequestError(f"Health check failed: {exc}", code=ErrorCode.UNAVAILABLE) from exc
        return JSONResponse({"status": "ok", "model": self.model_id, **health})

    async def debug_stats(self, request: Request) -> Response:
        return JSONResponse(await self._call("stats"))

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


# The deployments wrap classes that stay importable under their own names, so replicas import this
# module's code instead of receiving pickled copies of it (FastAPI reads the routes' annotations).
FeaturesEncoder = serve.deployment(name=ENCODER_DEPLOYMENT)(FeaturesEncoderImpl)
FeaturesIngress = serve.deployment(name=INGRESS_DEPLOYMENT)(serve.ingress()(FeaturesIngressImpl))


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


def with_api_key_from_env(config: Config) -> Config:
    """``serve.api_key`` from ``LLAVA_FEATURES_API_KEY`` when the config has none."""
    key = os.environ.get(API_KEY_ENV)
    if config.serve.api_key or not key:
        return config
    return dataclasses.replace(config, serve=dataclasses.replace(config.serve, api_key=key))


def deployment_options(
    config: Config, ray_actor_options: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """``.options()`` of both deployments derived from ``config.serve`` (returned for inspection)."""
    s = config.serve  # ranges and the replica ordering were checked when the config was loaded
    extra = dict(ray_actor_options or {})
    unknown = sorted(set(extra) - {"encoder", "ingress"})
    if unknown:
        raise ConfigError(f"ray_actor_options takes 'encoder' and 'ingress', not {unknown}")
    gpus = s.num_gpus_per_replica if s.num_gpus_per_replica is not None else (1 if _cluster_has_gpus() else 0)
    # A replica must accept at least a full batch of concurrent requests, or batches never fill.
    per_replica = max(s.max_ongoing_requests, s.max_batch_size)
    queued = s.max_queued_requests if s.max_queued_requests >= 0 else per_replica * s.max_replicas
    backpressure = {"status_code": 503, "retry_after_s": http.RETRY_AFTER_S}
    encoder = {
        "autoscaling_config": {
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "initial_replicas": s.initial_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        },
        "max_ongoing_requests": per_replica,
        "max_queued_requests": s.max_queued_requests,
        "backpressure_config": backpressure,
        "ray_actor_options": {
            "num_cpus": DEFAULT_ENCODER_CPUS,
            "num_gpus": gpus,
            **(extra.get("encoder") or {}),
        },
    }
    # The ingress only awaits I/O: it takes twice what the encoders can hold and queue (and at
    # least INGRESS_MIN_ONGOING, which bounds the request bodies it holds), so that the encoders'
    # max_queued_requests decides when to answer 503 (with our JSON error body); the ingress's own
    # queue at the proxy is the last guard (the proxy's plain-text 503).
    ingress = {
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": max(1, s.max_replicas),
            "initial_replicas": 1,
            "target_ongoing_requests": per_replica,
        },
        "max_ongoing_requests": max(INGRESS_MIN_ONGOING, 2 * (per_replica * s.max_replicas + queued)),
        "max_queued_requests": s.max_queued_requests,
        "backpressure_config": backpressure,
        "ray_actor_options": {"num_cpus": DEFAULT_INGRESS_CPUS, **(extra.get("ingress") or {})},
    }
    return {"encoder": encoder, "ingress": ingress}


def build_app_from_config(config: Config, *, ray_actor_options: dict[str, Any] | None = None) -> Application:
    """The bound application (ingress → encoder) for a resolved config."""
    config = with_api_key_from_env(config)
    options = deployment_options(config, ray_actor_options)
    encoder = FeaturesEncoder.options(**options["encoder"]).bind(config)
    return FeaturesIngress.options(**options["ingress"]).bind(encoder, config)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve application builder (``import_path: deployments.app:build_app``); see the module docstring."""
    args = dict(args or {})
    config = resolve_app_config(args)
    logger.info("Building %s for %s", APP_NAME, config.model.checkpoint or config.model.vision_tower)
    app = build_app_from_config(config, ray_actor_options=args.get("ray_actor_options"))
    announce(APP_NAME)  # serve run / serve deploy: where the proxy listens
    return app
