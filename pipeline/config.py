"""The product's configuration: frozen dataclasses, one section per component, one documented default per field.

- ``model`` (:class:`~pipeline.model.config.ModelConfig`): which checkpoint, layer, projector, dtype
  and device, and how the model runs (load-time transforms, compilation);
- ``decode`` (:class:`DecodeConfig`): the decode guard's limits;
- ``encoder`` (:class:`EncoderConfig`): what the encoder computes and returns (feature kind,
  pooling, output dtype, forward-pass batch sizes) — the same for both front doors;
- ``input`` (:class:`InputConfig`): what the offline job's ``--input`` holds and which of its
  columns to carry into the output;
- ``job`` (:class:`JobConfig`): the offline Ray Data job;
- ``serve`` (:class:`ServeConfig`): the online Ray Serve endpoint.

``configs/*.yaml`` files only override these defaults; :func:`load_config` merges a YAML file and
explicit overrides (CLI flags) into one resolved :class:`Config`, checking every value's type and
range with errors that name the YAML key; :func:`config_to_dict` gives the JSON-able form
recorded in every output.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .constants import (
    AlphaMode,
    AnyresOutput,
    Compression,
    FeatureKind,
    InputFormat,
    OutputDtype,
    SixteenBit,
    TensorFormat,
)
from .model.config import ModelConfig, check_section, setting
from .model.errors import ConfigError

__all__ = [
    "DEFAULT_FORMATS",
    "SECTIONS",
    "Config",
    "DecodeConfig",
    "EncoderConfig",
    "InputConfig",
    "JobConfig",
    "ModelConfig",
    "ServeConfig",
    "config_to_dict",
    "load_config",
    "resolve_model_path",
]

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")
"""Image formats the decode guard accepts by default (PIL names; MPO is read as its first JPEG)."""


@dataclass(frozen=True)
class DecodeConfig:
    """Limits of the decode guard, applied to every input image."""

    SECTION: ClassVar[str] = "decode"

    max_image_pixels: int = setting(100_000_000, ge=1)
    """Images declaring more pixels than this are refused as ``too_large`` before decoding."""
    max_bytes: int = setting(64 * 1024 * 1024, ge=1)
    """Encoded inputs larger than this are refused as ``too_large`` without being opened."""
    min_side: int = setting(2, ge=1)
    """Images with a side shorter than this many pixels are refused as ``too_small``."""
    allowed_formats: tuple[str, ...] = DEFAULT_FORMATS
    """PIL format names accepted; anything else is ``unsupported_format``."""
    nvjpeg: bool = False
    """Opt-in: decode baseline JPEGs with nvJPEG on the encoder's GPU (pixels within rounding of the exact CPU path; fingerprinted)."""
    exif_transpose: bool = False
    """Opt-in: rotate images by their EXIF orientation first (LLaVA and its processors do not; fingerprinted)."""
    alpha: AlphaMode = "auto"
    """Transparency: auto (the checkpoint layout's own rule: drop for LLaVA, white for llava-hf), drop or white; fingerprinted."""
    sixteen_bit: SixteenBit = "llava"
    """16-bit images: llava (PIL's convert("RGB"), as LLaVA: values above 255 clip to white) or opt-in high_byte; fingerprinted."""

    def __post_init__(self) -> None:
        check_section(self)
        object.__setattr__(self, "allowed_formats", tuple(f.upper() for f in self.allowed_formats))


@dataclass(frozen=True)
class EncoderConfig:
    """What the encoder computes and returns, for the offline job and the endpoint alike."""

    SECTION: ClassVar[str] = "encoder"

    features: FeatureKind = setting("projected", message="Unknown features")
    """Which features to return: ``projected`` (the projector's output), ``tower`` (its input) or ``both``."""
    pooled: bool = False
    """Also return ``pooled``, the float32 mean over tokens of the first returned feature (the endpoint always can)."""
    output_dtype: OutputDtype | None = setting(None, message="Unknown output dtype")
    """dtype of returned and stored features; null: float16, or float32 when model.dtype is float32."""
    batch_size: int = setting(32, ge=1)
    """Images per forward pass (the offline job's batches; the endpoint's batches are at most serve.max_batch_size)."""
    batch_buckets: tuple[int, ...] = setting((), ge=1)
    """With model.compile: the compiled batch sizes (batches are padded up to one); empty: derived from batch_size."""
    anyres_output: AnyresOutput = "tiles"
    """LLaVA-NeXT (anyres) checkpoints: tiles [1 + tiles, tokens, dim] per image, or packed (spatial_unpad + image_newline)."""

    def __post_init__(self) -> None:
        check_section(self)
        object.__setattr__(self, "batch_buckets", tuple(sorted(set(self.batch_buckets))))


