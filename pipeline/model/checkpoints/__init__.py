"""Checkpoint resolution and loading, one module per layout behind :func:`resolve_model`.

- :mod:`~pipeline.model.checkpoints.llava`: an original LLaVA checkpoint (``mm_vision_tower``);
- :mod:`~pipeline.model.checkpoints.llava_hf`: a transformers ``LlavaForConditionalGeneration``;
- :mod:`~pipeline.model.checkpoints.clip`: a bare CLIP vision model + projector settings.

Resolution (:func:`resolve_model`) reads configs and computes weight digests without building
any module, so a job driver can fingerprint a run cheaply; :func:`load_model_modules` builds the
tower and projector from the resolved description (on an encoder actor or replica). Adding a
layout is adding a module with ``NAME``, ``detect``, ``resolve``, ``load_tower`` and
``projector_state`` to :data:`LAYOUTS`.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..constants import CHECKPOINT_LAYOUTS
from ..errors import CheckpointError, ErrorCode
from ..tower import CLIPVisionTower, quiet_progress_bars, resolve_device, resolve_dtype
from . import clip, llava, llava_hf
from .common import ResolvedModel, build_projector
from .files import CheckpointSource, load_state_strict

logger = logging.getLogger(__name__)

__all__ = [
    "LAYOUTS",
    "CheckpointSource",
    "ResolvedModel",
    "detect_layout",
    "load_model_modules",
    "resolve_model",
]

LAYOUTS: dict[str, ModuleType] = {module.NAME: module for module in (llava, llava_hf, clip)}
"""Layout name → its module, in detection order."""
assert tuple(LAYOUTS) == CHECKPOINT_LAYOUTS


def detect_layout(source: CheckpointSource, config_json: dict[str, Any]) -> ModuleType:
    """The layout module whose ``detect`` accepts the checkpoint's ``config.json``."""
    for module in LAYOUTS.values():
        if module.detect(config_json):
            return module
    raise CheckpointError(
        f"Cannot tell the format of {source.name!r}: its config.json has none of 'mm_vision_tower' "
        "(LLaVA), 'vision_config' + 'vision_feature_layer' (llava-hf) or model_type 'clip_vision_model'"
    )


def resolve_model(cfg: ModelConfig) -> ResolvedModel:
    """Read the checkpoint's configuration and weight digests; build no module."""
    if cfg.checkpoint:
        source: CheckpointSource | None = CheckpointSource(cfg.checkpoint, cfg.local_files_only)
        config_json = source.json("config.json")  # type: ignore[union-attr]
        layout = detect_layout(source, config_json)  # type: ignore[arg-type]
    elif cfg.vision_tower:
        source, config_json, layout = None, {}, clip
    else:
        raise CheckpointError(
            "No model given: set model.checkpoint (a LLaVA, llava-hf or CLIP checkpoint) or model.vision_tower "
            "(a CLIP vision model) in the config, or pass --model",
            code=ErrorCode.CHECKPOINT_NOT_FOUND,
        )
    return layout.resolve(cfg, source, config_json)


def load_newline(
    resolved: ResolvedModel, *, dtype: torch.dtype, device: torch.device, local_files_only: bool = True
) -> torch.Tensor | None:
    """LLaVA-NeXT's ``image_newline`` of the checkpoint (None when it has none), checked against its digest."""
    if resolved.newline_sha256 is None:
        return None
    from .files import digest_tensors

    newline = LAYOUTS[resolved.format].load_newline(resolved, local_files_only)
    if newline is None or digest_tensors({"image_newline": newline}) != resolved.newline_sha256:
        raise CheckpointError(f"image_newline of {resolved.checkpoint!r} changed since it was resolved")
    return newline.to(device=device, dtype=dtype)


def load_model_modules(
    resolved: ResolvedModel,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    attn_implementation: str = "sdpa",
    local_files_only: bool = True,
) -> tuple[CLIPVisionTower, nn.Module]:
    """Build the tower and the projector described by ``resolved``, on ``device`` in ``dtype``."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    layout = LAYOUTS[resolved.format]
    with quiet_progress_bars():  # one "Loading weights" bar per actor/replica otherwise
        tower = layout.load_tower(resolved, dt, dev, attn_implementation, local_files_only)
    projector = build_projector(resolved.projector_type, resolved.mm_hidden_size, resolved.hidden_size)
    if resolved.projector_type != "identity":
        state = layout.projector_state(resolved, local_files_only)
        load_state_strict(projector, state, f"projector from {resolved.projector_weights}")
    projector.requires_grad_(False)
    projector.eval()
    projector.to(device=dev, dtype=dt)
    return tower, projector
