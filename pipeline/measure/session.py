"""A local Ray, and Ray Serve on it, for the time of a benchmark: started when none runs, stopped after.

A benchmark that finds this driver already connected to Ray (or a Serve instance already running) uses
it and leaves it running: its own application is deployed beside the others and deleted at the end.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["RaySession", "ServeSession", "free_port", "ray_session", "serve_session"]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class RaySession:
    """The Ray a benchmark runs on."""

    started: bool
    """Whether the benchmark started it (and stops it at the end); False: this driver was connected already."""
    start_s: float
    """Seconds ``ray.init`` took (0 when Ray was running already)."""


@contextlib.contextmanager
def ray_session(**init: Any) -> Iterator[RaySession]:
    """The Ray this driver is connected to, else one started with ``ray.init(**init)`` and shut down at
    the end (also when the benchmark fails)."""
    import ray

    if ray.is_initialized():
        yield RaySession(started=False, start_s=0.0)
        return
    started = time.perf_counter()
    ray.init(**init)
    try:
        yield RaySession(started=True, start_s=time.perf_counter() - started)
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class ServeSession:
    """Where a benchmark's Serve application answers."""

    port: int
    """The HTTP port of Serve's proxy (127.0.0.1)."""
    route_prefix: str
    """The application's route prefix."""
    started: bool
    """Whether the benchmark started Serve (and shuts it down at the end)."""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.route_prefix.rstrip('/')}"


def running_serve_port() -> int | None:
    """The HTTP port of the Serve instance this driver's Ray runs, if one runs."""
    try:
        from ray.serve.context import _get_global_client  # no public API for it

        client = _get_global_client(raise_if_no_controller_running=False)
    except Exception:
        return None
    if client is None:
        return None
    try:
        return int(client.http_config.port)
    except Exception:
        return None


@contextlib.contextmanager
def serve_session(app_name: str, route_prefix: str, *, port: int | None = None) -> Iterator[ServeSession]:
    """Ray Serve for the application ``app_name`` under ``route_prefix`` (deployed by the caller).

    When this driver's Ray runs no Serve, one is started on 127.0.0.1:``port`` (or a free port) and
    shut down at the end; otherwise the running one is used (on ``port`` when given: where its own port
    cannot be found) and ``app_name`` is deleted from it at the end. Needs a running Ray
    (:func:`ray_session`).
    """
    from ray import serve

    running = running_serve_port()
    if running is None:
        port = port or free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            yield ServeSession(port=port, route_prefix=route_prefix, started=True)
        finally:
            serve.shutdown()
        return
    try:
        yield ServeSession(port=port or running, route_prefix=route_prefix, started=False)
    finally:
        serve.delete(app_name)