@dataclass(frozen=True)
class InputConfig:
    """What the offline job's ``--input`` holds, and which of its columns go into the output."""

    SECTION: ClassVar[str] = "input"

    format: InputFormat = setting("auto", message="Unknown input format")
    """What --input holds: images, manifest (uri rows), webdataset (tar shards) or parquet (image bytes in input.image_column); auto: told from the names."""
    image_column: str | None = None
    """Parquet inputs: the column holding each image (binary, or the datasets Image struct {bytes, path}); set, the Parquet files are images, not manifests."""
    id_column: str | None = None
    """Parquet/CSV inputs: the column of image ids (default: image_id in manifests; <file>#<row> in Parquet images)."""
    keep_columns: tuple[str, ...] = ()
    """Input columns copied into the output rows: Parquet/CSV columns; for WebDataset, sidecars by extension (txt, cls; caption = txt) or .json fields."""

    def __post_init__(self) -> None:
        check_section(self)
        names = [c.strip() for c in self.keep_columns]
        if any(not c for c in names):
            raise ConfigError(f"input.keep_columns: empty column name in {list(self.keep_columns)}")
        if len(set(names)) != len(names):
            raise ConfigError(f"input.keep_columns: a column is named twice in {names}")
        object.__setattr__(self, "keep_columns", tuple(names))
        for key in ("image_column", "id_column"):
            value = getattr(self, key)
            if value is not None and not value.strip():
                raise ConfigError(f"input.{key}: empty column name")


@dataclass(frozen=True)
class JobConfig:
    """The offline Ray Data job."""

    SECTION: ClassVar[str] = "job"

    tensor_format: TensorFormat = "binary"
    """Tensor columns as ``binary`` (raw bytes; fast, every dtype) or ``list`` (float32 arrays that Spark/DuckDB/Polars read natively)."""
    shard_size: int = setting(256, ge=1)
    """Inputs per output file; a unit of the plan (a tar, Parquet row groups, a manifest row range, listed files) may write several."""
    actors: tuple[int, int] = setting((1, 1), ge=1)
    """(min, max) encoder actors in the autoscaling pool."""
    num_gpus_per_actor: float | None = setting(None, ge=0)
    """GPUs per encoder actor; null means 1 when the cluster has GPUs, else 0."""
    num_cpus_per_actor: float = setting(1.0, gt=0)
    """CPUs reserved by each encoder actor."""
    decode_threads: int = setting(8, ge=1)
    """Threads per decode task for reading bytes from storage."""
    max_error_fraction: float = setting(0.01, ge=0, le=1)
    """Above this fraction of failed inputs the job exits non-zero (after writing everything)."""
    limit: int | None = setting(None, ge=1)
    """Encode only the first N inputs (in listing order)."""
    s3_endpoint: str | None = None
    """S3 endpoint override (else AWS_ENDPOINT_URL / the AWS default)."""
    compression: Compression = "none"
    """Parquet compression for the feature files (``none``, ``zstd``, ``lz4``, ``snappy``, ``gzip``, ``brotli``)."""
    commit_interval_s: float = setting(10.0, gt=0)
    """Longest a finished unit waits before the driver commits it to the table (units are committed in batches)."""
    commit_max_units: int = setting(1000, ge=1)
    """Most units one commit to the table's log holds (a batch is committed when it is this large)."""
    read_timeout_s: float = setting(60.0, gt=0)
    """Longest wait for one read from storage (an image, or one chunk of a tar or Parquet file); a slower read becomes a read_failed error row."""
    address: str | None = None
    """Ray cluster to run on (host:port, ray://host:port, auto); null: RAY_ADDRESS when set, else a new local Ray."""
    serve_app: str | None = None
    """Encode and write through this running Serve application's encoder replicas (one GPU pool with the endpoint) instead of the job's own actors."""
    progress_interval_s: float = setting(10.0, gt=0)
    """Seconds between two progress lines of a running job (a terminal shows a bar instead, redrawn every second)."""
    stall_warn_s: float = setting(300.0, gt=0)
    """A job that writes no file and commits no unit for this long logs why (Ray's pending demands, dead nodes), again every as long."""
    stall_fail_s: float = setting(1800.0, gt=0)
    """A job that writes no file and commits no unit for this long stops with that diagnosis (--resume continues); above stall_warn_s."""
    resource_wait_s: float = setting(0.0, ge=0)
    """When the cluster cannot hold the minimum actors and a decode task at once: wait this long for room (an autoscaling cluster), else fail at once."""

    def __post_init__(self) -> None:
        check_section(self)
        lo, hi = self.actors
        if lo > hi:
            raise ConfigError(f"job.actors: MIN,MAX needs MIN <= MAX, got {lo},{hi}")
        if self.stall_fail_s <= self.stall_warn_s:
            raise ConfigError(
                f"job.stall_fail_s ({self.stall_fail_s:g}) must be above job.stall_warn_s ({self.stall_warn_s:g}): "
                "the job says why it stalls before it stops"
            )


