"""A bare CLIP vision model (``model_type: clip_vision_model``) plus projector settings from the config.

The projector is ``model.projector_weights`` (a standalone ``mm_projector.bin``/``.safetensors``),
or ``identity`` (the tower's features themselves); its type and widths come from the configuration.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from .common import (
    ResolvedModel,
    clip_tower_digest,
    finish,
    load_clip_tower,
    read_projector_file,
    tower_source,
)
from .files import CheckpointSource, image_processor_dict, vision_config_dict

NAME = "clip"


def detect(config_json: dict[str, Any]) -> bool:
    return config_json.get("model_type") in ("clip_vision_model", "clip")


def resolve(cfg: ModelConfig, source: CheckpointSource | None, config_json: dict[str, Any]) -> ResolvedModel:
    tower = tower_source(cfg.vision_tower, None, cfg.local_files_only) if cfg.vision_tower else source
    assert tower is not None
    vision_config = vision_config_dict(tower.json("config.json"))
    defaults = {
        "select_layer": -2,
        "select_feature": "patch",
        "projector_type": "identity",
        "image_aspect_ratio": "crop",
    }

    def read_projector() -> tuple[dict[str, torch.Tensor], str]:
        if not cfg.projector_weights:
            raise CheckpointError(
                f"Projector {cfg.projector_type!r} needs weights: set model.projector_weights (mm_projector.bin or "
                ".safetensors) or use projector_type 'identity'"
            )
        return read_projector_file(cfg.projector_weights), cfg.projector_weights

    return finish(
        cfg,
        layout=NAME,
        checkpoint=None,
        tower=tower,
        tower_sha256=clip_tower_digest(tower),
        vision_config=vision_config,
        image_processor=image_processor_dict(tower),
        defaults=defaults,
        read_projector=read_projector,
    )


def projector_state(resolved: ResolvedModel, local_files_only: bool) -> dict[str, torch.Tensor]:
    return read_projector_file(str(resolved.projector_weights))


load_tower = load_clip_tower


def load_newline(resolved: ResolvedModel, local_files_only: bool) -> None:
    return None  # a bare CLIP tower has no LLaVA-NeXT newline
