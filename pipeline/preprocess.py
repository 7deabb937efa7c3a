"""LLaVA/CLIP preprocessing: RGB image -> uint8 ``(3, H, W)`` pixels -> normalised tensor.

Numerically identical to LLaVA's ``process_images``: ``transformers.CLIPImageProcessor`` (the
PIL backend, which is what ``CLIPImageProcessor`` is without torchvision and what LLaVA was
trained with), preceded by ``expand2square`` for ``image_aspect_ratio: pad``:

- resize so that the shortest edge is ``size`` (the other edge is ``int(size * long / short)``,
  truncated, as ``transformers.image_transforms.get_resize_output_image_size`` does) with PIL's
  resampling filter (bicubic) on uint8 RGB, exactly as the HF processor does;
- center crop to ``crop_height x crop_width`` (zero padding if the image is smaller, as HF);
- rescale and normalise: ``(x * rescale_factor - mean) / std``.

The first two steps run on the CPU, on uint8 (:meth:`Preprocessor.pixels`), and the third
runs later on the encoder's device (:func:`normalize`): 4x less data to move, same numbers
(max |diff| vs ``CLIPImageProcessor`` below 1e-5 in float32, see the tests).

Speed: PIL's resize is separable: a horizontal and a vertical pass through a uint8
intermediate (Pillow 13 runs the vertical pass first when the height shrinks by more than twice
as many pixels as the width, else the horizontal one). Each output row (column) of a pass reads
one input row (column), and the weights depend on nothing but (input size, output size, filter).
Two routes use that, both bit-identical to resizing everything and cropping:

- the compiled resampler (``pipeline/_resample.c``, built by ``pip install``): the same weights
  and integer arithmetic as Pillow, vectorised (AVX2 where the CPU has it), computing only the
  kept window from only the input it reads, with ``expand2square``'s padding virtual (background
  rows are resampled once) and the CHW layout written directly. It is checked against the
  installed Pillow once per process and filter (:func:`_compiled_resampler`) and used for
  BICUBIC, BILINEAR and BOX; :func:`resampler_name` says which route runs;
- otherwise Pillow itself, one ``Image.resize`` call per pass in PIL's order on exactly the
  input the pass needs: with ``pad`` and a landscape image the horizontal pass runs on the image
  rows only (the padding rows are one constant colour, which the pass maps to itself exactly)
  and the square is never built; with a center crop the second pass runs on the kept columns
  (rows) only, the first on the input rows (columns) those read. That decomposition is verified
  once per process and filter (:func:`_pass_model`); if it does not hold (another Pillow build),
  every image takes the plain route (``resize`` then crop), which is the reference itself.

Intermediates larger than ``DecodeConfig.max_image_pixels`` (extreme aspect ratios) are refused
as ``too_large`` on every route instead of exhausting memory. With the compiled resampler, JPEG
decoding is most of the time left.

No ``Image.draft`` (JPEG DCT scaling) or ``reducing_gap``: both change the numbers.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import logging
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .config import DecodeConfig
from .decode import decode_image
from .model.errors import ConfigError, DecodeError, ErrorCode

logger = logging.getLogger(__name__)

__all__ = [
    "ASPECT_RATIOS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "PreparedImage",
    "PreprocessSpec",
    "Preprocessor",
    "expand2square",
    "normalize",
    "resampler_name",
    "resize_output_size",
]

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

ASPECT_RATIOS = ("pad", "square", "crop")
"""``pad``: LLaVA's expand2square then the CLIP path; ``square``/``crop``: the plain CLIP path."""