@dataclass(frozen=True)
class ServeConfig:
    """The online Ray Serve endpoint."""

    SECTION: ClassVar[str] = "serve"

    host: str = "127.0.0.1"
    """Address the HTTP proxy binds to."""
    port: int = setting(8000, ge=1, le=65535)
    """Port the HTTP proxy listens on."""
    route_prefix: str = "/"
    """Route prefix of the application."""
    max_batch_size: int = setting(32, ge=1)
    """Largest dynamic batch formed by ``@serve.batch``."""
    batch_wait_timeout_s: float = setting(0.005, ge=0)
    """How long a batch waits to fill before running."""
    max_ongoing_requests: int = setting(64, ge=1)
    """Concurrent requests a replica accepts (raised to max_batch_size if lower, so batches can fill)."""
    max_queued_requests: int = setting(256, ge=-1)
    """Requests a replica holds waiting beyond max_ongoing_requests before it answers 503 (-1: no limit)."""
    min_replicas: int = setting(1, ge=0)
    """Autoscaling: fewest encoder replicas."""
    max_replicas: int = setting(1, ge=1)
    """Autoscaling: most encoder replicas."""
    initial_replicas: int = setting(1, ge=0)
    """Autoscaling: replicas at start."""
    target_ongoing_requests: int = setting(16, ge=1)
    """Autoscaling: load per replica the autoscaler aims for (online requests; an offline file counts target/max_offline_shards)."""
    upscale_delay_s: float = setting(10.0, ge=0)
    """Autoscaling: seconds the load must stay above target before replicas are added."""
    downscale_delay_s: float = setting(120.0, ge=0)
    """Autoscaling: seconds the load must stay below target before replicas are removed."""
    num_gpus_per_replica: float | None = setting(None, ge=0)
    """GPUs per encoder replica; null means 1 when the cluster has GPUs, else 0."""
    decode_threads: int | None = setting(None, ge=1)
    """Threads decoding images in each replica; null: the CPUs Ray gives the replica, at least 2."""
    max_decode_pixels: int | None = setting(None, ge=1)
    """Decoded pixels in flight per replica (declared sizes; ~10 bytes each at peak); more wait. Null: decode.max_image_pixels."""
    max_body_bytes: int = setting(32 * 1024 * 1024, ge=1)
    """Largest accepted request body; larger ones get 413 before being read whole."""
    request_timeout_s: float = setting(30.0, gt=0)
    """Requests taking longer (once their body has arrived) get 504."""
    body_timeout_s: float = setting(10.0, gt=0)
    """A request body that has not fully arrived after this many seconds gets 408 (slow or stalled uploads)."""
    shutdown_timeout_s: float = setting(10.0, ge=0)
    """On shutdown (SIGTERM, scale-down), seconds a replica lets its requests in progress finish before it stops."""
    api_key: str | None = None
    """When set (or LLAVA_FEATURES_API_KEY is), every route but /healthz needs this Bearer token."""
    offline_chunk_size: int = setting(8, ge=1)
    """Offline images (anyres: tiles) per forward pass of a shard from ``encode --serve-app``; online requests wait at most one such pass (8: under 50 ms for CLIP-L/336 on a GPU)."""
    max_offline_shards: int = setting(2, ge=1)
    """Offline shards one replica works on at once; ``encode --serve-app`` keeps at most this × max_replicas in flight."""

    def __post_init__(self) -> None:
        check_section(self)
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"serve.route_prefix must start with '/', got {self.route_prefix!r}")
        if not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ConfigError(
                "serve replicas must satisfy min_replicas <= initial_replicas <= max_replicas, got "
                f"{self.min_replicas}/{self.initial_replicas}/{self.max_replicas}"
            )


