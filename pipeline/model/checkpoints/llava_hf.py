"""The llava-hf layout: a ``LlavaForConditionalGeneration`` checkpoint saved by transformers.

``config.json`` has ``vision_config``, ``vision_feature_layer``, ``vision_feature_select_strategy``
(``default`` drops CLS, ``full`` keeps it), ``projector_hidden_act`` and ``text_config.hidden_size``;
the CLIP tower's weights (``model.vision_tower.*``) and the projector's
(``model.multi_modal_projector.linear_1/2``, LLaVA's ``mlp2x_gelu``) are read out of the
checkpoint's shards. The image processor is the checkpoint's own ``preprocessor_config.json``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from ..tower import CLIPVisionTower, image_processor_class
from .common import (
    ResolvedModel,
    clip_tower_digest,
    finish,
    load_clip_tower,
    tower_args,
    tower_location,
    tower_source,
)
from .files import (
    CheckpointSource,
    digest_tensors,
    image_processor_dict,
    load_state_strict,
    read_tensors,
    strip_prefix,
    vision_config_dict,
)

NAME = "llava-hf"
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
_TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.")
_PROJECTOR_RENAME = {"linear_1": "0", "linear_2": "2"}
_SELECT_STRATEGIES = {"default": "patch", "full": "cls_patch"}


def detect(config_json: dict[str, Any]) -> bool:
    return "vision_config" in config_json and (
        config_json.get("model_type") == "llava" or "vision_feature_layer" in config_json
    )


def resolve(cfg: ModelConfig, source: CheckpointSource | None, config_json: dict[str, Any]) -> ResolvedModel:
    assert source is not None
    layer = config_json.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise CheckpointError(f"vision_feature_layer={layer!r}: only a single layer is supported")
    strategy = config_json.get("vision_feature_select_strategy", "default")
    if strategy not in _SELECT_STRATEGIES:
        raise CheckpointError(
            f"Unknown vision_feature_select_strategy {strategy!r} (expected one of {sorted(_SELECT_STRATEGIES)})"
        )
    act = config_json.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"projector_hidden_act={act!r}: only 'gelu' (mlp2x_gelu) is supported")
    if cfg.vision_tower:  # another CLIP tower than the checkpoint's own
        tower = tower_source(cfg.vision_tower, source, cfg.local_files_only)
        vision_config = vision_config_dict(tower.json("config.json"))
        tower_sha = clip_tower_digest(tower)
    else:
        tower = source
        vision_config = vision_config_dict(config_json)
        tensors, _ = read_tensors(source, _TOWER_PREFIXES)
        tower_sha = digest_tensors(strip_prefix(tensors, _TOWER_PREFIXES))
    defaults = {
        "select_layer": layer,
        "select_feature": _SELECT_STRATEGIES[strategy],
        "projector_type": "mlp2x_gelu",
        "mm_hidden_size": vision_config.get("hidden_size"),
        "hidden_size": (config_json.get("text_config") or {}).get("hidden_size"),
        "image_aspect_ratio": config_json.get("image_aspect_ratio", "crop"),
    }
    return finish(
        cfg,
        layout=NAME,
        checkpoint=cfg.checkpoint,
        tower=tower,
        tower_sha256=tower_sha,
        vision_config=vision_config,
        image_processor=image_processor_dict(tower),
        defaults=defaults,
        read_projector=lambda: (_projector(source), source.name),
    )


def _projector(source: CheckpointSource) -> dict[str, torch.Tensor]:
    tensors, _ = read_tensors(source, _PROJECTOR_PREFIXES)
    state = {}
    for key, value in strip_prefix(tensors, _PROJECTOR_PREFIXES).items():
        layer, _, rest = key.partition(".")
        state[f"{_PROJECTOR_RENAME.get(layer, layer)}.{rest}"] = value
    return state


def projector_state(resolved: ResolvedModel, local_files_only: bool) -> dict[str, torch.Tensor]:
    return _projector(CheckpointSource(str(resolved.checkpoint), local_files_only))


def _own_tower(resolved: ResolvedModel, local_files_only: bool) -> bool:
    """Whether the tower is the checkpoint's own (not a CLIP model given by ``model.vision_tower``)."""
    source = CheckpointSource(str(resolved.checkpoint), local_files_only)
    return resolved.vision_tower == tower_location(source)


def load_tower(
    resolved: ResolvedModel, dtype: torch.dtype, device: torch.device, attn: str, local_files_only: bool
) -> CLIPVisionTower:
    """The tower read out of the checkpoint's shards (or the CLIP model that replaces it)."""
    if not _own_tower(resolved, local_files_only):
        return load_clip_tower(resolved, dtype, device, attn, local_files_only)
    from transformers import CLIPVisionConfig, CLIPVisionModel

    source = CheckpointSource(str(resolved.checkpoint), local_files_only)
    vision_cfg = CLIPVisionConfig(**{k: v for k, v in resolved.vision_config.items() if k != "model_type"})
    model = CLIPVisionModel._from_config(vision_cfg, attn_implementation=attn, dtype=torch.float32)
    tensors, _ = read_tensors(source, _TOWER_PREFIXES)
    expected = set(model.state_dict())
    fixed = {}
    for key, value in strip_prefix(tensors, _TOWER_PREFIXES).items():
        if (
            key not in expected
            and key.startswith("vision_model.")
            and key[len("vision_model.") :] in expected
        ):
            key = key[len("vision_model.") :]
        elif key not in expected and f"vision_model.{key}" in expected:
            key = f"vision_model.{key}"
        fixed[key] = value
    fixed = {k: v for k, v in fixed.items() if not k.endswith("position_ids") or k in expected}
    load_state_strict(model, fixed, f"vision tower from {resolved.checkpoint}")
    model.to(device=device, dtype=dtype)
    processor = (
        image_processor_class().from_dict(resolved.image_processor) if resolved.image_processor else None
    )
    return CLIPVisionTower.from_model(model, tower_args(resolved), processor, name=str(resolved.checkpoint))
