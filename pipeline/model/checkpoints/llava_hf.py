"""The llava-hf layout: a transformers ``LlavaForConditionalGeneration`` (LLaVA-1.5) or
``LlavaNextForConditionalGeneration`` (LLaVA-NeXT, ``model_type: llava_next``) checkpoint.

``config.json`` has ``vision_config``, ``vision_feature_layer`` (an index, or a list whose hidden
states are concatenated along the channels, as transformers does), ``vision_feature_select_strategy``
(``default`` drops CLS, ``full`` keeps it), ``projector_hidden_act`` and ``text_config.hidden_size``;
LLaVA-NeXT adds ``image_grid_pinpoints`` (``[height, width]`` pairs, in transformers' reading).
The CLIP tower's weights (``vision_tower.*``, with or without ``vision_model.``; ``model.`` in
memory), the projector's (``multi_modal_projector.linear_1/2``, LLaVA's ``mlp2x_gelu``) and
``image_newline`` are read out of the checkpoint's shards. The image processor is the checkpoint's
own (``preprocessor_config.json``, or transformers 5's ``processor_config.json``): its ``do_pad``
is LLaVA's ``pad`` aspect ratio, ``do_convert_rgb`` composites transparency onto white.

Semantics are transformers': pinpoint ties resolve in its order, ``unpad`` rounds as it does.
"""

from __future__ import annotations

from typing import Any

import torch

from ..anyres import pinpoints_from_hf
from ..config import ModelConfig
from ..errors import CheckpointError
from ..tower import CLIPVisionTower
from .common import (
    LayoutRules,
    ResolvedModel,
    checkpoint_tower_digest,
    clip_tower_digest,
    finish,
    load_clip_tower,
    tower_from_checkpoint,
    tower_source,
)
from .files import CheckpointSource, image_processor_dict, read_tensors, strip_prefix, vision_config_dict

NAME = "llava-hf"
MODEL_TYPES = ("llava", "llava_next")
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
_TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.")
_NEWLINE_KEYS = ("model.image_newline", "image_newline")
_PROJECTOR_RENAME = {"linear_1": "0", "linear_2": "2"}
_SELECT_STRATEGIES = {"default": "patch", "full": "cls_patch"}


def detect(config_json: dict[str, Any]) -> bool:
    return "vision_config" in config_json and (
        config_json.get("model_type") in MODEL_TYPES or "vision_feature_layer" in config_json
    )


def resolve(cfg: ModelConfig, source: CheckpointSource | None, config_json: dict[str, Any]) -> ResolvedModel:
    assert source is not None
    model_type = config_json.get("model_type", "llava")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"llava-hf model_type {model_type!r} is not supported (supported: {', '.join(MODEL_TYPES)})"
        )
    layer = config_json.get("vision_feature_layer", -2)
    strategy = config_json.get("vision_feature_select_strategy", "default")
    if strategy not in _SELECT_STRATEGIES:
        raise CheckpointError(
            f"Unknown vision_feature_select_strategy {strategy!r} (expected one of {sorted(_SELECT_STRATEGIES)})"
        )
    act = config_json.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"projector_hidden_act={act!r}: only 'gelu' (mlp2x_gelu) is supported")
    if config_json.get("multimodal_projector_bias", True) is not True:
        raise CheckpointError(
            "multimodal_projector_bias: false is not implemented (LLaVA's projector has biases)"
        )
    if cfg.vision_tower:  # another CLIP tower than the checkpoint's own
        tower = tower_source(cfg.vision_tower, source, cfg.local_files_only)
        vision_config = vision_config_dict(tower.json("config.json"))
        tower_sha = clip_tower_digest(tower)
        processor = image_processor_dict(tower)
    else:
        tower = source
        vision_config = vision_config_dict(config_json)
        tower_sha = checkpoint_tower_digest(source, _TOWER_PREFIXES)
        if tower_sha is None:
            raise CheckpointError(f"No vision tower weights (vision_tower.*) in {source.name!r}")
        processor = image_processor_dict(source)
    next_ = model_type == "llava_next"
    defaults = {
        "select_layer": tuple(layer) if isinstance(layer, list) else layer,
        "select_feature": _SELECT_STRATEGIES[strategy],
        "projector_type": "mlp2x_gelu",
        "mm_hidden_size": None,
        "hidden_size": (config_json.get("text_config") or {}).get("hidden_size"),
        # LlavaImageProcessor's do_pad is LLaVA's expand2square; LLaVA-NeXT tiles its images.
        "image_aspect_ratio": "anyres" if next_ else ("pad" if processor.get("do_pad") else "crop"),
        "patch_merge_type": "spatial_unpad",  # transformers' pack_image_features
    }
    pinpoints = config_json.get("image_grid_pinpoints", processor.get("image_grid_pinpoints"))
    rules = LayoutRules(
        alpha="white" if processor.get("do_convert_rgb", True) else "drop",
        layer_lists=True,
        unpad_rounding="round",
        anyres_resample=int(processor.get("resample", 3)),
        pinpoints=(lambda tile: pinpoints_from_hf(pinpoints, tile))
        if next_ and pinpoints is not None
        else None,
        read_newline=(lambda: read_newline(source)) if next_ else None,
    )
    return finish(
        cfg,
        layout=NAME,
        checkpoint=cfg.checkpoint,
        tower=tower,
        tower_sha256=tower_sha,
        vision_config=vision_config,
        image_processor=processor,
        defaults=defaults,
        read_projector=lambda: (_projector(source), source.name),
        rules=rules,
        tower_in_checkpoint=not cfg.vision_tower,
    )


def read_newline(source: CheckpointSource) -> torch.Tensor | None:
    """The checkpoint's ``image_newline`` (LLaVA-NeXT), or None when it has none."""
    tensors, _ = read_tensors(source, _NEWLINE_KEYS)
    return next((tensors[k] for k in _NEWLINE_KEYS if k in tensors), None)


def _projector(source: CheckpointSource) -> dict[str, torch.Tensor]:
    tensors, _ = read_tensors(source, _PROJECTOR_PREFIXES)
    state = {}
    for key, value in strip_prefix(tensors, _PROJECTOR_PREFIXES).items():
        layer, _, rest = key.partition(".")
        state[f"{_PROJECTOR_RENAME.get(layer, layer)}.{rest}"] = value
    return state


def projector_state(resolved: ResolvedModel, local_files_only: bool) -> dict[str, torch.Tensor]:
    return _projector(CheckpointSource(str(resolved.checkpoint), local_files_only))


def load_newline(resolved: ResolvedModel, local_files_only: bool) -> torch.Tensor | None:
    return read_newline(CheckpointSource(str(resolved.checkpoint), local_files_only))


def load_tower(
    resolved: ResolvedModel, dtype: torch.dtype, device: torch.device, attn: str, local_files_only: bool
) -> CLIPVisionTower:
    """The tower read out of the checkpoint's shards (or the CLIP model that replaces it)."""
    if not resolved.tower_in_checkpoint:
        return load_clip_tower(resolved, dtype, device, attn, local_files_only)
    source = CheckpointSource(str(resolved.checkpoint), local_files_only)
    return tower_from_checkpoint(resolved, source, _TOWER_PREFIXES, dtype, device, attn)