@dataclass(frozen=True)
class Config:
    """Everything a job or an endpoint needs, resolved."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model: checkpoint, layer, projector, dtype, device, fast path."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """Decode guard limits."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """What the encoder returns (both front doors)."""
    input: InputConfig = field(default_factory=InputConfig)
    """What the offline job reads."""
    job: JobConfig = field(default_factory=JobConfig)
    """Offline job settings."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """Online endpoint settings."""


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "decode": DecodeConfig,
    "encoder": EncoderConfig,
    "input": InputConfig,
    "job": JobConfig,
    "serve": ServeConfig,
}
"""Config section name → its dataclass, in the order of :class:`Config`."""

_MOVED = {
    ("job", "features"): "encoder.features",
    ("job", "pooled"): "encoder.pooled",
    ("job", "output_dtype"): "encoder.output_dtype",
    ("job", "batch_size"): "encoder.batch_size",
    ("model", "batch_buckets"): "encoder.batch_buckets",
}
_MODEL_PATH_KEYS = ("checkpoint", "vision_tower", "projector_weights")


def _section(cls: type, name: str, values: dict[str, Any], base: Any) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        moved = [f"{k} (now {_MOVED[(name, k)]})" for k in unknown if (name, k) in _MOVED]
        hint = f"; moved: {', '.join(moved)}" if moved else ""
        raise ConfigError(
            f"Unknown key(s) in section {name!r}: {unknown}{hint}; known keys: {sorted(known - {'extra'})}"
        )
    return dataclasses.replace(base, **values)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of sections, not {type(loaded).__name__}")
    for name, section in loaded.items():
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"Section {name!r} of {path} must be a mapping, not {type(section).__name__}")
    model = loaded.get("model") or {}
    for key in _MODEL_PATH_KEYS:
        value = model.get(key)
        if isinstance(value, str):
            model[key] = resolve_model_path(value, path.parent)
    return loaded


def resolve_model_path(value: str, folder: Path) -> str:
    """A model path or id written in a YAML file in ``folder``, as :func:`load_config` reads it.

    A value is a local path when it is absolute, starts with ``~`` or ``.`` (``./m``, ``../m``,
    ``.demo/m``: no model id starts with a dot), or names something that exists in ``folder``;
    relative paths are relative to ``folder``, never to the working directory. Anything else
    (``org/name``) is a model id for the local Hugging Face cache and is returned unchanged.
    """
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return expanded
    candidate = folder / expanded
    if expanded.startswith(".") or candidate.exists():
        return str(candidate.resolve())
    return value


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides`` ({section: {key: value}}).

    ``None`` values in ``overrides`` mean "not given" and are skipped. Paths in the YAML's
    ``model`` section (``checkpoint``, ``vision_tower``, ``projector_weights``) are relative to the
    YAML file's folder (:func:`resolve_model_path`); paths in ``overrides`` are used as given
    (relative to the working directory).
    Every value is checked (type, range) with an error naming its key.
    """
    data = _read_yaml(Path(path)) if path is not None else {}
    overrides = overrides or {}
    unknown = sorted((set(data) | set(overrides)) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"Unknown config section(s) {unknown}; known sections: {list(SECTIONS)}")
    defaults = Config()
    parts = {}
    for name, cls in SECTIONS.items():
        values = dict(data.get(name) or {})
        values.update({k: v for k, v in (overrides.get(name) or {}).items() if v is not None})
        parts[name] = _section(cls, name, values, getattr(defaults, name))
    return Config(**parts)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-able dict of a (nested) config dataclass (the model's ``extra`` keys left out)."""
    out = dataclasses.asdict(cfg)
    if isinstance(cfg, Config):
        out["model"].pop("extra", None)
    elif isinstance(cfg, ModelConfig):
        out.pop("extra", None)
    return json.loads(json.dumps(out, default=str))
