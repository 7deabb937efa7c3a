"""Pillow's resize, decomposed: the exact route of preprocessing when the compiled resampler is absent.

PIL's resize is separable: a horizontal and a vertical pass through a uint8 intermediate (Pillow
13 runs the vertical pass first when the height shrinks by more than twice as many pixels as the
width, else the horizontal one). Each output row (column) of a pass reads one input row
(column), and the weights depend on nothing but (input size, output size, filter). So each pass
can run as its own ``Image.resize`` call on exactly the input the kept window needs, in PIL's
order: with ``pad`` and a landscape image the horizontal pass runs on the image rows only (the
padding rows are one constant colour, which the pass maps to itself exactly) and the square is
never built; with a center crop the second pass runs on the kept columns (rows) only, the first
on the input rows (columns) those read.

That decomposition is verified once per process and filter (:func:`pass_model`); if it does not
hold (another Pillow build), every image takes the plain route (``resize`` then crop), which is
the reference itself. No ``Image.draft`` (JPEG DCT scaling) or ``reducing_gap``: both change the
numbers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = [
    "PassModel",
    "crop",
    "expand2square",
    "hf_center_crop",
    "pad_landscape",
    "pass_model",
    "pil_to_chw",
    "resize_window",
    "to_chw",
]

# Support (in output-scale units) of PIL's separable resampling filters, by PIL filter id.
# NEAREST (0) is not separable in PIL (it uses an affine transform) and takes the plain route.
_FILTER_SUPPORT = {4: 0.5, 2: 1.0, 5: 1.0, 3: 2.0, 1: 3.0}  # BOX, BILINEAR, HAMMING, BICUBIC, LANCZOS
_MARGIN = 2  # extra input rows kept around the computed support: absorbs any rounding difference
PROBE_BACKGROUND = (122, 116, 104)
"""A pad colour for the start-up probes (LLaVA's for OpenAI CLIP's mean)."""


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


def pad_landscape(
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


@dataclass(frozen=True)
class PassModel:
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
def pass_model(resample: int) -> PassModel | None:
    """Probe the installed Pillow once per filter: can one ``resize`` be rebuilt exactly from a
    horizontal-only and a vertical-only ``resize``, and in which order? None: use plain resizes."""
    if resample not in _FILTER_SUPPORT:
        return None
    rng = np.random.default_rng(1234)
    noise = Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    for rule in (True, False):
        model = PassModel(rows_first_rule=rule)
        if all(_probe_ok(noise, src, dst, resample, model) for src, dst in _PROBES) and _probe_pad(
            noise, resample, model
        ):
            return model
    logger.info("PIL resize is not decomposable into passes here; preprocessing uses plain resizes")
    return None


def _probe_ok(
    noise: Image.Image, src: tuple[int, int], dst: tuple[int, int], resample: int, model: PassModel
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
    window = resize_window(image, nh, nw, top, left, ch, cw, resample, model)
    return np.array_equal(full[top : top + ch, left : left + cw], np.asarray(window))


def _probe_pad(noise: Image.Image, resample: int, model: PassModel) -> bool:
    image, background = noise.crop((0, 0, 61, 37)), PROBE_BACKGROUND
    ref = np.asarray(expand2square(image, background).resize((24, 24), resample))
    fast = np.asarray(pad_landscape(image, 24, resample, background))
    return model.horizontal_first(61, 61, 24, 24) and np.array_equal(ref, fast)


def resize_window(
    image: Image.Image,
    new_h: int,
    new_w: int,
    top: int,
    left: int,
    crop_h: int,
    crop_w: int,
    resample: int,
    model: PassModel,
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
        return crop(image, left, top, right, bottom)
    if new_h == height:  # horizontal pass only: keep the rows first
        rows = image.crop((0, top, width, bottom)) if crop_h != height else image
        return crop(rows.resize((new_w, crop_h), resample), left, 0, right, crop_h)
    if new_w == width:  # vertical pass only: keep the columns first
        cols = image.crop((left, 0, right, height)) if crop_w != width else image
        return crop(cols.resize((crop_w, new_h), resample), 0, top, crop_w, bottom)
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
        return crop(band.resize((crop_w, new_h), resample), 0, top, crop_w, bottom)  # vertical pass
    c0, c1 = _input_span(width, new_w, left, right, support)
    band = image.crop((c0, 0, c1, height)) if (c0, c1) != (0, width) else image
    band = band.resize((c1 - c0, new_h), resample)  # vertical pass
    if crop_h != new_h:
        band = band.crop((0, top, c1 - c0, bottom))
    if (c0, c1) != (0, width):
        full = Image.new("RGB", (width, crop_h))
        full.paste(band, (c0, 0))  # columns outside [c0, c1) are never read below
        band = full
    return crop(band.resize((new_w, crop_h), resample), left, 0, right, crop_h)  # horizontal pass


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


def hf_center_crop(arr: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
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


def crop(image: Image.Image, left: int, top: int, right: int, bottom: int) -> Image.Image:
    return (
        image if (left, top, right, bottom) == (0, 0, *image.size) else image.crop((left, top, right, bottom))
    )


def pil_to_chw(image: Image.Image) -> np.ndarray:
    """RGB PIL image -> C-contiguous CHW uint8 (band by band: faster than HWC + transpose)."""
    out = np.empty((3, image.height, image.width), dtype=np.uint8)
    for channel, band in enumerate(image.split()):
        out[channel] = np.asarray(band)
    return out


def to_chw(arr: np.ndarray) -> np.ndarray:
    """HWC uint8 -> C-contiguous CHW uint8 (one copy)."""
    out = np.empty((3, arr.shape[0], arr.shape[1]), dtype=np.uint8)
    np.copyto(out, arr.transpose(2, 0, 1))
    return out
