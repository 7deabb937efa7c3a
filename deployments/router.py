"""A thin ASGI router in front of the replica's routes: matching, the API key, admission, the body
deadline, the request timeout, errors → responses and per-request metrics. No web framework:
a route is a method, a path and an ``async (Request) -> Response`` handler.

A request to a route that encodes images goes:

1. the API key (unless the route is public), before anything else;
2. a refusal at once (503 ``overloaded``) when the replica's admission is already full, before the
   body is read;
3. its body, read whole within ``serve.body_timeout_s`` (408 ``body_timeout`` otherwise) and
   ``serve.max_body_bytes`` (413), holding no admission slot: a client that trickles or stalls its
   upload cannot keep other requests out;
4. an admission slot (:class:`~deployments.scheduling.Admission`), then the handler, within
   ``serve.request_timeout_s`` (504 ``timeout``).

Unknown paths get 404 ``not_found`` (listing the routes), other methods 405 ``method_not_allowed``
with ``Allow``, in our error shape; ``GET /openapi.json`` lists the routes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pipeline.model.errors import ErrorCode, LlavaFeaturesError, RequestError

from . import http
from .scheduling import Admission

if TYPE_CHECKING:
    from pipeline.config import ServeConfig

logger = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]
OPENAPI_PATH = "/openapi.json"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    encodes: bool = False
    """It decodes and encodes images: its body is read first, then it takes an admission slot."""
    public: bool = False
    """Answered without the API key (the health check)."""
    summary: str = ""


def route_path(scope: dict[str, Any]) -> str:
    """The request's path below the application's route prefix (Serve puts the prefix in ``root_path``)."""
    path: str = scope["path"]
    root = scope.get("root_path") or ""
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


def _replay(scope: dict[str, Any], body: bytes, receive: Callable[[], Awaitable[Any]]) -> Request:
    """A request whose body, already read, is handed over again; later receives are the client's."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return await receive()  # type: ignore[no-any-return]
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, replay)


class Router:
    """The ASGI app of one replica (see the module docstring)."""

    def __init__(
        self,
        routes: list[Route],
        *,
        limits: ServeConfig,
        api_key: str | None,
        admission: Admission,
        observe: Callable[[str, int, float], None],
        title: str = "llava-features",
        version: str = "",
    ) -> None:
        self.limits = limits
        self.api_key = api_key
        self.admission = admission
        self.observe = observe
        """Called with (route, status, milliseconds) once per request answered by a route."""
        self._routes: dict[str, dict[str, Route]] = {}
        for route in routes:
            self._routes.setdefault(route.path, {})[route.method] = route
        self._openapi = {
            "openapi": "3.1.0",
            "info": {"title": title, "version": version},
            "paths": {
                r.path: {r.method.lower(): {"summary": r.summary}} for r in routes if r.path != OPENAPI_PATH
            },
        }
        self._routes.setdefault(OPENAPI_PATH, {})["GET"] = Route("GET", OPENAPI_PATH, self._openapi_doc)
        self._listing = ", ".join(
            f"{method} {path}"
            for path, methods in self._routes.items()
            for method in methods
            if path != OPENAPI_PATH
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = route_path(scope)
        methods = self._routes.get(path)
        method = scope["method"]
        if methods is None:
            error = RequestError(
                f"No route {method} {path}; routes: {self._listing}", code=ErrorCode.NOT_FOUND
            )
            await http.error_response(error)(scope, receive, send)
            return
        route = methods.get(method)
        if route is None:
            allowed = ", ".join(sorted(methods))
            error = RequestError(
                f"{method} {path} is not allowed; use {allowed}", code=ErrorCode.METHOD_NOT_ALLOWED
            )
            response = http.error_response(error)
            response.headers["Allow"] = allowed
            await response(scope, receive, send)
            return
        started = time.perf_counter()
        status = 499  # the client went away (the task was cancelled)
        try:
            response = await self._respond(route, scope, receive)
            status = response.status_code
            await response(scope, receive, send)
        finally:
            self.observe(route.path, status, (time.perf_counter() - started) * 1000)

    async def _respond(self, route: Route, scope: dict[str, Any], receive: Any) -> Response:
        request = Request(scope, receive)
        s = self.limits
        try:
            if not route.public:
                http.check_api_key(request, self.api_key)
            if not route.encodes:
                async with asyncio.timeout(s.request_timeout_s):
                    return await route.handler(request)
            self.admission.check()  # already full: refused at once, its body unread
            try:
                async with asyncio.timeout(s.body_timeout_s):
                    body = await http.read_body(request, s.max_body_bytes)
            except TimeoutError:
                raise RequestError(
                    f"The request body did not arrive within {s.body_timeout_s:g}s",
                    code=ErrorCode.BODY_TIMEOUT,
                ) from None
            async with asyncio.timeout(s.request_timeout_s):
                async with self.admission.slot():
                    return await route.handler(_replay(scope, body, receive))
        except TimeoutError:
            return http.error_response(
                RequestError(f"Request took longer than {s.request_timeout_s:g}s", code=ErrorCode.TIMEOUT)
            )
        except LlavaFeaturesError as exc:
            return http.error_response(exc)
        except Exception:
            logger.exception("Unhandled error on %s", route.path)
            return http.error_response(LlavaFeaturesError("Internal server error", code=ErrorCode.INTERNAL))

    async def _openapi_doc(self, request: Request) -> Response:
        return JSONResponse(self._openapi)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
