"""Building the application: our :class:`~pipeline.config.Config` from ``build_app``'s args, and the
deployment's options (autoscaling, limits, actor resources) derived from its ``serve`` section.

``build_app``'s args (``configs/serve.yaml``'s ``args``; see :mod:`deployments.app`):

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
    ``{"encoder": {...}}`` merged over the replicas' defaults (1 CPU and
    ``serve.num_gpus_per_replica`` GPUs). There is no separate ingress deployment, so an
    ``ingress`` key is an error that says so.

Relative paths are resolved against the working directory of the process that builds the app
(the directory ``serve run`` / ``llava-features serve`` was started from).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import Config, config_to_dict, load_config
from pipeline.model.errors import ConfigError

from . import http
from .autoscaling import autoscaling_config

logger = logging.getLogger(__name__)

API_KEY_ENV = "LLAVA_FEATURES_API_KEY"
SECTION_ARGS = ("decode", "encoder", "job", "serve")
"""``build_app`` args that override a config section."""
BUILD_ARGS = ("config", "model", *SECTION_ARGS, "make_tiny_if_missing", "ray_actor_options")
ACTOR_OPTION_KEYS = ("encoder",)
"""Keys of ``build_app``'s ``ray_actor_options``: one per deployment."""
DEFAULT_ENCODER_CPUS = 1.0
MIN_SERVE_ONGOING = 64
"""Fewest requests Ray Serve hands a replica at once (those past our own admission limit are
answered 503 by the replica, in our JSON shape, instead of waiting in the proxy)."""
UPLOADS_PER_REPLICA = 1024
"""Requests Serve hands a replica beyond that, for bodies still arriving: a request takes an
admission slot only once its body is in (``deployments.router``), so slow uploads wait here, each
for at most ``serve.body_timeout_s``, instead of keeping other requests out."""
PROXY_TIMEOUT_MARGIN_S = 5.0
"""Seconds past ``serve.request_timeout_s`` + ``serve.body_timeout_s`` after which Serve's proxy gives
up on a request itself (``http_options.request_timeout_s``, a plain-text 408): our own 408/504 come
first; the proxy's limit bounds the wait of a request that finds no replica running (nobody of ours
to answer it)."""
SHUTDOWN_POLL_S = 0.2
"""How often a stopping replica checks whether its requests in progress are done (Serve's
``graceful_shutdown_wait_loop_s``; its default, 2 s, is added to every replica's stop)."""


def decode_budget(config: Config) -> int:
    """``serve.max_decode_pixels``, or ``decode.max_image_pixels`` when unset; never below the latter
    (an image the decode guard accepts must fit the budget), checked with an error naming both keys."""
    budget = config.serve.max_decode_pixels
    if budget is None:
        return config.decode.max_image_pixels
    if budget < config.decode.max_image_pixels:
        raise ConfigError(
            f"serve.max_decode_pixels ({budget}) must be at least decode.max_image_pixels "
            f"({config.decode.max_image_pixels}): an image the decode guard accepts must fit the budget"
        )
    return budget


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


def proxy_request_timeout_s(config: Config) -> float:
    """``http_options.request_timeout_s`` for Serve's proxy: ``serve.body_timeout_s`` +
    ``serve.request_timeout_s`` plus a margin."""
    return config.serve.body_timeout_s + config.serve.request_timeout_s + PROXY_TIMEOUT_MARGIN_S


def with_api_key_from_env(config: Config) -> Config:
    """``serve.api_key`` from ``LLAVA_FEATURES_API_KEY`` when the config has none."""
    key = os.environ.get(API_KEY_ENV)
    if config.serve.api_key or not key:
        return config
    return dataclasses.replace(config, serve=dataclasses.replace(config.serve, api_key=key))


def deployment_options(
    config: Config, ray_actor_options: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """``.options()`` of the deployment derived from ``config.serve``, as ``{"encoder": {...}}``
    (returned for inspection); ``ray_actor_options`` is ``{"encoder": {...}}``."""
    s = config.serve  # ranges and the replica ordering were checked when the config was loaded
    extra = dict(ray_actor_options or {})
    if "ingress" in extra:
        raise ConfigError(
            "ray_actor_options: there is no ingress deployment any more (the encoder replicas serve "
            "HTTP themselves); pass {'encoder': {...}} only, e.g. {'encoder': {'num_cpus': 2}}"
        )
    unknown = sorted(set(extra) - set(ACTOR_OPTION_KEYS))
    if unknown:
        raise ConfigError(f"ray_actor_options takes {list(ACTOR_OPTION_KEYS)}, not {unknown}")
    decode_budget(config)  # serve.max_decode_pixels against decode.max_image_pixels, at build time
    gpus = s.num_gpus_per_replica if s.num_gpus_per_replica is not None else (1 if _cluster_has_gpus() else 0)
    # A replica works on at least a full batch of requests at once, or batches never fill, and holds
    # max_queued_requests more waiting (Admission); past that it answers 503 itself, in our JSON
    # shape. Ray Serve hands a replica more than that (those extra are refused by the replica at
    # once) plus room for uploads still arriving, so that its own queue at the proxy, whose 503 is
    # plain text, is only the last guard: it holds as many as a replica is handed (a burst waits there
    # for a replica to be chosen, so a queue as short as ours would shed a burst in plain text before
    # any replica saw it).
    per_replica = max(s.max_ongoing_requests, s.max_batch_size)
    admitted = per_replica + s.max_queued_requests if s.max_queued_requests >= 0 else 2 * per_replica
    handed = max(MIN_SERVE_ONGOING, 2 * admitted) + UPLOADS_PER_REPLICA
    encoder = {
        "autoscaling_config": autoscaling_config(config),
        "graceful_shutdown_timeout_s": s.shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": SHUTDOWN_POLL_S,
        "max_ongoing_requests": handed,
        "max_queued_requests": handed if s.max_queued_requests >= 0 else -1,
        "backpressure_config": {"status_code": 503, "retry_after_s": http.RETRY_AFTER_S},
        "ray_actor_options": {
            "num_cpus": DEFAULT_ENCODER_CPUS,
            "num_gpus": gpus,
            **(extra.get("encoder") or {}),
        },
    }
    return {"encoder": encoder}
