"""The one encoder: preprocess → encode → postprocess, shared by the Ray Data actor and the Serve replica.

:class:`FeatureEncoder` owns the decode guard + preprocessing (CPU, per image), the CLIP tower and
projector (the device, per batch), and the conversion of results to their returned dtype. The
offline job's actors and the online endpoint's replicas are thin adapters around it. It reads
three config sections: ``model`` (what to load and how to run it), ``decode`` (the guard's limits)
and ``encoder`` (what to return); never ``job`` or ``serve``.

Results (:class:`EncodedBatch`) are always numpy arrays on the host, in the returned dtype named
by ``EncodedBatch.dtype``; numpy has no bfloat16, so bfloat16 features are their ``uint16`` bit
patterns (lossless, the form :mod:`pipeline.table.tensors` stores), never torch tensors.

``describe_encoder`` resolves a configuration into the JSON-able description recorded in every
output, and its fingerprint, without loading the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .config import Config, DecodeConfig, config_to_dict
from .constants import FeatureKind
from .images.native import resampler_name
from .images.normalize import Normalizer
from .images.preprocess import PreparedImage, Preprocessor
from .images.spec import PreprocessSpec
from .model import (
    ResolvedModel,
    load_model_modules,
    load_newline,
    resolve_device,
    resolve_dtype,
    resolve_model,
)
from .model.anyres import AnyresGrid, pack_tiles
from .model.constants import CUDAGRAPH_COMPILE_MODES
from .model.errors import ConfigError, DecodeError, ModelStateError
from .model.tower import DTYPE_NAMES
from .table.tensors import RaggedRows

logger = logging.getLogger(__name__)

__all__ = [
    "EncodedBatch",
    "EncoderDescription",
    "FeatureEncoder",
    "describe_encoder",
    "output_dtype_name",
    "preprocess_spec",
]

_MIN_OVERLAP_CHUNK = 16  # a single batch is split for copy/compute overlap only into pieces this big


def output_dtype_name(config: Config) -> str:
    """dtype of returned features: ``encoder.output_dtype`` when set, float32 when ``model.dtype``
    is float32, else float16."""
    if config.encoder.output_dtype:
        return config.encoder.output_dtype
    return "float32" if config.model.dtype == "float32" else "float16"


NUMERICS_VERSION = "2"
"""Version of the product's numerics, part of every fingerprint: bumped whenever a change of the code
(not of a setting) changes the features (2: the processor's exact normalisation, LLaVA's EXIF and
colour-mode rules, content-addressed model digests)."""


def preprocess_spec(resolved: ResolvedModel, decode: DecodeConfig | None = None) -> PreprocessSpec:
    """The pixels the resolved model expects: its image processor, LLaVA's aspect-ratio mode (and anyres
    grid), the layout's colour rules, and the decode options that deviate from them (opt-in)."""
    decode = decode or DecodeConfig()
    return PreprocessSpec.from_image_processor(
        resolved.image_processor,
        resolved.image_aspect_ratio,
        grid_pinpoints=resolved.image_grid_pinpoints,
        anyres_resample=resolved.anyres_resample,
        alpha=resolved.alpha if decode.alpha == "auto" else decode.alpha,
        exif_transpose=decode.exif_transpose,
        sixteen_bit=decode.sixteen_bit,
    )


@dataclass(frozen=True)
class EncoderDescription:
    """What an output records about the encoder that produced it."""

    fingerprint: str
    """sha256 over everything that changes the numbers (model, layer, projector, dtypes, preprocessing)."""
    fields: dict[str, Any]
    """The fingerprinted fields, JSON-able."""
    sources: dict[str, Any] = field(default_factory=dict)
    """Where the model was read from (recorded, not fingerprinted: the same weights elsewhere are the same)."""


