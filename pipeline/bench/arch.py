"""The encoder architecture a benchmark builds, without its weights: from the checkpoint's configs when it
is present locally, else from a table of known towers and LLaVA checkpoints; ``--tiny``'s test architecture."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..model.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from .flops import encoder_flops

if TYPE_CHECKING:
    from ..config import Config

logger = logging.getLogger(__name__)

__all__ = [
    "KNOWN_CHECKPOINTS",
    "KNOWN_TOWERS",
    "BenchArch",
    "bench_arch",
    "clip_image_processor_dict",
    "tiny_arch",
]

KNOWN_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    },
    "openai/clip-vit-large-patch14": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    },
}
"""CLIPVisionConfig settings of towers benchmarked without their weights."""

_LLAVA15 = {
    "vision_tower": "openai/clip-vit-large-patch14-336",
    "select_layer": -2,
    "select_feature": "patch",
    "projector_type": "mlp2x_gelu",
    "mm_hidden_size": 1024,
}
KNOWN_CHECKPOINTS: dict[str, dict[str, Any]] = {
    "liuhaotian/llava-v1.5-7b": {**_LLAVA15, "hidden_size": 4096, "image_aspect_ratio": "pad"},
    "liuhaotian/llava-v1.5-13b": {**_LLAVA15, "hidden_size": 5120, "image_aspect_ratio": "pad"},
    "llava-hf/llava-1.5-7b-hf": {**_LLAVA15, "hidden_size": 4096, "image_aspect_ratio": "crop"},
    "llava-hf/llava-1.5-13b-hf": {**_LLAVA15, "hidden_size": 5120, "image_aspect_ratio": "crop"},
}
"""LLaVA settings of checkpoints benchmarked without their weights."""


@dataclass(frozen=True)
class BenchArch:
    """The encoder architecture a benchmark builds (with random weights)."""

    name: str
    """Where it came from (a model id, a checkpoint, ``tiny``)."""
    vision_config: dict[str, Any]
    """CLIPVisionConfig settings."""
    select_layer: int
    """Hidden layer the features are taken from."""
    select_feature: str
    """``patch`` or ``cls_patch``."""
    projector_type: str
    """``linear``, ``mlp{N}x_gelu`` or ``identity``."""
    mm_hidden_size: int
    """Projector input width."""
    hidden_size: int | None
    """Projector output width."""
    image_aspect_ratio: str = "pad"
    """LLaVA's aspect-ratio mode."""
    image_processor: dict[str, Any] = field(default_factory=dict, compare=False)
    """CLIPImageProcessor settings (size, crop, mean, std, resample)."""
    source: str = "table"
    """``checkpoint`` (read from local files), ``table`` (known architecture) or ``tiny``."""

    @property
    def image_size(self) -> int:
        return int(self.vision_config["image_size"])

    @property
    def patch_size(self) -> int:
        return int(self.vision_config["patch_size"])

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + (1 if self.select_feature == "cls_patch" else 0)

    @property
    def feature_dim(self) -> int:
        return self.mm_hidden_size if self.projector_type == "identity" else int(self.hidden_size or 0)

    def flops(self) -> dict[str, Any]:
        return encoder_flops(
            self.vision_config,
            select_layer=self.select_layer,
            select_feature=self.select_feature,
            projector_type=self.projector_type,
            mm_hidden_size=self.mm_hidden_size,
            hidden_size=self.hidden_size,
        )

    def describe(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("image_processor")
        return out


def clip_image_processor_dict(image_size: int) -> dict[str, Any]:
    """``preprocessor_config.json`` of an OpenAI CLIP tower at ``image_size`` px."""
    return {
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "do_convert_rgb": True,
        "image_processor_type": "CLIPImageProcessor",
    }


def tiny_arch() -> BenchArch:
    """The tiny test architecture (CLIP 56 px / patch 14, 3 layers, hidden 32; mlp2x_gelu 32→64)."""
    from ..model.tiny import TINY_SETTINGS, TINY_TEXT, TINY_VISION

    vision = dict(TINY_VISION)
    return BenchArch(
        name="tiny",
        vision_config=vision,
        select_layer=int(TINY_SETTINGS["mm_vision_select_layer"]),
        select_feature=str(TINY_SETTINGS["mm_vision_select_feature"]),
        projector_type=str(TINY_SETTINGS["mm_projector_type"]),
        mm_hidden_size=int(vision["hidden_size"]),
        hidden_size=int(TINY_TEXT["hidden_size"]),
        image_aspect_ratio=str(TINY_SETTINGS["image_aspect_ratio"]),
        image_processor=clip_image_processor_dict(int(vision["image_size"])),
        source="tiny",
    )


def _pick(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def bench_arch(config: Config | None = None, *, tiny: bool = False) -> BenchArch:
    """The architecture of ``config``'s encoder, without needing its weights.

    The checkpoint is read when it is available locally (its configs only; no module is built);
    otherwise the model ids are looked up in :data:`KNOWN_CHECKPOINTS` / :data:`KNOWN_TOWERS`.
    Settings given in the config (layer, projector, widths, aspect ratio) win either way.
    """
    if tiny or config is None:
        return tiny_arch()
    from ..model import resolve_model
    from ..model.errors import CheckpointError

    m = config.model
    try:
        r = resolve_model(m)
    except CheckpointError as exc:
        logger.info("Model not available locally (%s); using the known-architecture table", exc)
    else:
        return BenchArch(
            name=r.checkpoint or r.vision_tower,
            vision_config={k: v for k, v in r.vision_config.items() if not k.startswith("_")},
            select_layer=r.select_layer,
            select_feature=r.select_feature,
            projector_type=r.projector_type,
            mm_hidden_size=r.mm_hidden_size,
            hidden_size=r.hidden_size,
            image_aspect_ratio=r.image_aspect_ratio,
            image_processor=dict(r.image_processor),
            source="checkpoint",
        )
    known = KNOWN_CHECKPOINTS.get(m.checkpoint or "", {})
    tower = m.vision_tower or known.get("vision_tower") or m.checkpoint
    if tower not in KNOWN_TOWERS:
        raise ValueError(
            f"Cannot build the architecture of {m.checkpoint or m.vision_tower!r}: not available locally and "
            f"not a known tower ({sorted(KNOWN_TOWERS)}) or checkpoint ({sorted(KNOWN_CHECKPOINTS)})"
        )
    vision = dict(KNOWN_TOWERS[tower])
    projector_type = _pick(m.projector_type, known.get("projector_type"), "mlp2x_gelu")
    hidden = _pick(m.hidden_size, known.get("hidden_size"))
    if hidden is None and projector_type != "identity":
        raise ValueError(f"Set model.hidden_size (the projector's output width) to benchmark {tower!r}")
    return BenchArch(
        name=m.checkpoint or tower,
        vision_config=vision,
        select_layer=int(_pick(m.select_layer, known.get("select_layer"), -2)),
        select_feature=str(_pick(m.select_feature, known.get("select_feature"), "patch")),
        projector_type=str(projector_type),
        mm_hidden_size=int(_pick(m.mm_hidden_size, known.get("mm_hidden_size"), vision["hidden_size"])),
        hidden_size=None if hidden is None else int(hidden),
        image_aspect_ratio=str(_pick(m.image_aspect_ratio, known.get("image_aspect_ratio"), "pad")),
        image_processor=clip_image_processor_dict(int(vision["image_size"])),
        source="table",
    )
