"""What every checkpoint layout shares: :class:`ResolvedModel`, settings, the tower, the projector check.

A layout module (``llava``, ``llava_hf``, ``clip``) reads its own files and settings, then calls
:func:`finish` to merge them with the configuration, check them (select layer against the
tower's depth, projector weights against the projector type) and build the :class:`ResolvedModel`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..constants import (
    PATCH_MERGE_TYPES,
    SELECT_FEATURES,
    hidden_state_index,
    parse_aspect_ratio,
    validate_projector_type,
)
from ..errors import CheckpointError, ConfigError, ErrorCode
from ..projector import build_vision_projector
from ..tower import CLIPVisionTower
from .files import (
    CheckpointSource,
    digest_tensors,
    load_state_strict,
    read_tensors,
    read_weight_files,
    strip_prefix,
)

logger = logging.getLogger(__name__)

LLAVA_PROJECTOR_PREFIXES = ("model.mm_projector.", "mm_projector.")
"""Where original LLaVA checkpoints (and standalone ``mm_projector.bin`` files) keep the projector."""
SETTINGS = (
    "select_layer",
    "select_feature",
    "projector_type",
    "mm_hidden_size",
    "hidden_size",
    "image_aspect_ratio",
)
"""Model settings a checkpoint provides defaults for and the configuration may override."""


@dataclass(frozen=True)
class ResolvedModel:
    """Everything needed to build the encoder and to fingerprint its outputs (picklable).

    :meth:`numerics` is what the numbers depend on (weight digests and semantics, never where the
    files are): the fingerprint. :meth:`sources` says where everything was read from.
    """

    format: str
    """The checkpoint layout: ``llava``, ``llava-hf`` or ``clip``."""
    checkpoint: str | None
    """The checkpoint directory or id (None for a bare CLIP tower)."""
    vision_tower: str
    """Where the CLIP tower is loaded from (a directory or id; the checkpoint for llava-hf)."""
    tower_revision: str | None
    """Commit of the tower in the HF cache, when loaded from there."""
    tower_sha256: str
    """Digest of the tower's stored weights."""
    select_layer: int | tuple[int, ...]
    """Hidden layer the features are taken from (several: concatenated along the channels)."""
    select_feature: str
    """``patch`` or ``cls_patch``."""
    projector_type: str
    """``linear``, ``mlp{N}x_gelu`` or ``identity``."""
    mm_hidden_size: int
    """Projector input width (the tower's hidden size, times the number of selected layers)."""
    hidden_size: int | None
    """Projector output width (None for identity)."""
    projector_sha256: str
    """Digest of the projector's stored weights (of nothing, for identity)."""
    projector_weights: str | None
    """Where the projector weights are read from: the checkpoint, a file, or None (identity)."""
    image_aspect_ratio: str
    """``pad``, ``square``, ``crop`` or ``anyres``."""
    image_processor: dict[str, Any] = field(compare=False)
    """The tower's image processor settings (size, crop, mean, std, resample)."""
    vision_config: dict[str, Any] = field(compare=False)
    """The tower's CLIPVisionConfig as a dict."""
    image_size: int = 0
    """Input resolution of the tower."""
    patch_size: int = 0
    """Patch size of the tower."""
    alpha: str = "drop"
    """The layout's rule for transparency: ``drop`` (LLaVA's convert("RGB")) or ``white`` (transformers')."""
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    """anyres: the candidate canvases, ``(width, height)`` each, in the checkpoint's order."""
    anyres_resample: int = 3
    """anyres: the filter of the canvas and base resizes (LLaVA: bicubic; transformers: the processor's)."""
    anyres_max: int | None = None
    """anyres: LLaVA-NeXT's ``anyres_max_N`` (packed features shrunk to about N tiles)."""
    patch_merge_type: str = "flat"
    """anyres: how tile features are packed (``flat``, ``spatial``, ``spatial_unpad``)."""
    unpad_rounding: str = "floor"
    """anyres: how ``unpad_image`` counts kept lines (``floor``: LLaVA; ``round``: transformers)."""
    newline_sha256: str | None = None
    """anyres: digest of ``image_newline`` (needed by ``spatial_unpad``), None when there is none."""
    tower_in_checkpoint: bool = False
    """The tower's weights are read out of the checkpoint's shards (llava-hf; LLaVA-1.6, which trained
    its tower) rather than from the CLIP model the config names."""

    @property
    def select_layers(self) -> tuple[int, ...]:
        """The selected hidden layers as a tuple."""
        return self.select_layer if isinstance(self.select_layer, tuple) else (self.select_layer,)

    @property
    def num_tokens(self) -> int:
        """Tokens per tile (per image, except for anyres)."""
        n = (self.image_size // self.patch_size) ** 2
        return n + (1 if self.select_feature == "cls_patch" else 0)

    @property
    def feature_dim(self) -> int:
        return self.mm_hidden_size if self.projector_type == "identity" else int(self.hidden_size or 0)

    @property
    def anyres(self) -> bool:
        return self.image_aspect_ratio == "anyres"

    def numerics(self) -> dict[str, Any]:
        """What the features depend on: digests and semantics, not paths (the fingerprinted part)."""
        out = asdict(self)
        for key in (
            "checkpoint",
            "vision_tower",
            "tower_revision",
            "projector_weights",
            "vision_config",
            "image_processor",
        ):
            out.pop(key)
        out["vision_config"] = {
            k: v for k, v in sorted(self.vision_config.items()) if k in _ARCHITECTURE_KEYS
        }
        return json.loads(json.dumps(out, default=list))

    def sources(self) -> dict[str, Any]:
        """Where the model was read from (recorded with outputs, not fingerprinted)."""
        return {
            "checkpoint": self.checkpoint,
            "vision_tower": self.vision_tower,
            "tower_revision": self.tower_revision,
            "projector_weights": self.projector_weights,
        }

    def describe(self) -> dict[str, Any]:
        """JSON-able description (what outputs record): the numerics and the sources."""
        return {**self.numerics(), **self.sources()}


_ARCHITECTURE_KEYS = frozenset(
    {
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "image_size",
        "patch_size",
        "num_channels",
        "hidden_act",
        "layer_norm_eps",
        "projection_dim",
    }
)
"""The tower config keys that change its numbers (the rest: names, dtypes, bookkeeping)."""


def pick(override: Any, default: Any) -> Any:
    """The configuration's value when given, else the checkpoint's."""
    return override if override is not None else default


def tower_source(name: str, base: CheckpointSource | None, local_files_only: bool) -> CheckpointSource:
    """The CLIP tower a checkpoint names; a relative path is resolved against the checkpoint folder."""
    if base is not None and base.local_dir is not None and not Path(name).is_absolute():
        candidate = base.local_dir / name
        if candidate.is_dir():
            return CheckpointSource(str(candidate), local_files_only)
    return CheckpointSource(name, local_files_only)


def tower_location(source: CheckpointSource) -> str:
    """How a resolved model names its tower: the absolute folder, or the model id."""
    return str(source.root) if source.local_dir else source.name


def clip_tower_digest(source: CheckpointSource) -> str:
    """Digest of a CLIP model's vision weights (a full CLIP's text tower left out; names with or
    without the ``vision_model.`` infix, which transformers 4 and 5 spell differently, digest alike)."""
    tensors, _ = read_tensors(source, ("",))
    vision = {k: v for k, v in tensors.items() if not k.startswith(("text_", "logit_scale"))}
    return digest_tensors({k.removeprefix("vision_model."): v for k, v in vision.items()})


def read_projector_file(path: str) -> dict[str, torch.Tensor]:
    """A standalone projector file (``mm_projector.bin`` / ``.safetensors``), LLaVA's prefixes stripped."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(
            f"Projector weights file {path!r} not found", code=ErrorCode.CHECKPOINT_NOT_FOUND
        )
    return strip_prefix(read_weight_files([file], lambda key: True), LLAVA_PROJECTOR_PREFIXES)


def _infer_hidden_size(state: dict[str, torch.Tensor]) -> int | None:
    for key in ("weight", "0.weight"):
        if key in state:
            return int(state[key].shape[0])
    return None


def build_projector(resolved_type: str, mm_hidden_size: int | None, hidden_size: int | None) -> nn.Module:
    return build_vision_projector(
        {"mm_projector_type": resolved_type, "mm_hidden_size": mm_hidden_size, "hidden_size": hidden_size}
    )


@dataclass(frozen=True)
class LayoutRules:
    """What a checkpoint layout decides beyond the model settings (its reference's semantics)."""

    alpha: str = "drop"
    """Transparency: ``drop`` (LLaVA's loader) or ``white`` (transformers' processors)."""
    layer_lists: bool = False
    """Whether ``select_layer`` may be a list (transformers' llava classes; not original LLaVA)."""
    unpad_rounding: str = "floor"
    """anyres: ``floor`` (LLaVA) or ``round`` (transformers)."""
    anyres_resample: int = 3
    """anyres: the filter of the canvas and base resizes."""
    pinpoints: Callable[[int], tuple[tuple[int, int], ...]] | None = None
    """anyres: the checkpoint's grid pinpoints as ``(width, height)``, given the tile size."""
    read_newline: Callable[[], torch.Tensor | None] | None = None
    """anyres: the checkpoint's ``image_newline`` (None when it has none)."""


def _layers(value: Any, num_layers: int, rules: LayoutRules, tower: str) -> int | tuple[int, ...]:
    layers = tuple(value) if isinstance(value, list | tuple) else (value,)
    if not layers or any(not isinstance(v, int) or isinstance(v, bool) for v in layers):
        raise CheckpointError(f"select_layer={value!r}: expected a layer index or a list of them")
    if len(layers) > 1 and not rules.layer_lists:
        raise CheckpointError(
            f"select_layer={list(layers)}: several layers are a transformers (llava-hf) feature; LLaVA's own "
            "CLIPVisionTower takes one"
        )
    for layer in layers:
        try:
            hidden_state_index(layer, num_layers)
        except ConfigError as exc:
            raise ConfigError(f"model.{exc.message} of {tower!r}") from None
    return layers[0] if len(layers) == 1 else layers


def finish(
    cfg: ModelConfig,
    *,
    layout: str,
    checkpoint: str | None,
    tower: CheckpointSource,
    tower_sha256: str,
    vision_config: dict[str, Any],
    image_processor: dict[str, Any],
    defaults: dict[str, Any],
    read_projector: Callable[[], tuple[dict[str, torch.Tensor], str]],
    rules: LayoutRules | None = None,
    tower_in_checkpoint: bool = False,
) -> ResolvedModel:
    """Merge the checkpoint's ``defaults`` with the configuration's overrides, check the result and
    build the :class:`ResolvedModel` (no module is kept; the projector is probed on the CPU).

    ``read_projector()`` returns the projector's weights and where they were read from; it is
    not called for an ``identity`` projector. ``rules``: the layout's own semantics."""
    rules = rules or LayoutRules()
    settings = {key: pick(getattr(cfg, key), defaults.get(key)) for key in SETTINGS}
    aspect, anyres_max = parse_aspect_ratio(settings["image_aspect_ratio"])
    anyres_max = pick(cfg.anyres_max, anyres_max)
    validate_projector_type(settings["projector_type"])
    if settings["select_feature"] not in SELECT_FEATURES:
        raise CheckpointError(f"Unexpected select feature: {settings['select_feature']!r}")
    num_layers = int(vision_config.get("num_hidden_layers", 12))
    select_layer = _layers(settings["select_layer"], num_layers, rules, tower.name)
    width = len(select_layer) if isinstance(select_layer, tuple) else 1
    if settings["mm_hidden_size"] is None:
        settings["mm_hidden_size"] = int(vision_config.get("hidden_size", 0)) * width
    projector_state: dict[str, torch.Tensor] = {}
    projector_from: str | None = None
    if settings["projector_type"] != "identity":
        projector_state, projector_from = read_projector()
        if settings["hidden_size"] is None:
            settings["hidden_size"] = _infer_hidden_size(projector_state)
        # Check the weights fit the configured projector now, on the driver, not later on an actor.
        probe = build_projector(
            settings["projector_type"], settings["mm_hidden_size"], settings["hidden_size"]
        )
        load_state_strict(
            probe, projector_state, f"projector {settings['projector_type']} from {projector_from}"
        )
    image_size = int(vision_config.get("image_size", 224))
    anyres: dict[str, Any] = {}
    if aspect == "anyres":
        anyres = _anyres_settings(cfg, defaults, rules, settings, image_size)
    elif anyres_max is not None:
        raise ConfigError(f"anyres_max={anyres_max} needs image_aspect_ratio anyres, not {aspect!r}")
    return ResolvedModel(
        format=layout,
        checkpoint=checkpoint,
        vision_tower=tower_location(tower),
        tower_revision=tower.revision,
        tower_sha256=tower_sha256,
        select_layer=select_layer,
        select_feature=settings["select_feature"],
        projector_type=settings["projector_type"],
        mm_hidden_size=int(settings["mm_hidden_size"]),
        hidden_size=None if settings["hidden_size"] is None else int(settings["hidden_size"]),
        projector_sha256=digest_tensors(projector_state),
        projector_weights=projector_from,
        image_aspect_ratio=aspect,
        image_processor=image_processor,
        vision_config=vision_config,
        image_size=image_size,
        patch_size=int(vision_config.get("patch_size", 32)),
        alpha=rules.alpha,
        anyres_max=anyres_max if aspect == "anyres" else None,
        tower_in_checkpoint=tower_in_checkpoint,
        **anyres,
    )


def _anyres_settings(
    cfg: ModelConfig, defaults: dict[str, Any], rules: LayoutRules, settings: dict[str, Any], image_size: int
) -> dict[str, Any]:
    """The anyres fields of a resolved model: pinpoints, merge type, rounding, the newline's digest."""
    if rules.pinpoints is None:
        raise CheckpointError(
            "image_aspect_ratio anyres needs image_grid_pinpoints in the checkpoint's config"
        )
    merge = pick(cfg.patch_merge_type, defaults.get("patch_merge_type", "flat"))
    if merge not in PATCH_MERGE_TYPES:
        raise CheckpointError(
            f"mm_patch_merge_type {merge!r} is not implemented (implemented: {', '.join(PATCH_MERGE_TYPES)})"
        )
    if merge != "flat" and settings["select_feature"] != "patch":
        raise CheckpointError(
            f"mm_patch_merge_type {merge!r} lays the patches out on their grid, which needs select_feature "
            f"'patch' (LLaVA asserts it), not {settings['select_feature']!r}"
        )
    newline = rules.read_newline() if rules.read_newline is not None else None
    if newline is not None and (newline.ndim != 1 or newline.shape[0] != settings["hidden_size"]):
        raise CheckpointError(
            f"image_newline has shape {tuple(newline.shape)}, expected ({settings['hidden_size']},) (the projector's width)"
        )
    return {
        "image_grid_pinpoints": rules.pinpoints(image_size),
        "anyres_resample": rules.anyres_resample,
        "patch_merge_type": merge,
        "unpad_rounding": rules.unpad_rounding,
        "newline_sha256": digest_tensors({"image_newline": newline}) if newline is not None else None,
    }


def tower_args(resolved: ResolvedModel) -> dict[str, Any]:
    """The ``args`` LLaVA's ``CLIPVisionTower`` takes, for a resolved model."""
    return {
        "mm_vision_select_layer": resolved.select_layer,
        "mm_vision_select_feature": resolved.select_feature,
    }


def load_clip_tower(
    resolved: ResolvedModel, dtype: torch.dtype, device: torch.device, attn: str, local_files_only: bool
) -> CLIPVisionTower:
    """The tower from a CLIP model directory or id (``CLIPVisionModel.from_pretrained``)."""
    return CLIPVisionTower(
        resolved.vision_tower,
        tower_args(resolved),
        dtype=dtype,
        device=device,
        attn_implementation=attn,
        local_files_only=local_files_only,
    )


def tower_state(
    tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...], expected: set[str]
) -> dict[str, torch.Tensor]:
    """A CLIP vision tower's state dict out of a checkpoint's tensors: ``prefixes`` stripped, with or
    without the ``vision_model.`` infix (transformers 4 hub files have it, transformers 5 writes none)."""
    state = {}
    for key, value in strip_prefix(tensors, prefixes).items():
        if (
            key not in expected
            and key.startswith("vision_model.")
            and key[len("vision_model.") :] in expected
        ):
            key = key[len("vision_model.") :]
        elif key not in expected and f"vision_model.{key}" in expected:
            key = f"vision_model.{key}"
        state[key] = value
    return {k: v for k, v in state.items() if not k.endswith("position_ids") or k in expected}


def tower_from_checkpoint(
    resolved: ResolvedModel,
    source: CheckpointSource,
    prefixes: tuple[str, ...],
    dtype: torch.dtype,
    device: torch.device,
    attn: str,
) -> CLIPVisionTower:
    """The tower of ``resolved.vision_config`` with the weights stored under ``prefixes`` in ``source``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from ..tower import image_processor_class

    vision_cfg = CLIPVisionConfig(**{k: v for k, v in resolved.vision_config.items() if k != "model_type"})
    model = CLIPVisionModel._from_config(vision_cfg, attn_implementation=attn, dtype=torch.float32)
    tensors, _ = read_tensors(source, prefixes)
    state = tower_state(tensors, prefixes, set(model.state_dict()))
    load_state_strict(model, state, f"vision tower from {source.name}")
    model.to(device=device, dtype=dtype)
    processor = (
        image_processor_class().from_dict(resolved.image_processor) if resolved.image_processor else None
    )
    return CLIPVisionTower.from_model(model, tower_args(resolved), processor, name=source.name)


def checkpoint_tower_digest(source: CheckpointSource, prefixes: tuple[str, ...]) -> str | None:
    """Digest of the tower weights stored under ``prefixes`` in a checkpoint (None when there are none),
    independent of how their names are spelled (with or without ``vision_model.``)."""
    try:
        tensors, _ = read_tensors(source, prefixes)
    except CheckpointError:
        return None
    if not tensors:
        return None
    state = strip_prefix(tensors, prefixes)
    return digest_tensors({k.removeprefix("vision_model."): v for k, v in state.items()})