def describe_encoder(config: Config, resolved: ResolvedModel | None = None) -> EncoderDescription:
    """Fingerprint of the features ``config`` produces; reads configs and digests, loads no model.

    The fingerprint covers what the numbers depend on — the weights' digests and the model's
    semantics, the preprocessing, the dtypes, the anyres output, the code's numerics version — and
    never where the files are (recorded apart, under ``sources``). Settings that cannot give the
    model's features are refused here (``llava-features info``), before any model is built.
    """
    resolved = resolved or resolve_model(config.model)
    spec = preprocess_spec(resolved, config.decode)
    if spec.output_size is None:
        raise ConfigError(
            f"do_center_crop: false with image_aspect_ratio {spec.aspect_ratio!r} gives pixels of every size, which "
            "a CLIP tower does not take (only 'pad', a square, works without the crop)"
        )
    tile = spec.output_size
    if tile != (resolved.image_size, resolved.image_size):
        raise ConfigError(
            f"the image processor gives {tile[0]}x{tile[1]} pixels but the tower takes "
            f"{resolved.image_size}x{resolved.image_size}: its crop/size do not match the tower"
        )
    anyres_output = config.encoder.anyres_output if resolved.anyres else None
    if (
        anyres_output == "packed"
        and resolved.patch_merge_type == "spatial_unpad"
        and not resolved.newline_sha256
    ):
        raise ConfigError(
            f"encoder.anyres_output 'packed' with mm_patch_merge_type spatial_unpad needs the checkpoint's "
            f"image_newline, and {resolved.checkpoint!r} has none"
        )
    if anyres_output == "packed" and config.encoder.features != "projected":
        raise ConfigError(
            "encoder.anyres_output 'packed' applies to the projected features (image_newline lives in their "
            f"width): set encoder.features to 'projected', not {config.encoder.features!r}"
        )
    device = resolve_device(config.model.device)
    fields: dict[str, Any] = {
        "numerics_version": NUMERICS_VERSION,
        "model": resolved.numerics(),
        "compute_dtype": str(resolve_dtype(config.model.dtype, device)).removeprefix("torch."),
        "output_dtype": output_dtype_name(config),
        "preprocess": spec.to_dict(),
    }
    if anyres_output is not None:
        fields["anyres_output"] = anyres_output
    if config.decode.nvjpeg:  # an opt-in deviation from the exact CPU pixels
        if resolved.anyres:
            raise ConfigError(
                "decode.nvjpeg decodes single images; anyres (LLaVA-NeXT) tiling runs on the CPU"
            )
        fields["decode_route"] = "nvjpeg"
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return EncoderDescription(
        fingerprint=hashlib.sha256(blob).hexdigest(), fields=fields, sources=resolved.sources()
    )


@dataclass
class EncodedBatch:
    """Results of one batch, on the host, as numpy arrays (``None`` when not asked for).

    Features of fixed shape are ``(B, tokens, dim)`` arrays; LLaVA-NeXT's (anyres) vary from image to
    image and are :class:`~pipeline.table.tensors.RaggedRows` (row ``i``: ``[1 + tiles, tokens, dim]``, or
    ``[tokens, dim]`` packed), with the tile grids in ``grids``. ``batch[i]`` or :meth:`row` gives a
    row either way.
    """

    dtype: str
    """Returned dtype of ``projected`` and ``tower`` (``float16``, ``float32`` or ``bfloat16``)."""
    projected: np.ndarray | RaggedRows | None = None
    """Projected features; bfloat16 as its ``uint16`` bit pattern."""
    tower: np.ndarray | RaggedRows | None = None
    """Tower features before the projector (same dtype)."""
    pooled: np.ndarray | None = None
    """(B, dim) float32 mean over all of a row's tokens of the first feature kind returned."""
    grids: list[AnyresGrid | None] | None = None
    """anyres: each row's tile grid (None otherwise)."""

    @property
    def features(self) -> np.ndarray | RaggedRows | None:
        """The first feature kind returned: ``projected``, else ``tower``."""
        return self.projected if self.projected is not None else self.tower

    def row(self, index: int, name: str = "features") -> np.ndarray:
        """Row ``index`` of ``projected``, ``tower`` or ``features`` (the first returned), with its own shape."""
        values = getattr(self, name)
        assert values is not None, f"{name} was not computed"
        return values[index]

    @classmethod
    def concat(cls, parts: Sequence[EncodedBatch]) -> EncodedBatch:
        """The rows of ``parts`` (at least one, all of one encoder call's kinds) in order, as one batch."""
        if len(parts) == 1:
            return parts[0]

        def join(values: list[Any]) -> Any:
            if values[0] is None:
                return None
            if isinstance(values[0], RaggedRows):
                return RaggedRows.from_rows(
                    [r[i] for r in values for i in range(len(r))], like=values[0].data
                )
            return np.concatenate(values)

        first = parts[0]
        return cls(
            first.dtype,
            projected=join([p.projected for p in parts]),
            tower=join([p.tower for p in parts]),
            pooled=join([p.pooled for p in parts]),
            grids=[g for p in parts for g in p.grids] if first.grids is not None else None,  # type: ignore[union-attr]
        )


