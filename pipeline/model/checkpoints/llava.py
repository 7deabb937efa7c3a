"""The original LLaVA layout (haotian-liu/LLaVA, LLaVA-1.5 and LLaVA-NeXT/1.6): ``config.json`` names
the tower and the projector.

``mm_vision_tower`` (a model id, or a path relative to the checkpoint), ``mm_vision_select_layer``,
``mm_vision_select_feature``, ``mm_projector_type``, ``mm_hidden_size``, ``hidden_size`` and
``image_aspect_ratio``; LLaVA-NeXT adds ``image_aspect_ratio: anyres`` (or ``anyres_max_N``),
``image_grid_pinpoints`` (``[width, height]`` pairs, or the ``"(1x1),...,(6x6)"`` string form) and
``mm_patch_merge_type``, with ``model.image_newline`` among the weights.

The projector's weights are ``model.mm_projector.*`` inside the (sharded) ``*.safetensors``/``*.bin``
files (only the shards that hold them are opened, through the shard index: the language model's
weights are never read), or a standalone ``mm_projector.bin``. The tower is the CLIP model the
config names — unless the checkpoint holds ``model.vision_tower.vision_tower.*`` weights (LLaVA-1.6
trained its tower: ``from_pretrained`` loads those over the CLIP model's), which are then the tower.
Settings LLaVA has and this product does not implement are refused: ``s2`` (CLIPVisionTowerS2),
the ``highres``/``crop_split`` aspect ratios, other merge types.
"""

from __future__ import annotations

from typing import Any

import torch

from ..anyres import expand_pinpoints
from ..config import ModelConfig
from ..errors import CheckpointError, MissingWeightError
from ..tower import CLIPVisionTower
from .common import (
    LLAVA_PROJECTOR_PREFIXES,
    LayoutRules,
    ResolvedModel,
    checkpoint_tower_digest,
    clip_tower_digest,
    finish,
    load_clip_tower,
    read_projector_file,
    tower_from_checkpoint,
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
TOWER_PREFIXES = ("model.vision_tower.vision_tower.",)
NEWLINE_KEYS = ("model.image_newline", "image_newline")


def detect(config_json: dict[str, Any]) -> bool:
    return "mm_vision_tower" in config_json


def _refuse_unimplemented(config_json: dict[str, Any]) -> None:
    if config_json.get("s2"):
        raise CheckpointError(
            f"s2: true (CLIPVisionTowerS2, multi-scale features at scales {config_json.get('s2_scales', '336,672,1008')}) "
            "is not implemented: the features would not be LLaVA's"
        )


def read_newline(source: CheckpointSource) -> torch.Tensor | None:
    """The checkpoint's ``image_newline`` (LLaVA-NeXT), or None when it has none."""
    try:
        tensors, _ = read_tensors(source, NEWLINE_KEYS)
    except CheckpointError:
        return None
    return next((tensors[k] for k in NEWLINE_KEYS if k in tensors), None)


def resolve(cfg: ModelConfig, source: CheckpointSource | None, config_json: dict[str, Any]) -> ResolvedModel:
    assert source is not None
    _refuse_unimplemented(config_json)
    tower = tower_source(cfg.vision_tower or config_json["mm_vision_tower"], source, cfg.local_files_only)
    vision_config = vision_config_dict(tower.json("config.json"))
    # LLaVA-1.6 stores its trained tower in the checkpoint; a tower given in the config replaces it.
    stored = None if cfg.vision_tower else checkpoint_tower_digest(source, TOWER_PREFIXES)
    defaults = {
        "select_layer": config_json.get("mm_vision_select_layer", -2),
        "select_feature": config_json.get("mm_vision_select_feature", "patch"),
        "projector_type": config_json.get("mm_projector_type", "linear"),
        "mm_hidden_size": config_json.get("mm_hidden_size"),
        "hidden_size": config_json.get("hidden_size"),
        "image_aspect_ratio": config_json.get("image_aspect_ratio", "pad"),
        "patch_merge_type": config_json.get("mm_patch_merge_type", "flat"),
    }
    pinpoints = config_json.get("image_grid_pinpoints")
    rules = LayoutRules(
        alpha="drop",
        layer_lists=False,
        unpad_rounding="floor",
        anyres_resample=3,  # LLaVA resizes the canvas and the base with PIL's default filter, bicubic
        pinpoints=(lambda tile: expand_pinpoints(pinpoints, tile)) if pinpoints is not None else None,
        read_newline=lambda: read_newline(source),
    )

    def read_projector() -> tuple[dict[str, torch.Tensor], str]:
        if cfg.projector_weights:
            return read_projector_file(cfg.projector_weights), cfg.projector_weights
        return _checkpoint_projector(source), source.name

    return finish(
        cfg,
        layout=NAME,
        checkpoint=cfg.checkpoint,
        tower=tower,
        tower_sha256=stored or clip_tower_digest(tower),
        vision_config=vision_config,
        image_processor=image_processor_dict(tower),
        defaults=defaults,
        read_projector=read_projector,
        rules=rules,
        tower_in_checkpoint=stored is not None,
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


def load_newline(resolved: ResolvedModel, local_files_only: bool) -> torch.Tensor | None:
    return read_newline(CheckpointSource(str(resolved.checkpoint), local_files_only))


def load_tower(
    resolved: ResolvedModel, dtype: torch.dtype, device: torch.device, attn: str, local_files_only: bool
) -> CLIPVisionTower:
    if resolved.tower_in_checkpoint:
        source = CheckpointSource(str(resolved.checkpoint), local_files_only)
        return tower_from_checkpoint(resolved, source, TOWER_PREFIXES, dtype, device, attn)
    return load_clip_tower(resolved, dtype, device, attn, local_files_only)
