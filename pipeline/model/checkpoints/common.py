"""What every checkpoint layout shares: :class:`ResolvedModel`, settings, the tower, the projector check.

A layout module (``llava``, ``llava_hf``, ``clip``) reads its own files and settings, then calls
:func:`finish` to merge them with the configuration, check them (select layer against the
tower's depth, projector weights against the projector type) and build the :class:`ResolvedModel`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..constants import ASPECT_RATIOS, SELECT_FEATURES, hidden_state_index, validate_projector_type
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
    """Everything needed to build the encoder and to fingerprint its outputs (picklable)."""

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
    select_layer: int
    """Hidden layer the features are taken from."""
    select_feature: str
    """``patch`` or ``cls_patch``."""
    projector_type: str
    """``linear``, ``mlp{N}x_gelu`` or ``identity``."""
    mm_hidden_size: int
    """Projector input width (the tower's hidden size)."""
    hidden_size: int | None
    """Projector output width (None for identity)."""
    projector_sha256: str
    """Digest of the projector's stored weights (of nothing, for identity)."""
    projector_weights: str | None
    """Where the projector weights are read from: the checkpoint, a file, or None (identity)."""
    image_aspect_ratio: str
    """``pad``, ``square`` or ``crop``."""
    image_processor: dict[str, Any] = field(compare=False)
    """The tower's CLIPImageProcessor settings (size, crop, mean, std, resample)."""
    vision_config: dict[str, Any] = field(compare=False)
    """The tower's CLIPVisionConfig as a dict."""
    image_size: int = 0
    """Input resolution of the tower."""
    patch_size: int = 0
    """Patch size of the tower."""

    @property
    def num_tokens(self) -> int:
        n = (self.image_size // self.patch_size) ** 2
        return n + (1 if self.select_feature == "cls_patch" else 0)

    @property
    def feature_dim(self) -> int:
        return self.mm_hidden_size if self.projector_type == "identity" else int(self.hidden_size or 0)

    def describe(self) -> dict[str, Any]:
        """JSON-able description (what outputs record)."""
        out = asdict(self)
        out.pop("vision_config")
        return out


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
    """Digest of a CLIP model's vision weights (a full CLIP's text tower left out)."""
    tensors, _ = read_tensors(source, ("",))
    return digest_tensors({k: v for k, v in tensors.items() if not k.startswith(("text_", "logit_scale"))})


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
) -> ResolvedModel:
    """Merge the checkpoint's ``defaults`` with the configuration's overrides, check the result and
    build the :class:`ResolvedModel` (no module is kept; the projector is probed on the CPU).

    ``read_projector()`` returns the projector's weights and where they were read from; it is
    not called for an ``identity`` projector."""
    settings = {key: pick(getattr(cfg, key), defaults.get(key)) for key in SETTINGS}
    validate_projector_type(settings["projector_type"])
    if settings["image_aspect_ratio"] not in ASPECT_RATIOS:
        raise CheckpointError(
            f"image_aspect_ratio {settings['image_aspect_ratio']!r} is not supported ({', '.join(ASPECT_RATIOS)})"
        )
    if settings["select_feature"] not in SELECT_FEATURES:
        raise CheckpointError(f"Unexpected select feature: {settings['select_feature']!r}")
    if not isinstance(settings["select_layer"], int) or isinstance(settings["select_layer"], bool):
        raise CheckpointError(
            f"select_layer={settings['select_layer']!r}: only a single layer index is supported"
        )
    try:
        hidden_state_index(settings["select_layer"], int(vision_config.get("num_hidden_layers", 12)))
    except ConfigError as exc:
        raise ConfigError(f"model.{exc.message} of {tower.name!r}") from None
    if settings["mm_hidden_size"] is None:
        settings["mm_hidden_size"] = vision_config.get("hidden_size")
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
    return ResolvedModel(
        format=layout,
        checkpoint=checkpoint,
        vision_tower=tower_location(tower),
        tower_revision=tower.revision,
        tower_sha256=tower_sha256,
        select_layer=int(settings["select_layer"]),
        select_feature=settings["select_feature"],
        projector_type=settings["projector_type"],
        mm_hidden_size=int(settings["mm_hidden_size"]),
        hidden_size=None if settings["hidden_size"] is None else int(settings["hidden_size"]),
        projector_sha256=digest_tensors(projector_state),
        projector_weights=projector_from,
        image_aspect_ratio=settings["image_aspect_ratio"],
        image_processor=image_processor,
        vision_config=vision_config,
        image_size=int(vision_config.get("image_size", 224)),
        patch_size=int(vision_config.get("patch_size", 32)),
    )


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
