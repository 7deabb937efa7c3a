"""``llava-features serve``: run the Serve application and block until stopped (the CLI calls :func:`serve_forever`).

Connects to the Ray cluster named by ``RAY_ADDRESS``, or starts a local one when it is unset;
starts Serve's HTTP proxy on ``serve.host:serve.port`` (``--host``/``--port``; its own request
timeout a little above ours: :func:`deployments.build.proxy_request_timeout_s`), deploys
:func:`deployments.app.build_app_from_config` as the application ``llava-features``, prints where it
listens and the command that sends an offline job through its replicas (:func:`job_command`), and
waits.

SIGTERM or SIGINT (Ctrl-C) stops it (:func:`stop`): the application is deleted first, so Serve stops
routing to its replicas and each replica lets its requests in progress finish (at most
``serve.shutdown_timeout_s``); then Serve and the local Ray this process started are shut down
(on a cluster we did not start, only our application is deleted). A second signal skips the wait.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

from pipeline.config import Config

logger = logging.getLogger(__name__)

DELETE_POLL_S = 0.1
"""How often the stop checks whether Serve has removed the application."""
DELETE_MARGIN_S = 5.0
"""Seconds past ``serve.shutdown_timeout_s`` the stop waits for Serve to remove the application."""
AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")
"""Ray's token-auth settings a client of this cluster needs as this process has them (``ray.init``
sets ``RAY_AUTH_MODE=token`` for a local cluster; the token itself is never printed)."""


def job_command(app_name: str, gcs_address: str, environ: dict[str, str] | None = None) -> str:
    """The command line that sends an offline job through application ``app_name``'s replicas on
    the cluster at ``gcs_address``, from another shell: Ray's auth variables, ``--address`` and
    ``--serve-app`` (the caller adds ``--model``/``--config``, ``--input`` and ``--output``)."""
    env = os.environ if environ is None else environ
    prefix = [f"{name}={env[name]}" for name in AUTH_VARIABLES if env.get(name)]
    return " ".join([*prefix, "llava-features encode", f"--address {gcs_address}", f"--serve-app {app_name}"])


class _Signals:
    """SIGTERM and SIGINT while serving: the first asks for a stop, the second for a quick one."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.hurry = threading.Event()
        self._previous: dict[int, object] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stop.is_set():
            logger.warning("Second signal: not waiting for requests in progress")
            self.hurry.set()
        self.stop.set()

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]


def stop(app_name: str, config: Config, *, started_ray: bool, hurry: threading.Event) -> float:
    """Stop serving (see the module docstring); returns the seconds it took."""
    import ray
    from ray import serve

    started = time.monotonic()
    try:
        serve.delete(app_name, _blocking=False)
        deadline = started + config.serve.shutdown_timeout_s + DELETE_MARGIN_S
        while time.monotonic() < deadline and not hurry.is_set():
            if app_name not in serve.status().applications:
                break
            time.sleep(DELETE_POLL_S)
        if started_ray:
            serve.shutdown()
    except Exception:  # best effort: the cluster may already be gone
        logger.exception("Error while stopping Serve")
    if started_ray:
        ray.shutdown()
    return time.monotonic() - started


def serve_forever(config: Config) -> int:
    """Deploy the application for ``config`` and serve until stopped. Returns the exit code."""
    import ray
    from ray import serve

    from .app import APP_NAME, build_app_from_config
    from .build import proxy_request_timeout_s
    from .listen import ROUTES, announce

    address = os.environ.get("RAY_ADDRESS") or None
    started_ray = not ray.is_initialized() and address is None
    if not ray.is_initialized():
        ray.init(address=address or "local", namespace="serve")
    with _Signals() as signals:  # after ray.init, which installs its own SIGTERM handler
        try:
            serve.start(
                http_options={
                    "host": config.serve.host,
                    "port": config.serve.port,
                    "request_timeout_s": proxy_request_timeout_s(config),
                }
            )
            serve.run(build_app_from_config(config), name=APP_NAME, route_prefix=config.serve.route_prefix)
            # Where Serve's proxy really listens (on a cluster whose Serve was already running, its own
            # http_options win over --host/--port).
            url = announce(APP_NAME, config.serve.route_prefix, ready=True)
            if url is None:
                prefix = config.serve.route_prefix.rstrip("/")
                url = f"http://{config.serve.host}:{config.serve.port}{prefix}"
                logger.info("Serving %s on %s: %s", APP_NAME, url, ROUTES)
            logger.info(
                "Offline jobs through these replicas, from another shell: %s, with the same --model or "
                "--config as here, and --input, --output",
                job_command(APP_NAME, ray.get_runtime_context().gcs_address),
            )
            logger.info("Ctrl-C (or SIGTERM) to stop.")
            while not signals.stop.wait(1.0):
                pass
        finally:
            logger.info("Shutting down %s", APP_NAME)
            seconds = stop(APP_NAME, config, started_ray=started_ray, hurry=signals.hurry)
            logger.info("Stopped in %.1fs", seconds)
    return 0
