"""Preprocessing: untrusted bytes → uint8 ``(3, H, W)`` pixels, numerically identical to LLaVA's.

:class:`Preprocessor` is the decode guard (:mod:`pipeline.images.decode`) followed by LLaVA's
``process_images`` up to the uint8 pixels: ``expand2square`` for ``pad``, the CLIP processor's
shortest-edge resize and center crop (:mod:`pipeline.images.spec`). Rescaling and normalisation
run later, on the encoder's device (:mod:`pipeline.images.normalize`): 4x less data to move.

Two routes give the same pixels, bit for bit: the compiled resampler
(:mod:`pipeline.images.native`) and Pillow's own passes (:mod:`pipeline.images.passes`).
Intermediates larger than ``DecodeConfig.max_image_pixels`` (extreme aspect ratios) are refused
as ``too_large`` on every route instead of exhausting memory. With the compiled resampler, JPEG
decoding is most of the time left.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..config import DecodeConfig
from ..model.anyres import AnyresGrid
from ..model.errors import DecodeError, ErrorCode
from . import native
from .anyres import anyres_tiles
from .decode import decode_image, raise_pil_pixel_limit
from .passes import (
    PassModel,
    expand2square,
    hf_center_crop,
    pad_landscape,
    pass_model,
    pil_to_chw,
    resize_window,
    to_chw,
)
from .spec import PreprocessSpec, resize_output_size

logger = logging.getLogger(__name__)

__all__ = ["PreparedImage", "Preprocessor"]


@dataclass(frozen=True)
class PreparedImage:
    """An input ready for the encoder: uint8 pixels plus the original size (and, anyres, its grid)."""

    pixels: Any
    """uint8 C-contiguous ``(3, H, W)``; anyres: ``(1 + rows*cols, 3, S, S)``, the base image first.
    (numpy on the host; a device tensor when the encoder decoded it on its device.)"""
    width: int
    """Width of the decoded image (as stored, or after the EXIF orientation when that is applied)."""
    height: int
    """Height of the decoded image."""
    format: str = ""
    """Input format (``JPEG``, ``PNG``, ...)."""
    grid: AnyresGrid | None = None
    """anyres: the tile grid and canvas of the image; None otherwise."""

    @property
    def tiles(self) -> Any:
        """The pixels as ``(tiles, 3, H, W)`` (one tile for the non-anyres modes)."""
        return self.pixels if self.pixels.ndim == 4 else self.pixels[None]


class Preprocessor:
    """Bytes -> :class:`PreparedImage` (decode guard + :meth:`pixels`); cheap to call, thread-safe."""

    def __init__(self, spec: PreprocessSpec, decode_config: DecodeConfig | None = None) -> None:
        self.spec = spec
        self.decode_config = decode_config if decode_config is not None else DecodeConfig()
        self._background = spec.background
        raise_pil_pixel_limit(self.decode_config.max_image_pixels)

    def __repr__(self) -> str:
        return f"Preprocessor({self.spec!r})"

    def __call__(self, data: bytes, name: str | None = None) -> PreparedImage:
        """Decode ``data`` with the guard and preprocess it. Raises ``DecodeError`` only."""
        spec = self.spec
        decoded = decode_image(
            data,
            name=name,
            config=self.decode_config,
            exif_transpose=spec.exif_transpose,
            alpha=spec.alpha,
            sixteen_bit=spec.sixteen_bit,
        )
        grid = None
        try:
            if spec.aspect_ratio == "anyres":
                pixels, grid = anyres_tiles(decoded.image, spec)
            else:
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
            pixels=pixels, width=decoded.width, height=decoded.height, format=decoded.format, grid=grid
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
        if spec.aspect_ratio == "anyres":
            raise ValueError("anyres images are tiles: call the Preprocessor (or images.anyres.anyres_tiles)")
        if not spec.do_resize:
            return self._pixels_unresized(image)
        model = pass_model(spec.resample)
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
                image = pad_landscape(image, spec.size, spec.resample, self._background)  # (size, size)
            else:
                image = expand2square(image, self._background)
            width = height = image.size[0]
        new_h, new_w, top, left, crop_h, crop_w = self._window(height, width)
        self._check_work(max(new_w * new_h, new_w * height, width * new_h), image)
        if top < 0 or left < 0 or model is None:
            # Crop larger than the image (HF pads with zeros) or an unverified resampler: plain route.
            resized = image.resize((new_w, new_h), spec.resample) if (new_w, new_h) != image.size else image
            return to_chw(hf_center_crop(np.asarray(resized), crop_h, crop_w))
        return pil_to_chw(resize_window(image, new_h, new_w, top, left, crop_h, crop_w, spec.resample, model))

    def _pixels_unresized(self, image: Image.Image) -> np.ndarray:
        """``do_resize: false``: expand2square (pad) and the center crop only, on the image as it is."""
        spec = self.spec
        if spec.aspect_ratio == "pad" and image.width != image.height:
            self._check_work(max(image.size) ** 2, image)
            image = expand2square(image, self._background)
        arr = np.asarray(image)
        if spec.do_center_crop:
            arr = hf_center_crop(arr, spec.crop_height, spec.crop_width)
        return to_chw(arr)

    def _window(self, height: int, width: int) -> tuple[int, int, int, int, int, int]:
        """(new_h, new_w, top, left, crop_h, crop_w): the resize of a height x width image and the
        window of it that is kept (top/left < 0: the crop is larger than the resized image)."""
        spec = self.spec
        new_h, new_w = resize_output_size(height, width, spec.size)
        crop_h, crop_w = (spec.crop_height, spec.crop_width) if spec.do_center_crop else (new_h, new_w)
        return new_h, new_w, (new_h - crop_h) // 2, (new_w - crop_w) // 2, crop_h, crop_w

    def _pixels_compiled(
        self, image: Image.Image, model: PassModel | None, canvas_h: int, canvas_w: int
    ) -> np.ndarray | None:
        """:meth:`pixels` through the compiled resampler, or None where it does not apply.

        ``(canvas_h, canvas_w)``: the image's size, or expand2square's square (the image centred
        on it, as LLaVA pastes it); the square is never built.
        """
        spec = self.spec
        resampler = native.compiled_resampler(spec.resample) if model is not None else None
        if resampler is None:
            return None
        width, height = image.size
        new_h, new_w, top, left, crop_h, crop_w = self._window(canvas_h, canvas_w)
        horizontal_first = model.horizontal_first(canvas_w, canvas_h, new_w, new_h)
        padded = (canvas_h, canvas_w) != (height, width)
        if top < 0 or left < 0 or (padded and not horizontal_first):
            return None  # HF's zero padding of a too-small crop; a padded vertical-first resize
        self._check_work(max(new_w * new_h, new_w * canvas_h, canvas_w * new_h), image)
        return native.compiled_window(
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
