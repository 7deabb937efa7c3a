"""The product's configuration: frozen dataclasses, one documented default per field.

``configs/*.yaml`` files only override these defaults; :func:`load_config` merges a YAML file
and explicit overrides (CLI flags) into one resolved :class:`Config`, and :func:`config_to_dict`
gives the JSON-able form recorded in every output.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .model.config import ModelConfig
from .model.errors import ConfigError

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")


@dataclass(frozen=True)
class DecodeConfig:
    """Limits of the decode guard, applied to every input image."""

    max_image_pixels: int = 100_000_000
    """Images declaring more pixels than this are refused as ``too_large`` before decoding."""
    max_bytes: int = 64 * 1024 * 1024
    """Encoded inputs larger than this are refused as ``too_large`` without being opened."""
    min_side: int = 2
    """Images with a side shorter than this many pixels are refused as ``too_small``."""
    allowed_formats: tuple[str, ...] = DEFAULT_FORMATS
    """PIL format names accepted; anything else is ``unsupported_format``."""


@dataclass(frozen=True)
class JobConfig:
    """The offline Ray Data job."""

    features: str = "projected"
    """Which features to write: ``projected``, ``tower`` or ``both``."""
    pooled: bool = False
    """Also write ``pooled``, the mean over tokens of the first written feature, as float32."""
    output_dtype: str | None = None
    """dtype of the stored features: float16 unless the compute dtype is float32 (then float32)."""
    tensor_format: str = "binary"
    """``binary`` (raw bytes in our extension type; fast) or ``fixed_shape_tensor`` (canonical Arrow)."""
    batch_size: int = 32
    """Images per forward pass on an encoder actor."""
    shard_size: int = 256
    """Inputs per output shard (one Parquet file each; the unit of resume)."""
    actors: tuple[int, int] = (1, 1)
    """(min, max) encoder actors in the autoscaling pool."""
    num_gpus_per_actor: float | None = None
    """GPUs per encoder actor; None means 1 when the cluster has GPUs, else 0."""
    num_cpus_per_actor: float = 1.0
    """CPUs reserved by each encoder actor."""
    decode_threads: int = 8
    """Threads per decode task for reading bytes from storage."""
    max_error_fraction: float = 0.01
    """Above this fraction of failed inputs the job exits non-zero (after writing everything)."""
    limit: int | None = None
    """Encode only the first N inputs (in listing order)."""
    s3_endpoint: str | None = None
    """S3 endpoint override (else AWS_ENDPOINT_URL / the AWS default)."""
    compression: str = "none"
    """Parquet compression for the feature files (``none``, ``zstd``, ``lz4``, ``snappy``)."""


@dataclass(frozen=True)
class ServeConfig:
    """The online Ray Serve endpoint."""

    host: str = "127.0.0.1"
    """Address the HTTP proxy binds to."""
    port: int = 8000
    """Port the HTTP proxy listens on."""
    route_prefix: str = "/"
    """Route prefix of the application."""
    max_batch_size: int = 32
    """Largest dynamic batch formed by ``@serve.batch``."""
    batch_wait_timeout_s: float = 0.005
    """How long a batch waits to fill before running."""
    max_ongoing_requests: int = 64
    """Concurrent requests a replica accepts (at least max_batch_size so batches can fill)."""
    max_queued_requests: int = 256
    """Requests queued beyond that before the endpoint answers 503."""
    min_replicas: int = 1
    """Autoscaling: fewest encoder replicas."""
    max_replicas: int = 1
    """Autoscaling: most encoder replicas."""
    initial_replicas: int = 1
    """Autoscaling: replicas at start."""
    target_ongoing_requests: int = 16
    """Autoscaling: ongoing requests per replica that the autoscaler aims for."""
    num_gpus_per_replica: float | None = None
    """GPUs per encoder replica; None means 1 when the cluster has GPUs, else 0."""
    max_body_bytes: int = 32 * 1024 * 1024
    """Largest accepted request body; larger ones get 413 before being read whole."""
    request_timeout_s: float = 30.0
    """Requests taking longer get 504."""
    api_key: str | None = None
    """When set (or LLAVA_FEATURES_API_KEY is), every route but /healthz needs this Bearer token."""


@dataclass(frozen=True)
class Config:
    """Everything a job or an endpoint needs, resolved."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The encoder: checkpoint, layer, projector, dtype, device."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """Decode guard limits."""
    job: JobConfig = field(default_factory=JobConfig)
    """Offline job settings."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """Online endpoint settings."""


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "decode": DecodeConfig,
    "job": JobConfig,
    "serve": ServeConfig,
}


def _coerce(cls: type, section: str, values: dict[str, Any], base: Any) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"Unknown key(s) in section {section!r}: {unknown}; known keys: {sorted(known)}")
    clean = {}
    for key, value in values.items():
        if isinstance(value, list):
            value = tuple(value)
        clean[key] = value
    return dataclasses.replace(base, **clean)


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides`` ({section: {key: value}}).

    ``None`` values in ``overrides`` mean "not given" and are skipped. Relative paths in the
    YAML's ``model`` section are resolved against the YAML file's folder when they exist there.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config file {p} must hold a mapping of sections, not {type(loaded).__name__}")
        data = loaded
        model = data.get("model") or {}
        for key in ("checkpoint", "vision_tower", "projector_weights"):
            value = model.get(key)
            if isinstance(value, str) and not os.path.isabs(value) and (p.parent / value).exists():
                model[key] = str((p.parent / value).resolve())
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"Unknown config section(s) {unknown}; known sections: {sorted(_SECTIONS)}")
    cfg = Config()
    parts = {name: getattr(cfg, name) for name in _SECTIONS}
    for name, cls in _SECTIONS.items():
        section = dict(data.get(name) or {})
        section.update({k: v for k, v in ((overrides or {}).get(name) or {}).items() if v is not None})
        try:
            parts[name] = _coerce(cls, name, section, parts[name])
        except TypeError as exc:  # pragma: no cover - dataclasses.replace on a bad value
            raise ConfigError(f"Invalid value in section {name!r}: {exc}") from exc
    return Config(**parts)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-able dict of a (nested) config dataclass."""
    out = dataclasses.asdict(cfg)
    if isinstance(cfg, Config):
        out["model"].pop("extra", None)
    elif isinstance(cfg, ModelConfig):
        out.pop("extra", None)
    return json.loads(json.dumps(out, default=str))
