"""Tiny random-weight checkpoints in every supported layout, for tests and the demo.

They are written through the same ``save_pretrained`` / shard layout as the real ones, so the
real loading code is what runs. The same ``seed`` gives the same tower and projector weights in
every format, so features from the formats can be compared with each other.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from .constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TINY_FORMATS, WEIGHT_FORMATS
from .errors import ConfigError
from .projector import build_vision_projector
from .tower import image_processor_class

logger = logging.getLogger(__name__)

TINY_PINPOINTS = ((56, 112), (112, 56), (112, 112))
"""The tiny LLaVA-NeXT checkpoints' grid pinpoints, ``(width, height)`` (tiles of the tower's 56 px)."""

TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 56,
    "patch_size": 14,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
}
TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 256,
    "max_position_embeddings": 128,
}
TINY_SETTINGS = {
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch",
    "mm_projector_type": "mlp2x_gelu",
    "image_aspect_ratio": "pad",
}


def _image_processor(size: int) -> Any:
    # Saved as real checkpoints name it ("CLIPImageProcessor"), without transformers' torchvision warning.
    return image_processor_class()(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )


def random_clip(
    vision: Mapping[str, Any],
    *,
    projector_type: str,
    mm_hidden_size: int,
    hidden_size: int | None,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> tuple[CLIPVisionModel, torch.nn.Module]:
    """A CLIP vision model of ``vision`` (CLIPVisionConfig settings) and a LLaVA projector with random
    weights, float32 on the CPU, in eval mode without gradients. The same ``seed`` gives the same
    weights (the tower is drawn first, then the projector): the tiny checkpoints' and the benchmarks'."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(**{k: v for k, v in vision.items() if k != "model_type"})
    tower = CLIPVisionModel._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    tower.eval().requires_grad_(False)
    projector = build_vision_projector(
        {"mm_projector_type": projector_type, "mm_hidden_size": mm_hidden_size, "hidden_size": hidden_size}
    )
    projector.eval().requires_grad_(False)
    return tower, projector


def write_clip_checkpoint(
    directory: str | Path, tower: CLIPVisionModel, projector: torch.nn.Module, *, weights: str = "safetensors"
) -> Path:
    """Write ``tower`` and ``projector`` (e.g. :func:`random_clip`'s) as a bare-CLIP checkpoint into
    ``directory``: the vision model with its image processor (shortest edge and crop at the tower's size,
    OpenAI's mean and std) and, unless the projector has no weights (``identity``), ``mm_projector.bin``
    with LLaVA's key names. Returns ``directory``; a config's ``model`` section names the projector's
    settings (see the ``clip`` layout of :func:`make_tiny_model`)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _save_tower(out, tower, weights)
    state = projector.state_dict()
    if state:
        torch.save({f"model.mm_projector.{k}": v for k, v in state.items()}, out / "mm_projector.bin")
    return out


def _save_tower(directory: Path, tower: CLIPVisionModel, weights: str) -> None:
    """The vision model and its image processor, as a CLIP checkpoint's ``save_pretrained`` lays them out."""
    tower.save_pretrained(directory)
    _image_processor(int(tower.config.image_size)).save_pretrained(directory)
    if weights == "bin":
        _to_bin_shards(directory)


def _tiny_parts(seed: int) -> tuple[CLIPVisionModel, torch.nn.Module]:
    return random_clip(
        TINY_VISION,
        projector_type=str(TINY_SETTINGS["mm_projector_type"]),
        mm_hidden_size=TINY_VISION["hidden_size"],
        hidden_size=TINY_TEXT["hidden_size"],
        seed=seed,
    )


def _hf_config_settings() -> dict[str, Any]:
    """The ``LlavaConfig`` / ``LlavaNextConfig`` settings of the tiny llava-hf checkpoints."""
    return {
        "vision_config": {"model_type": "clip_vision_model", **TINY_VISION},
        "text_config": {"model_type": "llama", **TINY_TEXT},
        "vision_feature_layer": TINY_SETTINGS["mm_vision_select_layer"],
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "image_token_index": TINY_TEXT["vocab_size"] - 1,
    }


def _to_bin_shards(directory: Path) -> None:
    """Rewrite a safetensors checkpoint (sharded or not) as ``pytorch_model*.bin`` with the same split."""
    index_path = directory / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        renames = {}
        for shard in sorted(set(index["weight_map"].values())):
            new = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
            torch.save(load_file(directory / shard), directory / new)
            (directory / shard).unlink()
            renames[shard] = new
        index["weight_map"] = {k: renames[v] for k, v in index["weight_map"].items()}
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
        index_path.unlink()
    else:
        torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
        (directory / "model.safetensors").unlink()


