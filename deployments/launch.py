"""``llava-features serve``: run the Serve application and block until interrupted (the CLI calls :func:`serve_forever`).

Connects to the Ray cluster named by ``RAY_ADDRESS``, or starts a local one when it is unset;
starts Serve's HTTP proxy on ``serve.host:serve.port`` (``--host``/``--port``; its own request
timeout a little above ``serve.request_timeout_s``: :func:`deployments.app.proxy_request_timeout_s`), deploys
:func:`deployments.app.build_app_from_config` as the application ``llava-features`` and waits.
Ctrl-C (or SIGTERM) shuts Serve down again (on a cluster we did not start, only our application
is deleted).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

from pipeline.config import Config

logger = logging.getLogger(__name__)


def serve_forever(config: Config) -> int:
    """Deploy the application for ``config`` and serve until interrupted. Returns the exit code."""
    import ray
    from ray import serve

    from .app import APP_NAME, build_app_from_config, proxy_request_timeout_s
    from .listen import ROUTES, announce

    address = os.environ.get("RAY_ADDRESS") or None
    started_ray = not ray.is_initialized() and address is None
    if not ray.is_initialized():
        ray.init(address=address or "local", namespace="serve")
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = (
        signal.signal(signal.SIGTERM, _on_signal)
        if threading.current_thread() is threading.main_thread()
        else None
    )
    try:
        serve.start(
            http_options={
                "host": config.serve.host,
                "port": config.serve.port,
                "request_timeout_s": proxy_request_timeout_s(config),
            }
        )
        app = build_app_from_config(config)
        serve.run(app, name=APP_NAME, route_prefix=config.serve.route_prefix)
        # Where Serve's proxy really listens (on a cluster whose Serve was already running, its own
        # http_options win over --host/--port).
        url = announce(APP_NAME, config.serve.route_prefix, ready=True)
        if url is None:
            prefix = config.serve.route_prefix.rstrip("/")
            url = f"http://{config.serve.host}:{config.serve.port}{prefix}"
            logger.info("Serving %s on %s: %s", APP_NAME, url, ROUTES)
        logger.info("Ctrl-C to stop.")
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        logger.info("Shutting down %s", APP_NAME)
        try:
            if started_ray:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        except Exception:  # best effort: the cluster may already be gone
            logger.exception("Error while stopping Serve")
        if started_ray:
            ray.shutdown()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0
