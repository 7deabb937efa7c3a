"""The original LLaVA layout (haotian-liu/LLaVA): ``config.json`` names the tower and the projector.

``mm_vision_tower`` (a model id, or a path relative to the checkpoint), ``mm_vision_select_layer``,
``mm_vision_select_feature``, ``mm_projector_type``, ``mm_hidden_size``, ``hidden_size`` and
``image_aspect_ratio``. The projector's weights are ``model.mm_projector.*`` inside the (sharded)
``*.safetensors``/``*.bin`` files (only the shards that hold them are opened, through the shard
index: the language model's weights are never read), or a standalone ``mm_projector.bin``.
The tower is a CLIP model of its own, with its ``preprocessor_config.json``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, MissingWeightError
from .common import (
    LLAVA_PROJECTOR_PREFIXES,
    ResolvedModel,
    clip_tower_digest,
    finish,
    load_clip_tower,
    read_projector_file,
    tower_source,
)
from .files import (
    CheckpointSource,
    image_processor_dict,
    read_tensors,
    read_weight_files,
    strip_prefix,
    vision_config_dict,
)

NAME = "llava"


def detect(config_json: dict[str, Any]) -> bool:
    return "mm_vision_tower" in config_json


def resolve(cfg: ModelConfig, source: CheckpointSource | None, config_json: dict[str, Any]) -> ResolvedModel:
    assert source is not None
    tower = tower_source(cfg.vision_tower or config_json["mm_vision_tower"], source, cfg.local_files_only)
    vision_config = vision_config_dict(tower.json("config.json"))
    defaults = {
        "select_layer": config_json.get("mm_vision_select_layer", -2),
        "select_feature": config_json.get("mm_vision_select_feature", "patch"),
        "projector_type": config_json.get("mm_projector_type", "linear"),
        "mm_hidden_size": config_json.get("mm_hidden_size"),
        "hidden_size": config_json.get("hidden_size"),
        "image_aspect_ratio": config_json.get("image_aspect_ratio", "pad"),
    }

    def read_projector() -> tuple[dict[str, torch.Tensor], str]:
        if cfg.projector_weights:
            return read_projector_file(cfg.projector_weights), cfg.projector_weights
        return _checkpoint_projector(source), source.name

    return finish(
        cfg,
        layout=NAME,
        checkpoint=cfg.checkpoint,
        tower=tower,
        tower_sha256=clip_tower_digest(tower),
        vision_config=vision_config,
        image_processor=image_processor_dict(tower),
        defaults=defaults,
        read_projector=read_projector,
    )


def _checkpoint_projector(source: CheckpointSource) -> dict[str, torch.Tensor]:
    try:
        tensors, _ = read_tensors(source, LLAVA_PROJECTOR_PREFIXES)
    except CheckpointError:
        tensors = {}
    if not tensors:
        standalone = source.file("mm_projector.bin") or source.file("mm_projector.safetensors")
        if standalone is None:
            raise MissingWeightError(
                f"No projector weights (model.mm_projector.*) in {source.name!r} and no mm_projector.bin beside it"
            )
        tensors = read_weight_files([standalone], lambda key: True)
    return strip_prefix(tensors, LLAVA_PROJECTOR_PREFIXES)


def projector_state(resolved: ResolvedModel, local_files_only: bool) -> dict[str, torch.Tensor]:
    if resolved.projector_weights == resolved.checkpoint and resolved.checkpoint:
        return _checkpoint_projector(CheckpointSource(resolved.checkpoint, local_files_only))
    return read_projector_file(str(resolved.projector_weights))


load_tower = load_clip_tower