# Support (in output-scale units) of PIL's separable resampling filters, by PIL filter id.
# NEAREST (0) is not separable in PIL (it uses an affine transform) and takes the plain route.
_FILTER_SUPPORT = {4: 0.5, 2: 1.0, 5: 1.0, 3: 2.0, 1: 3.0}  # BOX, BILINEAR, HAMMING, BICUBIC, LANCZOS
_MARGIN = 2  # extra input rows kept around the computed support: absorbs any rounding difference


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


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA's ``expand2square``: pad to a square with ``background``, the image centred."""
    width, height = image.size
    if width == height:
        return image
    if width > height:
        result = Image.new(image.mode, (width, width), background)
        result.paste(image, (0, (width - height) // 2))
        return result
    result = Image.new(image.mode, (height, height), background)
    result.paste(image, ((height - width) // 2, 0))
    return result


@dataclass(frozen=True)
class PreparedImage:
    """An input ready for the encoder: uint8 pixels plus the original size."""

    pixels: np.ndarray
    """uint8, shape (3, H, W), C-contiguous."""
    width: int
    """Width of the decoded image as displayed (after EXIF orientation)."""
    height: int
    """Height of the decoded image as displayed."""
    format: str = ""
    """Input format (``JPEG``, ``PNG``, ...)."""


class Preprocessor:
    """Bytes -> :class:`PreparedImage` (decode guard + :meth:`pixels`); cheap to call, thread-safe."""

    def __init__(self, spec: PreprocessSpec, decode_config: DecodeConfig | None = None) -> None:
        self.spec = spec
        self.decode_config = decode_config if decode_config is not None else DecodeConfig()
        self._background = spec.background

    def __repr__(self) -> str:
        return f"Preprocessor({self.spec!r})"

    def __call__(self, data: bytes, name: str | None = None) -> PreparedImage:
        """Decode ``data`` with the guard and preprocess it. Raises ``DecodeError`` only."""
        decoded = decode_image(data, name=name, config=self.decode_config)
        try:
            pixels = self.pixels(decoded.image)
        except DecodeError as exc:
            raise DecodeError(exc.message, code=exc.code, name=name) from None
        except MemoryError as exc:
            raise DecodeError(
                f"out of memory while preprocessing ({exc})", code=ErrorCode.TOO_LARGE, name=name
            ) from None
        except Exception as exc:  # a bug, not a bad input; still never fatal to a job
            logger.warning("preprocessing failed for %s", name, exc_info=True)
            raise DecodeError(
                f"preprocessing failed ({type(exc).__name__}: {exc})", code=ErrorCode.CORRUPT, name=name
            ) from None
        return PreparedImage(
            pixels=pixels,
            width=decoded.width,
            height=decoded.height,
            format=decoded.format,
        )

    def pixels(self, image: Image.Image) -> np.ndarray:
        """uint8 ``(3, H, W)`` C-contiguous pixels of an RGB PIL image, before rescale/normalise.

        Raises ``DecodeError(too_large)`` when an intermediate image of the resize would exceed
        ``decode_config.max_image_pixels`` (extreme aspect ratios: LLaVA's padded square of a
        1000 x 100000 image, or the 8-billion-pixel resize target of a 50000000 x 2 one), instead of
        exhausting memory.
        """
        if image.mode != "RGB":
            image = image.convert("RGB")
        spec = self.spec
        model = _pass_model(spec.resample)
        width, height = image.size
        pad = spec.aspect_ratio == "pad" and width != height
        canvas, landscape_route = (height, width), False
        if pad:
            side = max(width, height)
            canvas = (side, side)
            landscape_route = (
                model is not None
                and width > height
                and model.horizontal_first(side, side, spec.size, spec.size)
            )
            # The intermediate LLaVA's route would need: (size x side) rows for a landscape image
            # (the horizontal pass runs first, on the image rows only), else the whole square.
            self._check_work(spec.size * side if landscape_route else side * side, image)
        compiled = self._pixels_compiled(image, model, *canvas)
        if compiled is not None:
            return compiled
        if pad:
            if landscape_route:
                image = _pad_landscape(image, spec.size, spec.resample, self._background)  # (size, size)
            else:
                image = expand2square(image, self._background)
            width = height = image.size[0]
        new_h, new_w, top, left, crop_h, crop_w = self._window(height, width)
        self._check_work(max(new_w * new_h, new_w * height, width * new_h), image)
        if top < 0 or left < 0 or model is None:
            # Crop larger than the image (HF pads with zeros) or an unverified resampler: plain route.
            resized = image.resize((new_w, new_h), spec.resample) if (new_w, new_h) != image.size else image
            return _to_chw(_hf_center_crop(np.asarray(resized), crop_h, crop_w))
        return _pil_to_chw(
            _resize_window(image, new_h, new_w, top, left, crop_h, crop_w, spec.resample, model)
        )

    def _window(self, height: int, width: int) -> tuple[int, int, int, int, int, int]:
        """(new_h, new_w, top, left, crop_h, crop_w): the resize of a height x width image and the
        window of it that is kept (top/left < 0: the crop is larger than the resized image)."""
        spec = self.spec
        new_h, new_w = resize_output_size(height, width, spec.size)
        crop_h, crop_w = (spec.crop_height, spec.crop_width) if spec.do_center_crop else (new_h, new_w)
        return new_h, new_w, (new_h - crop_h) // 2, (new_w - crop_w) // 2, crop_h, crop_w

    def _pixels_compiled(
        self, image: Image.Image, model: _PassModel | None, canvas_h: int, canvas_w: int
    ) -> np.ndarray | None:
        """:meth:`pixels` through the compiled resampler, or None where it does not apply.

        ``(canvas_h, canvas_w)``: the image's size, or expand2square's square (the image centred
        on it, as LLaVA pastes it); the square is never built.
        """
        spec = self.spec
        resampler = _compiled_resampler(spec.resample) if model is not None else None
        if resampler is None:
            return None
        width, height = image.size
        new_h, new_w, top, left, crop_h, crop_w = self._window(canvas_h, canvas_w)
        horizontal_first = model.horizontal_first(canvas_w, canvas_h, new_w, new_h)
        padded = (canvas_h, canvas_w) != (height, width)
        if top < 0 or left < 0 or (padded and not horizontal_first):
            return None  # HF's zero padding of a too-small crop; a padded vertical-first resize
        self._check_work(max(new_w * new_h, new_w * canvas_h, canvas_w * new_h), image)
        return _compiled_window(
            resampler,
            image,
            (canvas_h, canvas_w),
            self._background,
            (new_h, new_w),
            (top, left, crop_h, crop_w),
            spec.resample,
            horizontal_first,
        )

    def _check_work(self, pixels: int, image: Image.Image) -> None:
        limit = self.decode_config.max_image_pixels
        if pixels > limit:
            raise DecodeError(
                f"preprocessing this {image.width}x{image.height} image ({self.spec.aspect_ratio}) needs an "
                f"intermediate image of {pixels} pixels, more than the limit of {limit}",
                code=ErrorCode.TOO_LARGE,
            )


def _pad_landscape(
    image: Image.Image, size: int, resample: int, background: tuple[int, int, int]
) -> Image.Image:
    """``expand2square(image, background).resize((size, size))`` for a landscape image, bit-identical.

    The square is resampled horizontal pass first; its padding rows are one constant colour,
    which the horizontal pass maps to itself exactly (normalised fixed-point weights), so the
    horizontal pass only needs the image rows, and the square itself is never built.
    """
    width, height = image.size
    side = width
    rows = image.resize((size, height), resample) if size != width else image  # horizontal pass
    canvas = Image.new("RGB", (size, side), background)
    canvas.paste(rows, (0, (side - height) // 2))
    return canvas.resize((size, size), resample) if size != side else canvas  # vertical pass


# ------------------------------------------------------------------------------------------
# Exact two-pass decomposition of PIL's resize


@dataclass(frozen=True)
class _PassModel:
    """How the installed Pillow orders the two passes of ``Image.resize`` (verified by a probe)."""

    rows_first_rule: bool
    """Recent Pillow (13 here): the vertical pass runs first when the height shrinks by more than
    twice as many pixels as the width (``dh > 0 and dh > 2 * dw``); older Pillow: horizontal first."""

    def horizontal_first(self, width: int, height: int, new_w: int, new_h: int) -> bool:
        if not self.rows_first_rule:
            return True
        dh, dw = height - new_h, width - new_w
        return not (dh > 0 and dh > 2 * dw)


# Probe geometries ((w, h), (new_w, new_h)): both pass orders, and both sides of the rule's boundary.
_PROBES = (
    ((50, 40), (23, 31)),
    ((40, 90), (37, 20)),
    ((40, 70), (30, 50)),
    ((40, 71), (30, 50)),
    ((20, 60), (30, 25)),
    ((60, 20), (30, 40)),
    ((31, 64), (64, 17)),
)


@lru_cache(maxsize=8)
def _pass_model(resample: int) -> _PassModel | None:
    """Probe the installed Pillow once per filter: can one ``resize`` be rebuilt exactly from a
    horizontal-only and a vertical-only ``resize``, and in which order? None: use plain resizes."""
    if resample not in _FILTER_SUPPORT:
        return None
    rng = np.random.default_rng(1234)
    noise = Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    for rule in (True, False):
        model = _PassModel(rows_first_rule=rule)
        if all(_probe_ok(noise, src, dst, resample, model) for src, dst in _PROBES) and _probe_pad(
            noise, resample, model
        ):
            return model
    logger.info("PIL resize is not decomposable into passes here; preprocessing uses plain resizes")
    return None


def _probe_ok(
    noise: Image.Image, src: tuple[int, int], dst: tuple[int, int], resample: int, model: _PassModel
) -> bool:
    image = noise.crop((0, 0, *src))
    (w, h), (nw, nh) = src, dst
    full = np.asarray(image.resize(dst, resample))
    if model.horizontal_first(w, h, nw, nh):
        two = image.resize((nw, h), resample).resize(dst, resample)
    else:
        two = image.resize((w, nh), resample).resize(dst, resample)
    if not np.array_equal(full, np.asarray(two)):
        return False
    # And the windowed version, as used by Preprocessor.pixels.
    top, left, ch, cw = nh // 4, nw // 3, nh // 2, nw // 3
    window = _resize_window(image, nh, nw, top, left, ch, cw, resample, model)
    return np.array_equal(full[top : top + ch, left : left + cw], np.asarray(window))


def _probe_pad(noise: Image.Image, resample: int, model: _PassModel) -> bool:
    image, background = noise.crop((0, 0, 61, 37)), (122, 116, 104)
    ref = np.asarray(expand2square(image, background).resize((24, 24), resample))
    fast = np.asarray(_pad_landscape(image, 24, resample, background))
    return model.horizontal_first(61, 61, 24, 24) and np.array_equal(ref, fast)


# ------------------------------------------------------------------------------------------
# The compiled resampler (pipeline/_resample.c)

_COMPILED_FILTERS = (2, 3, 4)  # BILINEAR, BICUBIC, BOX: the filters the extension implements
# Probe windows ((w, h), (new_w, new_h), (top, left, crop_h, crop_w)), as in _PROBES: both pass
# orders, up- and down-scaling, windows away from the edges.
_COMPILED_PROBES = (
    ((50, 40), (23, 31), (0, 0, 31, 23)),
    ((40, 90), (37, 20), (3, 5, 14, 30)),
    ((40, 71), (30, 50), (10, 2, 30, 25)),
    ((20, 60), (30, 25), (0, 0, 25, 30)),
    ((60, 20), (30, 40), (6, 7, 20, 20)),
    ((31, 64), (64, 17), (1, 0, 16, 64)),
    ((96, 61), (33, 21), (2, 6, 17, 21)),
)


@lru_cache(maxsize=8)
def _compiled_resampler(resample: int) -> Any | None:
    """The compiled extension when it is built and reproduces the installed Pillow exactly for
    ``resample`` (checked once per process and filter on a few resizes, padded ones included);
    else None, and preprocessing uses Pillow's own passes."""
    if resample not in _COMPILED_FILTERS:
        return None
    model = _pass_model(resample)
    if model is None:
        return None
    _resample = _load_extension()
    if _resample is None:
        logger.warning(
            "the compiled resampler (pipeline/_resample.c) is not built: preprocessing uses Pillow's "
            "resize (identical pixels, ~3x slower); build it with `pip install -e .` (needs a C compiler)"
        )
        return None
    try:
        if not _probe_compiled(_resample, resample, model):
            logger.warning(
                "the compiled resampler differs from this Pillow build (%s); preprocessing uses Pillow",
                getattr(Image, "__version__", "?"),
            )
            return None
    except Exception:  # e.g. a stale build with another signature
        logger.warning("the compiled resampler failed its check; preprocessing uses Pillow", exc_info=True)
        return None
    return _resample


def _probe_compiled(_resample: Any, resample: int, model: _PassModel) -> bool:
    rng = np.random.default_rng(4321)
    noise = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    background = (122, 116, 104)
    for (w, h), (nw, nh), (top, left, ch, cw) in _COMPILED_PROBES:
        for pad in (False, True):
            image = Image.fromarray(np.ascontiguousarray(noise[:h, :w]))
            source = expand2square(image, background) if pad else image
            side_h, side_w = source.height, source.width
            horizontal_first = model.horizontal_first(side_w, side_h, nw, nh)
            if pad and not horizontal_first:
                continue
            want = np.asarray(source.resize((nw, nh), resample))[top : top + ch, left : left + cw]
            got = _compiled_window(
                _resample,
                image,
                (side_h, side_w),
                background,
                (nh, nw),
                (top, left, ch, cw),
                resample,
                horizontal_first,
            )
            if not np.array_equal(got, want.transpose(2, 0, 1)):
                return False
    return True


def _compiled_window(
    module: Any,
    image: Image.Image,
    canvas: tuple[int, int],
    background: tuple[int, int, int],
    out_size: tuple[int, int],
    window: tuple[int, int, int, int],
    resample: int,
    horizontal_first: bool,
) -> np.ndarray:
    """CHW uint8 ``window`` (top, left, height, width) of the resize to ``out_size`` (h, w) of an
    RGB image centred on a ``canvas`` (h, w) of ``background`` (the image's own size: no padding)."""
    height, width = image.height, image.width
    out = np.empty((3, window[2], window[3]), dtype=np.uint8)
    module.resize_window(
        np.asarray(image),
        height,
        width,
        out,
        canvas,
        ((canvas[0] - height) // 2, (canvas[1] - width) // 2),
        background,
        out_size,
        window,
        resample,
        horizontal_first,
    )
    return out


def _load_extension() -> Any | None:
    """``pipeline._resample``, or the build of the installed package when this copy of the
    sources has none (Ray's ``working_dir`` upload leaves out what .gitignore lists, build outputs
    included, and the uploaded sources come first on the workers' ``sys.path``). None if neither."""
    try:
        from . import _resample  # type: ignore[attr-defined]

        return _resample
    except ImportError:
        pass
    here = Path(__file__).resolve().parent
    for location in _package_locations():
        if location == here:
            continue
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            candidate = location / f"_resample{suffix}"
            if not candidate.is_file():
                continue
            spec = importlib.util.spec_from_file_location(f"{__package__}._resample", candidate)
            if spec is None or spec.loader is None:
                continue
            try:
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            except ImportError:
                continue
            logger.info("using the compiled resampler of the installed package: %s", candidate)
            return module
    return None


def _package_locations() -> list[Path]:
    """Folders that hold a ``pipeline`` package: what each import finder would pick (an editable
    install's finder included), then every ``sys.path`` entry."""
    found: list[Path] = []
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        try:
            spec = find_spec(__package__, None) if callable(find_spec) else None
        except Exception:
            continue
        for location in (spec.submodule_search_locations or []) if spec is not None else []:
            found.append(Path(location))
    found.extend(Path(entry or ".") / __package__ for entry in sys.path)
    unique: list[Path] = []
    for path in found:
        try:
            resolved = path.resolve()
        except OSError:
            continue
        if resolved.is_dir() and resolved not in unique:
            unique.append(resolved)
    return unique


def resampler_name(resample: int = 3) -> str:
    """Which resize implementation :meth:`Preprocessor.pixels` uses for ``resample``:
    ``compiled-avx2``, ``compiled`` (portable C) or ``pillow``. All give identical pixels."""
    module = _compiled_resampler(resample)
    if module is None:
        return "pillow"
    return "compiled-avx2" if getattr(module, "SIMD", 0) else "compiled"


def _resize_window(
    image: Image.Image,
    new_h: int,
    new_w: int,
    top: int,
    left: int,
    crop_h: int,
    crop_w: int,
    resample: int,
    model: _PassModel,
) -> Image.Image:
    """Rows [top, top+crop_h) x cols [left, left+crop_w) of ``image.resize((new_w, new_h))``.

    Bit-identical to resizing everything and cropping: PIL's resize is a horizontal and a
    vertical pass through a uint8 intermediate, every output row (column) of a pass reads one
    input row (column), and the weights depend only on (input size, output size, filter). So
    each pass runs as its own ``resize`` call on the part of its input the kept window needs,
    in the same order as PIL would run them.
    """
    width, height = image.size
    bottom, right = top + crop_h, left + crop_w
    if (new_w, new_h) == (width, height):
        return _crop(image, left, top, right, bottom)
    if new_h == height:  # horizontal pass only: keep the rows first
        rows = image.crop((0, top, width, bottom)) if crop_h != height else image
        return _crop(rows.resize((new_w, crop_h), resample), left, 0, right, crop_h)
    if new_w == width:  # vertical pass only: keep the columns first
        cols = image.crop((left, 0, right, height)) if crop_w != width else image
        return _crop(cols.resize((crop_w, new_h), resample), 0, top, crop_w, bottom)
    support = _FILTER_SUPPORT[resample]
    if model.horizontal_first(width, height, new_w, new_h):
        r0, r1 = _input_span(height, new_h, top, bottom, support)
        band = image.crop((0, r0, width, r1)) if (r0, r1) != (0, height) else image
        band = band.resize((new_w, r1 - r0), resample)  # horizontal pass
        if crop_w != new_w:
            band = band.crop((left, 0, right, r1 - r0))
        if (r0, r1) != (0, height):
            full = Image.new("RGB", (crop_w, height))
            full.paste(band, (0, r0))  # rows outside [r0, r1) are never read below
            band = full
        return _crop(band.resize((crop_w, new_h), resample), 0, top, crop_w, bottom)  # vertical pass
    c0, c1 = _input_span(width, new_w, left, right, support)
    band = image.crop((c0, 0, c1, height)) if (c0, c1) != (0, width) else image
    band = band.resize((c1 - c0, new_h), resample)  # vertical pass
    if crop_h != new_h:
        band = band.crop((0, top, c1 - c0, bottom))
    if (c0, c1) != (0, width):
        full = Image.new("RGB", (width, crop_h))
        full.paste(band, (c0, 0))  # columns outside [c0, c1) are never read below
        band = full
    return _crop(band.resize((new_w, crop_h), resample), left, 0, right, crop_h)  # horizontal pass


def _input_span(in_size: int, out_size: int, out0: int, out1: int, support: float) -> tuple[int, int]:
    """Input range [lo, hi) that PIL's resampling reads for outputs [out0, out1), plus a margin.

    Mirrors ``precompute_coeffs`` in Pillow's Resample.c: center = (i + 0.5) * scale,
    support = filter support * max(scale, 1), bounds = int(center -/+ support + 0.5), clipped.
    """
    scale = in_size / out_size
    support = support * max(scale, 1.0)
    lo = int((out0 + 0.5) * scale - support + 0.5) - _MARGIN
    hi = int((out1 - 1 + 0.5) * scale + support + 0.5) + _MARGIN
    return max(lo, 0), min(hi, in_size)


def _hf_center_crop(arr: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """``transformers.image_transforms.center_crop`` on an HWC array, zero padding included."""
    height, width = arr.shape[:2]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    bottom, right = top + crop_h, left + crop_w
    if top >= 0 and bottom <= height and left >= 0 and right <= width:
        return arr[top:bottom, left:right]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    padded = np.zeros((new_h, new_w, *arr.shape[2:]), dtype=arr.dtype)
    top_pad, left_pad = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    padded[top_pad : top_pad + height, left_pad : left_pad + width] = arr
    top, bottom, left, right = top + top_pad, bottom + top_pad, left + left_pad, right + left_pad
    return padded[max(0, top) : min(new_h, bottom), max(0, left) : min(new_w, right)]


def _crop(image: Image.Image, left: int, top: int, right: int, bottom: int) -> Image.Image:
    return (
        image if (left, top, right, bottom) == (0, 0, *image.size) else image.crop((left, top, right, bottom))
    )


def _pil_to_chw(image: Image.Image) -> np.ndarray:
    """RGB PIL image -> C-contiguous CHW uint8 (band by band: faster than HWC + transpose)."""
    out = np.empty((3, image.height, image.width), dtype=np.uint8)
    for channel, band in enumerate(image.split()):
        out[channel] = np.asarray(band)
    return out


def _to_chw(arr: np.ndarray) -> np.ndarray:
    """HWC uint8 -> C-contiguous CHW uint8 (one copy)."""
    out = np.empty((3, arr.shape[0], arr.shape[1]), dtype=np.uint8)
    np.copyto(out, arr.transpose(2, 0, 1))
    return out


# ------------------------------------------------------------------------------------------
# Normalisation (on the encoder's device)

_STATS_CACHE: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _stats(spec: PreprocessSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    key = (spec.image_mean, spec.image_std, spec.rescale_factor, str(device))
    cached = _STATS_CACHE.get(key)
    if cached is None:
        scale = torch.tensor(spec.rescale_factor, dtype=torch.float32, device=device)
        mean = torch.tensor(spec.image_mean, dtype=torch.float32, device=device).view(3, 1, 1)
        std = torch.tensor(spec.image_std, dtype=torch.float32, device=device).view(3, 1, 1)
        cached = (scale, mean, std)
        if len(_STATS_CACHE) < 64:
            _STATS_CACHE[key] = cached
    return cached


def normalize(
    pixels_uint8: torch.Tensor | np.ndarray,
    spec: PreprocessSpec,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(x * rescale_factor - mean) / std`` of uint8 pixels ``(B, 3, H, W)`` or ``(3, H, W)``.

    Computed in float32 on the tensor's own device (the same arithmetic as
    ``CLIPImageProcessor``: rescale, then subtract the mean and divide by the std, per channel),
    then cast to ``dtype``. A numpy array is accepted and converted (CPU).
    """
    if isinstance(pixels_uint8, np.ndarray):
        pixels_uint8 = torch.from_numpy(np.ascontiguousarray(pixels_uint8))
    if pixels_uint8.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 pixels, got {pixels_uint8.dtype}")
    if pixels_uint8.dim() not in (3, 4) or pixels_uint8.shape[-3] != 3:
        raise ValueError(f"normalize expects (B, 3, H, W) or (3, H, W), got {tuple(pixels_uint8.shape)}")
    scale, mean, std = _stats(spec, pixels_uint8.device)
    x = pixels_uint8.to(torch.float32)
    x.mul_(scale).sub_(mean).div_(std)
    return x if dtype == torch.float32 else x.to(dtype)
