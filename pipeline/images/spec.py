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

from ..constants import SIXTEEN_BIT_MODES
from ..model.constants import (
    ASPECT_RATIOS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PROCESSOR_FILES,
    image_processor_settings,
)
from ..model.errors import ConfigError

__all__ = ["PreprocessSpec", "resize_output_size"]


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything that defines the pixels; defaults are LLaVA-1.5's (CLIP ViT-L/14-336, pad)."""

    size: int = 336
    """Target length of the shortest edge after resizing (anyres: the side of the base image)."""
    crop_height: int = 336
    """Height of the center crop (anyres: the side of a tile)."""
    crop_width: int = 336
    """Width of the center crop."""
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    """Per-channel mean (of pixels in 0..1) subtracted by the normalisation."""
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    """Per-channel standard deviation divided by in the normalisation."""
    rescale_factor: float = 1 / 255
    """Multiplies uint8 pixels before normalisation."""
    aspect_ratio: str = "pad"
    """``pad`` (LLaVA-1.5: expand2square with the mean colour), ``square`` or ``crop`` (CLIP path), ``anyres``."""
    resample: int = 3
    """PIL resampling filter id (3 = bicubic)."""
    do_center_crop: bool = True
    """Center crop after resizing (CLIP: yes)."""
    do_resize: bool = True
    """Resize the shortest edge to ``size`` (False: the image as it is, then the crop)."""
    pad_color: tuple[int, int, int] | None = None
    """expand2square's fill colour (given as None: LLaVA's ``int(x * 255)`` of ``image_mean``)."""
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    """anyres: the candidate canvases, ``(width, height)`` each, in order."""
    anyres_resample: int = 3
    """anyres: the filter of the canvas and base resizes (LLaVA: PIL's default, bicubic; transformers: ``resample``)."""
    alpha: str = "drop"
    """Transparency: ``drop`` (LLaVA's convert("RGB")) or composite on ``white`` (transformers' convert_to_rgb)."""
    exif_transpose: bool = False
    """Rotate by the EXIF orientation before anything else (not LLaVA's behaviour: opt-in)."""
    sixteen_bit: str = "llava"
    """16-bit images: ``llava`` (convert("RGB") clips to white) or ``high_byte``."""

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
        for name in ("resample", "anyres_resample"):
            if getattr(self, name) not in (0, 1, 2, 3, 4, 5):
                raise ConfigError(f"{name} must be a PIL filter id 0..5, got {getattr(self, name)!r}")
        if self.alpha not in ("drop", "white"):
            raise ConfigError(f"alpha must be 'drop' or 'white', got {self.alpha!r}")
        if self.sixteen_bit not in SIXTEEN_BIT_MODES:
            raise ConfigError(f"sixteen_bit must be one of {SIXTEEN_BIT_MODES}, got {self.sixteen_bit!r}")
        if self.aspect_ratio == "anyres":
            if not self.grid_pinpoints:
                raise ConfigError("anyres preprocessing needs image_grid_pinpoints")
            if (
                (self.crop_height, self.crop_width) != (self.size, self.size)
                or not self.do_resize
                or not self.do_center_crop
            ):
                raise ConfigError(
                    "anyres needs an image processor whose crop is its shortest-edge size "
                    f"(tiles and the base image of one side), got size {self.size}, crop "
                    f"{self.crop_height}x{self.crop_width}, do_resize {self.do_resize}, do_center_crop {self.do_center_crop}"
                )
        # Normalise sequences so that specs compare and hash by value.
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))
        object.__setattr__(self, "rescale_factor", float(self.rescale_factor))
        object.__setattr__(self, "resample", int(self.resample))
        object.__setattr__(self, "grid_pinpoints", tuple((int(w), int(h)) for w, h in self.grid_pinpoints))
        # LLaVA's expand2square colour: int(x * 255) of the processor's mean (normalised or not).
        color = self.pad_color if self.pad_color is not None else tuple(int(x * 255) for x in self.image_mean)
        object.__setattr__(self, "pad_color", tuple(int(c) for c in color))

    @property
    def background(self) -> tuple[int, int, int]:
        """expand2square's fill colour, as LLaVA computes it: ``int(x * 255)`` of the mean."""
        return self.pad_color  # type: ignore[return-value]

    @classmethod
    def from_image_processor(
        cls, processor: Any, aspect_ratio: str = "pad", **overrides: Any
    ) -> PreprocessSpec:
        """Spec of a CLIP / llava-hf image processor (or its saved settings: a dict, a path to
        ``preprocessor_config.json`` / ``processor_config.json``, or a folder holding one); ``overrides``
        set the other fields (``grid_pinpoints``, ``alpha``, ...).

        Every field of the processor that changes pixels is honoured (``do_resize``, ``size``,
        ``resample``, ``do_center_crop``, ``crop_size``, ``do_rescale``, ``rescale_factor``,
        ``do_normalize``, ``image_mean``, ``image_std``); one whose value is not implemented, or a field
        not known to leave pixels alone, is a :class:`ConfigError` naming it. Understands both
        ``size={"shortest_edge": N}`` / ``crop_size={"height": H, "width": W}`` and the integer forms.
        """
        cfg = _processor_dict(processor)
        try:
            return cls._from_dict(cfg, aspect_ratio, overrides)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid image processor config: {exc}") from exc

    @classmethod
    def _from_dict(
        cls, cfg: Mapping[str, Any], aspect_ratio: str, overrides: Mapping[str, Any]
    ) -> PreprocessSpec:
        unknown = sorted(set(cfg) - PIXEL_FIELDS - NEUTRAL_FIELDS)
        if unknown:
            raise ConfigError(
                f"image processor field(s) {unknown} are not implemented: they may change the pixels, so "
                "the features would not be the processor's (supported: "
                f"{', '.join(sorted(PIXEL_FIELDS))})"
            )
        for key, bad in (("use_square_size", True), ("default_to_square", True)):
            if cfg.get(key) is bad:
                raise ConfigError(f"image processor field {key}: {bad} is not implemented")
        do_resize = bool(_get(cfg, "do_resize", True))
        size = _shortest_edge(_get(cfg, "size", {"shortest_edge": 224}))
        do_center_crop = bool(_get(cfg, "do_center_crop", True))
        crop_h, crop_w = (
            _crop_size(_get(cfg, "crop_size", {"height": 224, "width": 224}))
            if do_center_crop
            else (size, size)
        )
        do_rescale = _get(cfg, "do_rescale", True)
        do_normalize = _get(cfg, "do_normalize", True)
        mean = _triple(_get(cfg, "image_mean", OPENAI_CLIP_MEAN))
        std = _triple(_get(cfg, "image_std", OPENAI_CLIP_STD))
        fields: dict[str, Any] = {
            "size": size,
            "crop_height": crop_h,
            "crop_width": crop_w,
            "image_mean": mean if do_normalize else (0.0, 0.0, 0.0),
            "image_std": std if do_normalize else (1.0, 1.0, 1.0),
            "rescale_factor": float(_get(cfg, "rescale_factor", 1 / 255)) if do_rescale else 1.0,
            "aspect_ratio": aspect_ratio,
            "resample": int(_get(cfg, "resample", 3)),
            "do_center_crop": do_center_crop,
            "do_resize": do_resize,
            # LLaVA (and LlavaImageProcessor's do_pad) fill with the processor's mean, normalised or not.
            "pad_color": tuple(int(x * 255) for x in mean),
        }
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the spec (recorded with, and fingerprinted in, every output)."""
        out = asdict(self)
        out["image_mean"] = list(self.image_mean)
        out["image_std"] = list(self.image_std)
        out["grid_pinpoints"] = [list(p) for p in self.grid_pinpoints]
        out["pad_color"] = list(self.background)
        return out

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, or None when it depends on the input (no crop)."""
        if self.do_center_crop:
            return (self.crop_height, self.crop_width)
        if self.aspect_ratio == "pad":
            return (self.size, self.size)
        return None


