"""Where the endpoint listens: the address of Serve's HTTP proxy, as the running Serve controller
knows it, announced when the application is built and when ``llava-features serve`` is up.

``serve run configs/serve.yaml`` and ``serve deploy`` build the application in a Ray task on the
cluster (``build_app``), whose only visible log is Serve's own logger (``ray.serve``): the
announcement goes through that logger, so it reaches the terminal of ``serve run`` (and the
build task's log under ``serve deploy``). The address comes from the controller, not from our
``serve:`` section, because the Serve config file's ``http_options`` (or the Serve instance
already running on a cluster) decide where the proxy listens.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

SERVE_LOGGER = "ray.serve"
"""Serve's logger: the one Serve configures in the processes it runs (the build task, replicas)."""
ROUTES = "POST /v1/features, /v1/features:batch, /v1/embeddings; GET /v1/models, /healthz"
"""The routes of the application, for the announcement (the API is in docs/serving.md)."""
_ANY_ADDRESS = ("0.0.0.0", "::", "")


def proxy_url() -> str | None:
    """``http://host:port`` of Serve's HTTP proxy, from the running Serve controller; None when Serve is
    not running here (or its controller cannot be asked)."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        if client is None:
            return None
        options = client.http_config
        host, port = options.host, int(options.port)
    except Exception as exc:  # best effort: an announcement never fails a deployment
        logger.debug("could not ask the Serve controller for its HTTP options: %s", exc)
        return None
    return f"http://{'0.0.0.0' if host in _ANY_ADDRESS else host}:{port}"


def announce(app_name: str, route_prefix: str = "/", *, ready: bool = False) -> str | None:
    """Log where application ``app_name`` answers (on Serve's logger, see the module docstring);
    returns the URL (None when Serve's address is unknown). ``ready``: the application is already
    running (``llava-features serve``), else it is being built (``serve run`` / ``serve deploy``)."""
    base = proxy_url()
    serve_logger = logging.getLogger(SERVE_LOGGER)
    if base is None:
        serve_logger.info(
            "%s will answer on Serve's HTTP proxy (http_options of the Serve config): %s", app_name, ROUTES
        )
        return None
    url = base + (route_prefix.rstrip("/") if route_prefix else "")
    note = " (every interface)" if "://0.0.0.0:" in url else ""
    when = "listens" if ready else "will listen, once its replicas are up (`serve status`),"
    serve_logger.info("%s %s on %s%s: %s", app_name, when, url, note, ROUTES)
    return url