def _host_array(t: torch.Tensor) -> np.ndarray:
    """A device tensor as a host numpy array (bfloat16 as its uint16 bit pattern: numpy has no bfloat16)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


@dataclass
class FastPath:
    """How a :class:`FeatureEncoder` runs its model: built once, when the encoder is built."""

    transforms: dict[str, int]
    """Load-time transforms applied to the tower (name → layers changed)."""
    compiled: Any = None
    """``torch.compile``d :meth:`FeatureEncoder._run_model`, or None (eager)."""
    buckets: tuple[int, ...] = ()
    """Static batch sizes of the compiled graphs (empty when eager)."""
    overlap_chunks: int = 1
    """Sub-batches a single GPU batch of ``encode_pixels`` is split into for copy/compute overlap."""
    cudagraphs: bool = False
    """The compile mode replays CUDA graphs: outputs live in the graph's pool and are cloned."""
    stats: dict[str, int] = field(default_factory=dict)
    """Counters (batches run)."""


class FeatureEncoder:
    """One CLIPVisionTower + projector replica with its preprocessing.

    ``encode_pre`` (CPU, one image: decode guard + resize/crop to uint8), ``encode_core`` (device:
    uint8 batch → normalized → tower → projector), ``encode_post`` (device → host numpy, returned
    dtype, pooling), ``warmup``. ``encode_pixels`` chains core and post over batches of
    ``encoder.batch_size``; ``prepare_many`` + ``encode_prepared`` are the bytes-in path (with the
    opt-in nvJPEG route when ``decode.nvjpeg`` is on).
    """

    def __init__(
        self,
        config: Config,
        resolved: ResolvedModel | None = None,
        *,
        modules: tuple[torch.nn.Module, torch.nn.Module] | None = None,
        image_newline: torch.Tensor | None = None,
    ) -> None:
        """Resolve (unless ``resolved`` is given) and load the model, then set up its fast path;
        ``modules`` = (tower, projector) already built (benchmarks with random weights) skips loading,
        and ``image_newline`` then stands for the checkpoint's (LLaVA-NeXT ``packed``)."""
        self.config = config
        self.settings = config.encoder
        self.resolved = resolved or resolve_model(config.model)
        self.description = describe_encoder(config, self.resolved)
        self.spec = preprocess_spec(self.resolved, config.decode)
        self.preprocessor = Preprocessor(self.spec, config.decode)
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.output_dtype_name = output_dtype_name(config)
        self.output_dtype = DTYPE_NAMES[self.output_dtype_name]
        self.normalizer = Normalizer(self.spec, self.device)
        self.anyres_output = config.encoder.anyres_output if self.resolved.anyres else None
        started = time.perf_counter()
        if modules is not None:
            self.tower, self.projector = modules
        else:
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
        self.fast = self._build_fast_path()
        self.gpu_decoder = self._build_gpu_decoder()
        self.image_newline = (
            image_newline.to(device=self.device, dtype=self.dtype)
            if image_newline is not None
            else load_newline(
                self.resolved,
                dtype=self.dtype,
                device=self.device,
                local_files_only=config.model.local_files_only,
            )
            if self.anyres_output == "packed"
            else None
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
        self, pixels: np.ndarray | torch.Tensor, features: FeatureKind | None = None
    ) -> dict[str, torch.Tensor]:
        """uint8 ``(B,3,H,W)`` → ``{"projected": ..., "tower": ...}`` on the device, in the compute dtype."""
        features = features or self.settings.features
        batch = self._as_tensor(pixels)
        if self.device.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        return self._forward_device(batch, features)

    @torch.inference_mode()
    def encode_post(self, out: dict[str, torch.Tensor], pooled: bool | None = None) -> EncodedBatch:
        """Device tensors → host numpy arrays in the returned dtype (+ float32 mean over tokens)."""
        pooled = self.settings.pooled if pooled is None else pooled
        stored = self._device_outputs(out, pooled)
        return EncodedBatch(self.output_dtype_name, **{name: _host_array(t) for name, t in stored.items()})

    def encode_pixels(
        self,
        pixels: np.ndarray | torch.Tensor,
        *,
        batch_size: int | None = None,
        features: FeatureKind | None = None,
        pooled: bool | None = None,
    ) -> EncodedBatch:
        """Encode N preprocessed uint8 images in batches; results concatenated in order.

        On a GPU the batches flow through :func:`~pipeline.model.fast.overlapped_map` (pinned
        uploads, compute and pinned downloads on three streams), and a call holding a single
        batch is split into ``model.overlap_chunks`` sub-batches so its copies overlap compute.
        """
        features = features or self.settings.features
        pooled = self.settings.pooled if pooled is None else pooled
        if len(pixels) == 0:
            return self._empty(features, pooled)
        out = self._run_batches(pixels, features, pooled, self.output_dtype, batch_size)
        return EncodedBatch(self.output_dtype_name, **{name: _host_array(t) for name, t in out.items()})

    def _run_batches(
        self,
        pixels: np.ndarray | torch.Tensor,
        features: FeatureKind,
        pooled: bool,
        dtype: torch.dtype,
        batch_size: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Host (CPU) tensors of ``pixels``' features in ``dtype`` (+ pooled), computed batch by batch."""
        from .model.fast import overlapped_map

        batch_size = batch_size or self.settings.batch_size
        n = len(pixels)
        step = batch_size
        if self.device.type == "cuda" and n <= batch_size and self.fast.overlap_chunks > 1:
            step = max(_MIN_OVERLAP_CHUNK, math.ceil(n / self.fast.overlap_chunks))
        host = self._as_tensor(pixels)
        chunks = (host[i : i + step] for i in range(0, n, step))
        with torch.inference_mode():
            parts = list(
                overlapped_map(
                    chunks,
                    lambda batch: self._device_outputs(self._forward_device(batch, features), pooled, dtype),
                    self.device,
                )
            )
        return {
            name: torch.cat([p[name] for p in parts]) if len(parts) > 1 else parts[0][name]
            for name in parts[0]
        }

    def encode_tiles(
        self,
        tiles: np.ndarray | torch.Tensor,
        counts: Sequence[int],
        grids: Sequence[AnyresGrid],
        *,
        features: FeatureKind | None = None,
        pooled: bool | None = None,
    ) -> EncodedBatch:
        """LLaVA-NeXT (anyres) images: their uint8 tiles ``(sum(counts), 3, S, S)`` (each image's base
        first), encoded together in batches, then per image as ``encoder.anyres_output`` says:
        ``tiles`` rows ``[1 + tiles, tokens, dim]``, or ``packed`` rows ``[tokens, dim]``
        (:func:`~pipeline.model.anyres.pack_tiles`, in the compute dtype, as LLaVA packs them).
        Ragged results (:class:`~pipeline.table.tensors.RaggedRows`); ``pooled`` averages each row's tokens."""
        features = features or self.settings.features
        pooled = self.settings.pooled if pooled is None else pooled
        if self.anyres_output is None:
            raise ConfigError("encode_tiles is for anyres (LLaVA-NeXT) checkpoints")
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if offsets[-1] != len(tiles) or len(counts) != len(grids):
            raise ValueError(f"{len(tiles)} tiles for counts {list(counts)} and {len(grids)} grids")
        if len(counts) == 0:
            return self._empty(features, pooled)
        out = self._run_batches(tiles, features, False, self.dtype)
        rows: dict[str, RaggedRows] = {}
        pooled_rows = []
        for name, values in out.items():
            per_image = [values[offsets[i] : offsets[i + 1]] for i in range(len(counts))]
            if self.anyres_output == "packed":
                per_image = [
                    pack_tiles(
                        t,
                        grid,
                        merge_type=self.resolved.patch_merge_type,
                        image_newline=self.image_newline.cpu() if self.image_newline is not None else None,
                        rounding=self.resolved.unpad_rounding,
                        anyres_max=self.resolved.anyres_max,
                    )
                    for t, grid in zip(per_image, grids, strict=True)
                ]
            if pooled and not pooled_rows:
                pooled_rows = [t.float().reshape(-1, t.shape[-1]).mean(dim=0) for t in per_image]
            rows[name] = RaggedRows.from_rows(
                [_host_array(t.to(self.output_dtype).contiguous()) for t in per_image]
            )
        return EncodedBatch(
            self.output_dtype_name,
            projected=rows.get("projected"),
            tower=rows.get("tower"),
            pooled=torch.stack(pooled_rows).numpy() if pooled else None,
            grids=list(grids),
        )

    def prepare_many(
        self, datas: Sequence[bytes], names: Sequence[str | None] | None = None
    ) -> list[PreparedImage | DecodeError]:
        """Bytes → prepared images (or each input's ``DecodeError``), in order. With ``decode.nvjpeg``
        and a CUDA device, baseline JPEGs are decoded on the device in one batch (their pixels are
        device tensors); every other input takes the exact CPU path."""
        names = list(names) if names is not None else [None] * len(datas)
        if self.gpu_decoder is not None:
            return [
                r if isinstance(r, DecodeError) else PreparedImage(r.pixels, r.width, r.height, r.format)  # type: ignore[arg-type]
                for r in self.gpu_decoder(datas, names)
            ]
        out: list[PreparedImage | DecodeError] = []
        for data, name in zip(datas, names, strict=True):
            try:
                out.append(self.preprocessor(data, name))
            except DecodeError as exc:
                out.append(exc)
        return out

    def encode_prepared(
        self,
        prepared: Sequence[PreparedImage],
        *,
        pooled: bool | None = None,
        features: FeatureKind | None = None,
    ) -> EncodedBatch:
        """:meth:`encode_pixels` (anyres: :meth:`encode_tiles`) of prepared images (host numpy or device
        tensor pixels)."""
        if not prepared:
            return self._empty(
                features or self.settings.features, self.settings.pooled if pooled is None else pooled
            )
        if self.anyres_output is not None:
            tiles = np.concatenate([p.tiles for p in prepared])
            counts = [len(p.tiles) for p in prepared]
            return self.encode_tiles(
                tiles, counts, [p.grid for p in prepared], pooled=pooled, features=features
            )  # type: ignore[misc]
        if any(isinstance(p.pixels, torch.Tensor) for p in prepared):
            stack = torch.stack([self._as_tensor(p.pixels).to(self.device) for p in prepared])
        else:
            stack = np.stack([p.pixels for p in prepared])
        return self.encode_pixels(stack, pooled=pooled, features=features)

    def warmup(self, batch_size: int | None = None) -> float:
        """Run the model on blank batches (allocations, kernels, compilation). Returns seconds.

        Eager: one ``encode_pixels`` of ``batch_size`` (default 1). Compiled: one pass per batch
        bucket, so that no request or shard pays for a compilation later.
        """
        started = time.perf_counter()
        if self.fast.compiled is not None:
            for size in self.fast.buckets:
                self.encode_core(
                    torch.zeros((size, *self.input_shape), dtype=torch.uint8, device=self.device)
                )
        else:
            n = batch_size or 1
            self.encode_pixels(np.zeros((n, *self.input_shape), dtype=np.uint8), batch_size=n)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        if self.fast.compiled is not None:
            logger.info(
                "Compiled %d batch buckets %s in %.1fs",
                len(self.fast.buckets),
                list(self.fast.buckets),
                seconds,
            )
        return seconds

    def close(self) -> None:
        """Release the model (its device memory and compiled graphs); the encoder is unusable after."""
        self.tower = self.projector = None  # type: ignore[assignment]
        if self.fast.compiled is not None:
            torch._dynamo.reset()  # compiled graphs hold the weights too
        self.fast = FastPath(transforms={})
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- fast path (private) -----------------------------------------------------------------

    def _build_fast_path(self) -> FastPath:
        from .model import fast as fastpath

        cfg = self.config.model
        transforms = fastpath.apply_fast_path(self.tower, qkv=cfg.fuse_qkv, quick_gelu=cfg.fold_quick_gelu)
        compiled, buckets = None, ()
        if cfg.compile:
            buckets = self.settings.batch_buckets or fastpath.default_buckets(
                (self.settings.batch_size,), cfg.overlap_chunks
            )
            fastpath.ensure_recompile_limit(2 * len(buckets) + 4)
            compiled = fastpath.compile_static(self._run_model, cfg.compile_mode)
        logger.info(
            "Encoder fast path on %s (%s): transforms %s, %s, overlap_chunks %d",
            self.device,
            self.dtype,
            transforms or "none",
            f"torch.compile({cfg.compile_mode or 'default'}) buckets {list(buckets)}"
            if compiled
            else "eager",
            cfg.overlap_chunks,
        )
        return FastPath(
            transforms=transforms,
            compiled=compiled,
            buckets=tuple(buckets),
            overlap_chunks=cfg.overlap_chunks,
            cudagraphs=compiled is not None
            and self.device.type == "cuda"
            and cfg.compile_mode in CUDAGRAPH_COMPILE_MODES,
        )

    def _build_gpu_decoder(self) -> Any:
        if not self.config.decode.nvjpeg:
            return None
        from .images.gpu_decode import BatchedJpegDecoder

        decoder = BatchedJpegDecoder(self.spec, self.config.decode, self.device, use_gpu=True)
        return decoder if decoder.use_gpu else None

    def _run_model(self, values: torch.Tensor, project: bool, keep_tower: bool) -> dict[str, torch.Tensor]:
        """Tower (+ projector) on normalized pixels: what ``torch.compile`` captures."""
        tower = self.tower.encode(values)
        out: dict[str, torch.Tensor] = {}
        if keep_tower:
            out["tower"] = tower
        if project:
            out["projected"] = self.projector(tower)
        return out

    def _forward_device(self, batch: torch.Tensor, features: FeatureKind) -> dict[str, torch.Tensor]:
        """uint8 batch on the device → features in the compute dtype (padded to buckets when compiled)."""
        if self.tower is None:
            raise ModelStateError("this FeatureEncoder was closed")
        project, keep_tower = features in ("projected", "both"), features in ("tower", "both")
        values = self.normalizer(batch, torch.float32).to(self.dtype)
        fast = self.fast
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

    def _device_outputs(
        self, out: dict[str, torch.Tensor], pooled: bool, dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """Features in ``dtype`` (default: the returned dtype) (+ float32 mean over tokens), on the device."""
        result: dict[str, torch.Tensor] = {}
        first = out.get("projected", out.get("tower"))
        if pooled and first is not None:
            result["pooled"] = first.float().mean(dim=1)
        for name in ("projected", "tower"):
            if name in out:
                result[name] = out[name].to(dtype or self.output_dtype).contiguous()
        return result

    def _empty(self, features: FeatureKind, pooled: bool) -> EncodedBatch:
        """Zero-row results with the shapes and dtypes real ones have (e.g. a shard without a good image)."""

        def tensor(dim: int) -> np.ndarray | RaggedRows:
            if self.anyres_output == "packed":
                return RaggedRows.from_rows(
                    [], like=_host_array(torch.zeros((0, dim), dtype=self.output_dtype))
                )
            array = _host_array(torch.zeros((0, self.num_tokens, dim), dtype=self.output_dtype))
            if self.anyres_output == "tiles":
                return RaggedRows.from_rows([], like=array[None])
            return array

        projected = tensor(self.feature_dim) if features in ("projected", "both") else None
        tower = tensor(self.tower_dim) if features in ("tower", "both") else None
        pooled_dim = self.feature_dim if projected is not None else self.tower_dim
        return EncodedBatch(
            self.output_dtype_name,
            projected=projected,
            tower=tower,
            pooled=np.zeros((0, pooled_dim), np.float32) if pooled else None,
            grids=[] if self.anyres_output else None,
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
            "output_dtype": self.output_dtype_name,
            "anyres_output": self.anyres_output,
            "device": str(self.device),
            "resampler": resampler_name(self.spec.resample),
            "decode_route": "nvjpeg" if self.gpu_decoder is not None else "cpu",
        }
