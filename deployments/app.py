"""The Ray Serve application: one deployment, ``FeaturesEncoder``, whose replicas serve the HTTP API
and encode (online requests and the offline job's files), and ``build_app``, its builder.

Each replica (:class:`deployments.replica.FeaturesEncoderImpl`) holds one
:class:`pipeline.encoder.FeatureEncoder` (CLIP vision tower + projector, one GPU when the cluster
has GPUs) and answers HTTP itself (:mod:`deployments.routes` behind :mod:`deployments.router`), so
a request goes proxy → replica and its features are copied once. A request in progress on a replica
that dies cannot be answered by us: Ray Serve's proxy answers it (plain-text 500); a request that
finds no replica running waits in the proxy up to its ``http_options.request_timeout_s``
(:func:`deployments.build.proxy_request_timeout_s`).

Autoscaled between ``serve.min_replicas`` and ``serve.max_replicas`` on both doors' load
(:mod:`deployments.autoscaling`).

``build_app(args)`` is the application builder named by ``configs/serve.yaml``
(``import_path: deployments.app:build_app``), so ``serve run configs/serve.yaml`` / ``serve
deploy`` and ``llava-features serve`` run the same thing; its ``args`` are described in
:mod:`deployments.build`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ray import serve

from pipeline.config import Config
from pipeline.constants import SERVE_ENCODER_DEPLOYMENT

from .build import deployment_options, resolve_app_config, with_api_key_from_env
from .listen import announce
from .replica import FeaturesEncoderImpl

if TYPE_CHECKING:
    from ray.serve.deployment import Application

logger = logging.getLogger(__name__)

APP_NAME = "llava-features"
"""Application name used by ``llava-features serve`` and ``configs/serve.yaml``."""
ENCODER_DEPLOYMENT = SERVE_ENCODER_DEPLOYMENT
"""The one deployment: its replicas serve HTTP and encode (online requests and offline files)."""

# The deployment wraps a class that stays importable under its own name, so replicas import its
# module's code instead of receiving a pickled copy of it.
FeaturesEncoder = serve.deployment(name=ENCODER_DEPLOYMENT)(serve.ingress()(FeaturesEncoderImpl))


def build_app_from_config(config: Config, *, ray_actor_options: dict[str, Any] | None = None) -> Application:
    """The bound application (one deployment, its own HTTP ingress) for a resolved config."""
    config = with_api_key_from_env(config)
    options = deployment_options(config, ray_actor_options)
    return FeaturesEncoder.options(**options["encoder"]).bind(config)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve application builder (``import_path: deployments.app:build_app``); see :mod:`deployments.build`."""
    args = dict(args or {})
    config = resolve_app_config(args)
    logger.info("Building %s for %s", APP_NAME, config.model.checkpoint or config.model.vision_tower)
    app = build_app_from_config(config, ray_actor_options=args.get("ray_actor_options"))
    announce(APP_NAME)  # serve run / serve deploy: where the proxy listens
    return app
