"""What defines LLaVA/CLIP preprocessing: :class:`PreprocessSpec`, read from a saved image processor.

``transformers.CLIPImageProcessor`` (the PIL backend, which is what ``CLIPImageProcessor`` is
without torchvision and what LLaVA was trained with), preceded by ``expand2square`` for
``image_aspect_ratio: pad``:

- resize so that the shortest edge is ``size`` (the other edge is ``int(size * long / short)``,
  truncated, as ``transformers.image_transforms.get_resize_output_image_size`` does) with PIL's
  resampling filter (bicubic) on uint8 RGB, exactly as the HF processor does;
- center crop to ``crop_height x crop_width`` (zero padding if the image is smaller, as HF);
- rescale and normalise: ``(x * rescale_factor - mean) / std``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..model.constants import ASPECT_RATIOS, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ..model.errors import ConfigError

__all__ = ["PreprocessSpec", "resize_output_size"]


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything that defines the preprocessing; defaults are LLaVA-1.5's (CLIP ViT-L/14-336, pad)."""

    size: int = 336
    """Target length of the shortest edge after resizing."""
    crop_height: int = 336
    """Height of the center crop."""
    crop_width: int = 336
    """Width of the center crop."""
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    """Per-channel mean (of pixels in 0..1) subtracted by :func:`normalize`."""
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    """Per-channel standard deviation divided by in :func:`normalize`."""
    rescale_factor: float = 1 / 255
    """Multiplies uint8 pixels before normalisation."""
    aspect_ratio: str = "pad"
    """``pad`` (LLaVA-1.5: expand2square with the mean colour), ``square`` or ``crop`` (CLIP path)."""
    resample: int = 3
    """PIL resampling filter id (3 = bicubic)."""
    do_center_crop: bool = True
    """Center crop after resizing (CLIP: yes)."""

    def __post_init__(self) -> None:
        if self.aspect_ratio not in ASPECT_RATIOS:
            raise ConfigError(f"aspect_ratio must be one of {ASPECT_RATIOS}, got {self.aspect_ratio!r}")
        for field_name in ("size", "crop_height", "crop_width"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{field_name} must be a positive int, got {value!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ConfigError("image_mean and image_std must have 3 values (RGB)")
        if any(float(s) == 0.0 for s in self.image_std):
            raise ConfigError("image_std must not contain 0")
        if self.resample not in (0, 1, 2, 3, 4, 5):
            raise ConfigError(f"resample must be a PIL filter id 0..5, got {self.resample!r}")
        # Normalise sequences to float tuples so specs compare and hash by value.
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))
        object.__setattr__(self, "rescale_factor", float(self.rescale_factor))
        object.__setattr__(self, "resample", int(self.resample))

    @property
    def background(self) -> tuple[int, int, int]:
        """expand2square's fill colour, as LLaVA computes it: ``int(x * 255)`` of the mean."""
        return tuple(int(x * 255) for x in self.image_mean)  # type: ignore[return-value]

    @classmethod
    def from_image_processor(cls, processor: Any, aspect_ratio: str = "pad") -> PreprocessSpec:
        """Spec of a ``CLIPImageProcessor`` (or its ``preprocessor_config.json``: a dict, a path
        to the file, or a folder holding it).

        Understands both ``size={"shortest_edge": N}`` / ``crop_size={"height": H, "width": W}``
        and the older integer forms (``size: 336, crop_size: 336``).
        """
        cfg = _processor_dict(processor)
        try:
            return cls._from_dict(cfg, aspect_ratio)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid image processor config: {exc}") from exc

    @classmethod
    def _from_dict(cls, cfg: Mapping[str, Any], aspect_ratio: str) -> PreprocessSpec:
        if cfg.get("do_resize", True) is False:
            raise ConfigError("image processors with do_resize=False are not supported")
        size = _shortest_edge(_get(cfg, "size", {"shortest_edge": 224}))
        crop_h, crop_w = _crop_size(_get(cfg, "crop_size", {"height": 224, "width": 224}))
        do_rescale = _get(cfg, "do_rescale", True)
        do_normalize = _get(cfg, "do_normalize", True)
        mean = _get(cfg, "image_mean", OPENAI_CLIP_MEAN) if do_normalize else (0.0, 0.0, 0.0)
        std = _get(cfg, "image_std", OPENAI_CLIP_STD) if do_normalize else (1.0, 1.0, 1.0)
        if isinstance(mean, int | float):
            mean = (float(mean),) * 3
        if isinstance(std, int | float):
            std = (float(std),) * 3
        resample = _get(cfg, "resample", 3)
        return cls(
            size=size,
            crop_height=crop_h,
            crop_width=crop_w,
            image_mean=tuple(float(x) for x in mean),  # type: ignore[arg-type]
            image_std=tuple(float(x) for x in std),  # type: ignore[arg-type]
            rescale_factor=float(_get(cfg, "rescale_factor", 1 / 255)) if do_rescale else 1.0,
            aspect_ratio=aspect_ratio,
            resample=int(resample),
            do_center_crop=bool(_get(cfg, "do_center_crop", True)),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the spec (recorded with every output)."""
        out = asdict(self)
        out["image_mean"] = list(self.image_mean)
        out["image_std"] = list(self.image_std)
        return out

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, or None when it depends on the input (no crop)."""
        if self.do_center_crop:
            return (self.crop_height, self.crop_width)
        if self.aspect_ratio == "pad":
            return (self.size, self.size)
        return None


def _get(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
    value = cfg.get(key)
    return default if value is None else value


def _processor_dict(processor: Any) -> dict[str, Any]:
    if isinstance(processor, Mapping):
        return dict(processor)
    if isinstance(processor, str | os.PathLike):
        path = Path(processor)
        if path.is_dir():
            path = path / "preprocessor_config.json"
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read image processor config {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} does not hold a JSON object")
        return loaded
    to_dict = getattr(processor, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    raise ConfigError(f"cannot read an image processor config from {type(processor).__name__}")


def _shortest_edge(size: Any) -> int:
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    if isinstance(size, Mapping):
        extra = {k for k, v in size.items() if v is not None and k != "shortest_edge"}
        if size.get("shortest_edge") and not extra:
            return int(size["shortest_edge"])
    raise ConfigError(f"only size={{'shortest_edge': N}} (CLIP) is supported, got size={size!r}")


def _crop_size(crop: Any) -> tuple[int, int]:
    if isinstance(crop, int) and not isinstance(crop, bool):
        return crop, crop
    if isinstance(crop, Mapping) and crop.get("height") and crop.get("width"):
        return int(crop["height"]), int(crop["width"])
    raise ConfigError(f"crop_size must be an int or {{'height', 'width'}}, got {crop!r}")


def resize_output_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) after resizing the shortest edge to ``shortest_edge``, as transformers computes it.

    ``get_resize_output_image_size(..., default_to_square=False)``: the long edge is
    ``int(shortest_edge * long / short)`` (float division, truncated); ties count as portrait.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)