def make_tiny_model(
    directory: str | Path,
    fmt: str = "llava",
    *,
    seed: int = 0,
    weights: str = "safetensors",
    max_shard_size: str = "40KB",
) -> Path:
    """Write a tiny random-weight checkpoint of layout ``fmt`` into ``directory``.

    - ``llava``: a language model (tiny Llama) saved in shards with ``model.mm_projector.*``
      among its weights and the mm_* keys in config.json; the CLIP tower in ``vision_tower/``.
    - ``llava-hf``: ``LlavaForConditionalGeneration.save_pretrained`` plus the image processor.
    - ``clip``: a bare CLIP vision model, ``mm_projector.bin`` and ``llava-features.yaml``
      holding the projector settings.
    - ``llava-next``: the ``llava`` layout of a LLaVA-NeXT checkpoint: ``image_aspect_ratio: anyres``,
      ``image_grid_pinpoints``, ``mm_patch_merge_type: spatial_unpad``, ``model.image_newline`` and,
      as LLaVA-1.6 trained its tower, ``model.vision_tower.vision_tower.vision_model.*`` weights that
      differ from the CLIP model in ``vision_tower/`` (the checkpoint's own are the ones to use).
    - ``llava-next-hf``: ``LlavaNextForConditionalGeneration.save_pretrained`` plus its image processor.

    ``weights='bin'`` rewrites the shards as ``pytorch_model*.bin`` (same split, same index).
    Returns the path to pass as ``--model`` (for ``clip``: the YAML config to pass as ``--config``).
    """
    if fmt not in TINY_FORMATS:
        raise ConfigError(f"Unknown tiny model format {fmt!r}; valid formats are {TINY_FORMATS}")
    if weights not in WEIGHT_FORMATS:
        raise ConfigError(f"Unknown weights format {weights!r}; valid formats are {WEIGHT_FORMATS}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tower, projector = _tiny_parts(seed)

    if fmt == "llava-next-hf":
        return _llava_next_hf(out, tower, projector, seed, weights, max_shard_size)

    if fmt in ("llava", "llava-next"):
        _save_tower(out / "vision_tower", tower, weights)
        torch.manual_seed(seed + 1)
        lm = LlamaForCausalLM(LlamaConfig(**TINY_TEXT))
        lm.model.mm_projector = projector
        if fmt == "llava-next":
            torch.manual_seed(seed + 2)
            trained = CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).eval()
            lm.model.vision_tower = (
                torch.nn.Module()
            )  # CLIPVisionTower.vision_tower.vision_model, as saved by LLaVA
            lm.model.vision_tower.vision_tower = torch.nn.Module()
            lm.model.vision_tower.vision_tower.vision_model = trained
            lm.model.image_newline = torch.nn.Parameter(torch.randn(TINY_TEXT["hidden_size"]) * 0.5)
        lm.save_pretrained(out, max_shard_size=max_shard_size)
        cfg = json.loads((out / "config.json").read_text())
        cfg.update(TINY_SETTINGS)
        if fmt == "llava-next":
            cfg.update(
                {
                    "image_aspect_ratio": "anyres",
                    "image_grid_pinpoints": [list(p) for p in TINY_PINPOINTS],
                    "mm_patch_merge_type": "spatial_unpad",
                    "unfreeze_mm_vision_tower": True,
                }
            )
        cfg.update(
            {
                "architectures": ["LlavaLlamaForCausalLM"],
                "model_type": "llava_llama",
                "mm_vision_tower": "vision_tower",
                "mm_hidden_size": TINY_VISION["hidden_size"],
            }
        )
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        if weights == "bin":
            _to_bin_shards(out)
        return out

    if fmt == "llava-hf":
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        config = LlavaConfig(**_hf_config_settings())
        torch.manual_seed(seed + 1)
        model = LlavaForConditionalGeneration(config).eval()
        inner = model.model
        inner.vision_tower.load_state_dict(tower.state_dict())
        inner.multi_modal_projector.linear_1.load_state_dict(projector[0].state_dict())
        inner.multi_modal_projector.linear_2.load_state_dict(projector[2].state_dict())
        model.save_pretrained(out, max_shard_size=max_shard_size)
        _image_processor(TINY_VISION["image_size"]).save_pretrained(out)
        if weights == "bin":
            _to_bin_shards(out)
        return out

    write_clip_checkpoint(out, tower, projector, weights=weights)
    settings: dict[str, Any] = {
        "model": {
            "vision_tower": ".",
            "projector_weights": "mm_projector.bin",
            "projector_type": TINY_SETTINGS["mm_projector_type"],
            "select_layer": TINY_SETTINGS["mm_vision_select_layer"],
            "select_feature": TINY_SETTINGS["mm_vision_select_feature"],
            "image_aspect_ratio": TINY_SETTINGS["image_aspect_ratio"],
            "hidden_size": TINY_TEXT["hidden_size"],
        }
    }
    import yaml

    config_path = out / "llava-features.yaml"
    config_path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return config_path


def _llava_next_hf(
    out: Path,
    tower: CLIPVisionModel,
    projector: torch.nn.Module,
    seed: int,
    weights: str,
    max_shard_size: str,
) -> Path:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor

    side = TINY_VISION["image_size"]
    config = LlavaNextConfig(
        **_hf_config_settings(),
        image_grid_pinpoints=[[h, w] for w, h in TINY_PINPOINTS],  # transformers reads [height, width]
    )
    torch.manual_seed(seed + 1)
    model = LlavaNextForConditionalGeneration(config).eval()
    inner = model.model
    inner.vision_tower.load_state_dict(tower.state_dict())
    inner.multi_modal_projector.linear_1.load_state_dict(projector[0].state_dict())
    inner.multi_modal_projector.linear_2.load_state_dict(projector[2].state_dict())
    with torch.no_grad():
        inner.image_newline.copy_(torch.randn(TINY_TEXT["hidden_size"]) * 0.5)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    processor_cls = LlavaNextImageProcessor
    if importlib.util.find_spec("torchvision") is None:  # what LlavaNextImageProcessor is without torchvision
        from transformers import LlavaNextImageProcessorPil as processor_cls  # noqa: N813
    processor_cls(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        image_grid_pinpoints=config.image_grid_pinpoints,
        do_convert_rgb=True,
    ).save_pretrained(out)
    if weights == "bin":
        _to_bin_shards(out)
    return out
