"""The one encoder: preprocess → encode → postprocess, shared by the Ray Data actor and the Serve replica.

:class:`FeatureEncoder` owns the decode guard + preprocessing (CPU, per image), the CLIP tower and
projector (the device, per batch), and the conversion of results to their stored dtype. The
offline job's actors and the online endpoint's replicas are thin adapters around it.

``describe_encoder`` resolves a configuration into the JSON-able description recorded in every
output, and its fingerprint, without loading the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import Config, config_to_dict
from .model import ResolvedModel, load_model_modules, resolve_device, resolve_dtype, resolve_model
from .model.errors import ConfigError
from .preprocess import PreparedImage, Preprocessor, PreprocessSpec, normalize, resampler_name

logger = logging.getLogger(__name__)

FEATURE_KINDS = ("projected", "tower", "both")
OUTPUT_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def output_dtype_name(config: Config) -> str:
    """dtype of stored features: ``job.output_dtype`` when set, float32 when ``--dtype float32``, else float16."""
    if config.job.output_dtype:
        if config.job.output_dtype not in OUTPUT_DTYPES:
            raise ConfigError(
                f"Unknown output dtype {config.job.output_dtype!r}; valid: {sorted(OUTPUT_DTYPES)}"
            )
        return config.job.output_dtype
    return "float32" if config.model.dtype == "float32" else "float16"


def preprocess_spec(resolved: ResolvedModel) -> PreprocessSpec:
    """The preprocessing the resolved model expects (its image processor + LLaVA's aspect-ratio mode)."""
    return PreprocessSpec.from_image_processor(resolved.image_processor, resolved.image_aspect_ratio)


@dataclass(frozen=True)
class EncoderDescription:
    """What an output records about the encoder that produced it."""

    fingerprint: str
    """sha256 over everything that changes the numbers (model, layer, projector, dtypes, preprocessing)."""
    fields: dict[str, Any]
    """The fingerprinted fields, JSON-able."""


def describe_encoder(config: Config, resolved: ResolvedModel | None = None) -> EncoderDescription:
    """Fingerprint of the features ``config`` produces; reads configs and digests, loads no model."""
    resolved = resolved or resolve_model(config.model)
    device = resolve_device(config.model.device)
    fields = {
        "model": resolved.describe(),
        "compute_dtype": str(resolve_dtype(config.model.dtype, device)).removeprefix("torch."),
        "output_dtype": output_dtype_name(config),
        "preprocess": preprocess_spec(resolved).to_dict(),
    }
    fields["model"].pop("image_processor", None)  # represented by "preprocess"
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return EncoderDescription(fingerprint=hashlib.sha256(blob).hexdigest(), fields=fields)


@dataclass
class EncodedBatch:
    """Results of one batch, on the host, in their stored dtypes (``None`` when not asked for)."""

    projected: Any
    """(B, tokens, dim) projected features (numpy; a CPU torch tensor for bfloat16)."""
    tower: Any
    """(B, tokens, tower_dim) tower features before the projector (same types)."""
    pooled: np.ndarray | None
    """(B, dim) float32 mean over tokens of the first feature kind written."""


_FAST_PATH_LOCK = threading.Lock()
_MIN_OVERLAP_CHUNK = 16  # a single batch is split for copy/compute overlap only into pieces this big


@dataclass
class _FastPath:
    """How a FeatureEncoder runs its model (built once, at the first encode or warm-up)."""

    transforms: dict[str, int]
    """Load-time transforms applied to the tower (name → layers changed)."""
    compiled: Any
    """``torch.compile``d :meth:`FeatureEncoder._run_model`, or None (eager)."""
    buckets: tuple[int, ...]
    """Static batch sizes of the compiled graphs (empty when eager)."""
    overlap_chunks: int
    """Sub-batches a single GPU batch of ``encode_pixels`` is split into for copy/compute overlap."""
    cudagraphs: bool = False
    """The compile mode replays CUDA graphs: outputs live in the graph's pool and are cloned."""


def _host(t: torch.Tensor | None) -> Any:
    """A result on the host: numpy, or a CPU torch tensor for bfloat16 (numpy has no bfloat16)."""
    if t is None:
        return None
    t = t.cpu()
    return t if t.dtype == torch.bfloat16 else t.numpy()


class FeatureEncoder:
    """One CLIPVisionTower + projector replica with its preprocessing.

    ``encode_pre`` (CPU, one image: decode guard + resize/crop to uint8), ``encode_core`` (device:
    uint8 batch → normalized → tower → projector), ``encode_post`` (device → host, stored dtype,
    pooling), ``warmup``. ``encode_pixels`` chains core and post over batches of ``batch_size``.
    """

    def __init__(
        self,
        config: Config,
        resolved: ResolvedModel | None = None,
        *,
        modules: tuple[torch.nn.Module, torch.nn.Module] | None = None,
    ) -> None:
        """Resolve (unless ``resolved`` is given) and load the model; ``modules`` = (tower, projector)
        already built (benchmarks with random weights) skips loading."""
        self.config = config
        self.resolved = resolved or resolve_model(config.model)
        self.description = describe_encoder(config, self.resolved)
        self.spec = preprocess_spec(self.resolved)
        self.preprocessor = Preprocessor(self.spec, config.decode)
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.output_dtype = OUTPUT_DTYPES[output_dtype_name(config)]
        if config.job.features not in FEATURE_KINDS:
            raise ConfigError(f"Unknown features {config.job.features!r}; valid values are {FEATURE_KINDS}")
        started = time.perf_counter()
        if modules is not None:
            self.tower, self.projector = modules
            return
        self.tower, self.projector = load_model_modules(
            self.resolved,
            dtype=self.dtype,
            device=self.device,
            attn_implementation=config.model.attn_implementation,
            local_files_only=config.model.local_files_only,
        )
        logger.info(
            "Loaded %s encoder (%s, layer %d, %s, %s) on %s in %.1fs",
            self.resolved.format,
            self.resolved.vision_tower,
            self.resolved.select_layer,
            self.resolved.projector_type,
            self.dtype,
            self.device,
            time.perf_counter() - started,
        )

    # -- shapes ----------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        return self.description.fingerprint

    @property
    def num_tokens(self) -> int:
        return self.resolved.num_tokens

    @property
    def feature_dim(self) -> int:
        return self.resolved.feature_dim

    @property
    def tower_dim(self) -> int:
        return self.resolved.mm_hidden_size

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.spec.crop_height, self.spec.crop_width)

    # -- the three stages --------------------------------------------------------------------

    def encode_pre(self, data: bytes, name: str | None = None) -> PreparedImage:
        """Decode guard + preprocessing to uint8 ``(3,H,W)``; raises DecodeError for bad inputs."""
        return self.preprocessor(data, name)

    @torch.inference_mode()
    def encode_core(
        self, pixels: np.ndarray | torch.Tensor, features: str | None = None
    ) -> dict[str, torch.Tensor]:
        """uint8 ``(B,3,H,W)`` → ``{"projected": ..., "tower": ...}`` on the device, in the compute dtype."""
        features = features or self.config.job.features
        fast = self._fast_path()
        batch = self._as_tensor(pixels)
        if self.device.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        return self._forward_device(batch, features, fast)

    @torch.inference_mode()
    def encode_post(self, out: dict[str, torch.Tensor], pooled: bool | None = None) -> EncodedBatch:
        """Device tensors → host arrays in the stored dtype (+ float32 mean over tokens)."""
        pooled = self.config.job.pooled if pooled is None else pooled
        stored = self._device_outputs(out, pooled)
        return EncodedBatch(**{name: _host(stored.get(name)) for name in ("projected", "tower", "pooled")})

    def encode_pixels(
        self,
        pixels: np.ndarray,
        *,
        batch_size: int | None = None,
        features: str | None = None,
        pooled: bool | None = None,
    ) -> EncodedBatch:
        """Encode N preprocessed uint8 images in batches; results concatenated in order.

        On a GPU the batches flow through :func:`~pipeline.model.fast.overlapped_map` (pinned
        uploads, compute and pinned downloads on three streams), and a call holding a single
        batch is split into ``model.overlap_chunks`` sub-batches so its copies overlap compute.
        """
        from .model.fast import overlapped_map

        batch_size = batch_size or self.config.job.batch_size
        features = features or self.config.job.features
        pooled = self.config.job.pooled if pooled is None else pooled
        n = len(pixels)
        if n == 0:
            return self._empty(features, pooled)
        fast = self._fast_path()
        step = batch_size
        if self.device.type == "cuda" and n <= batch_size and fast.overlap_chunks > 1:
            step = max(_MIN_OVERLAP_CHUNK, math.ceil(n / fast.overlap_chunks))
        host = self._as_tensor(pixels)
        chunks = (host[i : i + step] for i in range(0, n, step))
        with torch.inference_mode():
            parts = list(
                overlapped_map(
                    chunks,
                    lambda batch: self._device_outputs(self._forward_device(batch, features, fast), pooled),
                    self.device,
                )
            )

        def cat(name: str) -> Any:
            tensors = [p[name] for p in parts if name in p]
            if not tensors:
                return None
            return _host(tensors[0] if len(tensors) == 1 else torch.cat(tensors))

        return EncodedBatch(projected=cat("projected"), tower=cat("tower"), pooled=cat("pooled"))

    def warmup(self, batch_size: int | None = None) -> float:
        """Run the model on blank batches (allocations, kernels, compilation). Returns seconds.

        Eager: one ``encode_pixels`` of ``batch_size`` (default 1). Compiled: one pass per batch
        bucket, so that no request or shard pays for a compilation later.
        """
        started = time.perf_counter()
        fast = self._fast_path()
        if fast.compiled is not None:
            for size in fast.buckets:
                self.encode_core(
                    torch.zeros((size, *self.input_shape), dtype=torch.uint8, device=self.device)
                )
        else:
            n = batch_size or 1
            self.encode_pixels(np.zeros((n, *self.input_shape), dtype=np.uint8), batch_size=n)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        if fast.compiled is not None:
            logger.info(
                "Compiled %d batch buckets %s in %.1fs", len(fast.buckets), list(fast.buckets), seconds
            )
        return seconds

    # -- fast path (private) -----------------------------------------------------------------

    def _fast_path(self) -> _FastPath:
        """Apply the load-time transforms and set up compilation, once (thread-safe)."""
        fast = getattr(self, "_fast_state", None)
        if fast is None:
            with _FAST_PATH_LOCK:
                fast = getattr(self, "_fast_state", None)
                if fast is None:
                    fast = self._build_fast_path()
                    self._fast_state = fast
        return fast

    def _build_fast_path(self) -> _FastPath:
        from .model import fast as fastpath

        cfg = self.config.model
        overlap = int(cfg.overlap_chunks)
        if overlap < 1:
            raise ConfigError(f"model.overlap_chunks must be >= 1, got {cfg.overlap_chunks!r}")
        if cfg.compile_mode not in fastpath.COMPILE_MODES:
            valid = [m for m in fastpath.COMPILE_MODES if m]
            raise ConfigError(f"Unknown model.compile_mode {cfg.compile_mode!r}; valid: {valid} or null")
        try:
            buckets = fastpath.validate_buckets(cfg.batch_buckets)
        except ValueError as exc:
            raise ConfigError(f"model.batch_buckets: {exc}") from None
        transforms = fastpath.apply_fast_path(self.tower, qkv=cfg.fuse_qkv, quick_gelu=cfg.fold_quick_gelu)
        compiled = None
        if cfg.compile:
            if not buckets:
                sizes = (self.config.job.batch_size, self.config.serve.max_batch_size)
                buckets = fastpath.default_buckets(sizes, overlap)
            fastpath.ensure_recompile_limit(2 * len(buckets) + 4)
            compiled = fastpath.compile_static(self._run_model, cfg.compile_mode)
        else:
            buckets = ()
        logger.info(
            "Encoder fast path on %s (%s): transforms %s, %s, overlap_chunks %d",
            self.device,
            self.dtype,
            transforms or "none",
            f"torch.compile({cfg.compile_mode or 'default'}) buckets {list(buckets)}"
            if compiled
            else "eager",
            overlap,
        )
        graph_modes = ("reduce-overhead", "max-autotune")
        cudagraphs = compiled is not None and self.device.type == "cuda" and cfg.compile_mode in graph_modes
        return _FastPath(
            transforms=transforms,
            compiled=compiled,
            buckets=buckets,
            overlap_chunks=overlap,
            cudagraphs=cudagraphs,
        )

    def _run_model(self, values: torch.Tensor, project: bool, keep_tower: bool) -> dict[str, torch.Tensor]:
        """Tower (+ projector) on normalized pixels: what ``torch.compile`` captures."""
        tower = self.tower.encode(values)
        out: dict[str, torch.Tensor] = {}
        if keep_tower:
            out["tower"] = tower
        if project:
            out["projected"] = self.projector(tower)
        return out

    def _forward_device(self, batch: torch.Tensor, features: str, fast: _FastPath) -> dict[str, torch.Tensor]:
        """uint8 batch on the device → features in the compute dtype (padded to buckets when compiled)."""
        if features not in FEATURE_KINDS:
            raise ConfigError(f"Unknown features {features!r}; valid values are {FEATURE_KINDS}")
        project, keep_tower = features in ("projected", "both"), features in ("tower", "both")
        values = normalize(batch, self.spec, dtype=torch.float32).to(self.dtype)
        if fast.compiled is None or values.shape[0] == 0:
            return self._run_model(values, project, keep_tower)
        from .model.fast import run_bucketed

        def run(v: torch.Tensor) -> dict[str, torch.Tensor]:
            if not fast.cudagraphs:
                return fast.compiled(v, project, keep_tower)
            # CUDA-graph outputs are overwritten by the next replay, while ours may still be
            # downloading on another stream: mark the step and take our own copy.
            torch.compiler.cudagraph_mark_step_begin()
            return {k: t.clone() for k, t in fast.compiled(v, project, keep_tower).items()}

        return run_bucketed(run, values, fast.buckets)

    def _device_outputs(self, out: dict[str, torch.Tensor], pooled: bool) -> dict[str, torch.Tensor]:
        """Features in the stored dtype (+ float32 mean over tokens), still on the device."""
        result: dict[str, torch.Tensor] = {}
        first = out.get("projected", out.get("tower"))
        if pooled and first is not None:
            result["pooled"] = first.float().mean(dim=1)
        for name in ("projected", "tower"):
            if name in out:
                result[name] = out[name].to(self.output_dtype).contiguous()
        return result

    def _empty(self, features: str, pooled: bool) -> EncodedBatch:
        """Zero-row results with the shapes and dtypes real ones have (e.g. a shard without a good image)."""

        def tensor(dim: int) -> Any:
            return _host(torch.zeros((0, self.num_tokens, dim), dtype=self.output_dtype))

        projected = tensor(self.feature_dim) if features in ("projected", "both") else None
        tower = tensor(self.tower_dim) if features in ("tower", "both") else None
        pooled_dim = self.feature_dim if projected is not None else self.tower_dim
        return EncodedBatch(
            projected=projected, tower=tower, pooled=np.zeros((0, pooled_dim), np.float32) if pooled else None
        )

    @staticmethod
    def _as_tensor(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        if not isinstance(pixels, np.ndarray):
            return pixels
        with warnings.catch_warnings():  # read-only buffers (Ray objects) are only ever read here
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.ascontiguousarray(pixels))

    def info(self) -> dict[str, Any]:
        """Model card of this encoder (config, fingerprint, shapes) for /v1/models and outputs."""
        return {
            "fingerprint": self.fingerprint,
            "encoder": self.description.fields,
            "config": config_to_dict(self.config),
            "num_tokens": self.num_tokens,
            "feature_dim": self.feature_dim,
            "tower_dim": self.tower_dim,
            "device": str(self.device),
            "resampler": resampler_name(self.spec.resample),
        }