PIXEL_FIELDS = frozenset(
    {
        "do_resize",
        "size",
        "resample",
        "do_center_crop",
        "crop_size",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "do_convert_rgb",  # read by the checkpoint layout (transparency onto white)
        "do_pad",  # LlavaImageProcessor: expand2square (the layout's aspect ratio); LLaVA-NeXT: batch padding of tiles
        "image_grid_pinpoints",  # read by the checkpoint layout (anyres)
    }
)
"""Image processor fields that change pixels, all honoured."""
NEUTRAL_FIELDS = frozenset(
    {
        "image_processor_type",
        "feature_extractor_type",
        "processor_class",
        "_processor_class",
        "image_seq_length",
        "patch_size",
        "vision_feature_select_strategy",
        "num_additional_image_tokens",
        "use_square_size",  # False: no effect (True is refused)
        "default_to_square",  # False: no effect (True is refused)
        "data_format",
        "input_data_format",
        "return_tensors",
        "device",
        "disable_grouping",
        "backend",
    }
)
"""Image processor fields that do not change pixels (others are refused)."""


def _triple(value: Any) -> tuple[float, float, float]:
    if isinstance(value, int | float):
        return (float(value),) * 3  # type: ignore[return-value]
    return tuple(float(x) for x in value)  # type: ignore[return-value]


def _get(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
    value = cfg.get(key)
    return default if value is None else value


def _processor_dict(processor: Any) -> dict[str, Any]:
    if isinstance(processor, Mapping):
        return image_processor_settings(processor)
    if isinstance(processor, str | os.PathLike):
        path = Path(processor)
        if path.is_dir():
            path = next(
                (path / n for n in PROCESSOR_FILES if (path / n).is_file()), path / PROCESSOR_FILES[0]
            )
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read image processor config {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} does not hold a JSON object")
        return image_processor_settings(loaded)
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
