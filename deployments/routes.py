"""The HTTP API's routes (the API is in docs/serving.md): each a handler of one replica's
:class:`~deployments.replica.FeaturesEncoderImpl`, put behind the thin router
(:func:`build_router`). The handlers parse the request and shape the response; auth, admission,
timeouts and errors are the router's."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pipeline.model.errors import ErrorCode, LlavaFeaturesError, RequestError

from . import http
from .router import Route, Router

if TYPE_CHECKING:
    from .replica import FeaturesEncoderImpl

logger = logging.getLogger(__name__)


def bool_param(value: str | None, name: str) -> bool:
    """A true/false query parameter (absent or empty: false); anything else is a 400."""
    if value is None or value == "":
        return False
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise RequestError(f"Query parameter {name!r} must be true or false, not {value!r}")


class Routes:
    """The route handlers of one replica."""

    def __init__(self, replica: FeaturesEncoderImpl) -> None:
        self.replica = replica
        self.limit = replica.limits.max_body_bytes

    async def features(self, request: Request) -> Response:
        """One image → its features (npy or JSON) or pooled vector."""
        r = self.replica
        params = request.query_params
        pooled = bool_param(params.get("pooled"), "pooled")
        output = http.choose_format(request.headers.get("accept"), params.get("format"))
        images = await http.read_images(request, self.limit, max_files=1)
        if not images:
            raise RequestError("No image in the request: send it as the body or as a multipart file part")
        name, data = images[0]
        image_id = params.get("image_id") or name
        result = await r.encode(data, image_id, "pooled" if pooled else "features")
        result.raise_for_error()
        array = result.response_array(pooled)
        if output == "json":
            return JSONResponse(
                {
                    "image_id": result.image_id,
                    "width": result.width,
                    "height": result.height,
                    "model": r.model_id,
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
        """Several images (multipart file parts) → a JSON list, one item per part."""
        pooled = bool_param(request.query_params.get("pooled"), "pooled")
        if http.media_type(request) != "multipart/form-data":
            raise RequestError(
                "/v1/features:batch takes a multipart/form-data body with one file part per image",
                code=ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            )
        files = await http.read_multipart_files(request, self.limit)
        if not files:
            raise RequestError("No file parts in the multipart body")
        results = await self.replica.encode_many(
            [(data, name) for name, data in files], "pooled" if pooled else "features"
        )
        fingerprint = next((r.fingerprint for r in results if r.ok), "")
        body = [r.item(pooled) for r in results]
        return JSONResponse(body, headers={"X-Model-Fingerprint": fingerprint} if fingerprint else None)

    async def embeddings(self, request: Request) -> Response:
        """OpenAI's embeddings API over data-URL images (pooled vectors)."""
        body = await http.read_json(request, self.limit)
        inputs, encoding_format, requested_model = http.embedding_inputs(body)
        items = [
            (http.image_from_data_url(value, f"input[{i}]"), f"input[{i}]") for i, value in enumerate(inputs)
        ]
        results = await self.replica.encode_many(items, "pooled")
        for result in results:
            result.raise_for_error()
        vectors = [r.pooled for r in results if r.pooled is not None]
        return JSONResponse(
            http.embeddings_body(vectors, requested_model or self.replica.model_id, encoding_format)
        )

    async def models(self, request: Request) -> Response:
        """The served model's card (OpenAI's model list shape)."""
        info = await self.replica.info()
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
        r = self.replica
        started = time.perf_counter()
        try:
            result = await r.encode(r.health_png, "healthz", count=False)
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
                "model": r.model_id,
                "replica": r.replica,
                "fingerprint": r.fingerprint,
                "anyres_output": r.anyres,
                "forward_ms": round((time.perf_counter() - started) * 1000, 3),
            }
        )

    async def debug_stats(self, request: Request) -> Response:
        """This replica's counters."""
        return JSONResponse(await self.replica.stats())


def build_router(replica: FeaturesEncoderImpl) -> Router:
    """The replica's routes behind the thin router."""
    from pipeline import __version__

    routes = Routes(replica)
    return Router(
        [
            Route("POST", "/v1/features", routes.features, encodes=True, summary="One image's features"),
            Route(
                "POST",
                "/v1/features:batch",
                routes.features_batch,
                encodes=True,
                summary="Several images' features",
            ),
            Route("POST", "/v1/embeddings", routes.embeddings, encodes=True, summary="OpenAI embeddings"),
            Route("GET", "/v1/models", routes.models, summary="The served model"),
            Route(
                "GET", "/healthz", routes.healthz, encodes=True, public=True, summary="A real forward pass"
            ),
            Route("GET", "/debug/stats", routes.debug_stats, summary="This replica's counters"),
        ],
        limits=replica.limits,
        api_key=replica.api_key,
        admission=replica.admission,
        observe=replica.metrics.request,
        version=__version__,
    )
