"""LLaVA-NeXT's anyres preprocessing: an image → uint8 ``(1 + rows*cols, 3, S, S)`` tiles, base first.

``llava/mm_utils.py: process_anyres_image``, exactly: the best grid pinpoint for the image
(:func:`pipeline.model.anyres.select_best_resolution`), the image resized to fit it
(``resize_and_pad_image``: the scale of the tighter side, the other side ``min(ceil(side * scale),
target)``) and pasted centred on a black canvas of that pinpoint, cut into ``S``×``S`` tiles row by
row (``divide_to_patches``), after the whole image squashed to ``S``×``S`` (the base image). Every
tile then goes through the CLIP processor, whose resize and crop are no-ops at ``S``, leaving the
normalisation (on the encoder's device). Both resizes use ``spec.anyres_resample`` (LLaVA: PIL's
default, bicubic; transformers' processor: its ``resample``), through the exact compiled resampler
when it applies, Pillow otherwise.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ..model.anyres import AnyresGrid, grid_for
from . import native
from .passes import pass_model
from .spec import PreprocessSpec

__all__ = ["anyres_tiles"]


def _resize_chw(image: Image.Image, width: int, height: int, resample: int) -> np.ndarray:
    """``image.resize((width, height), resample)`` as C-contiguous CHW uint8 (compiled route when it applies)."""
    if (width, height) == image.size:
        return np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))
    model = pass_model(resample)
    module = native.compiled_resampler(resample) if model is not None else None
    if module is not None and model is not None:
        hfirst = model.horizontal_first(image.width, image.height, width, height)
        size = (image.height, image.width)
        return native.compiled_window(
            module, image, size, (0, 0, 0), (height, width), (0, 0, height, width), resample, hfirst
        )
    return np.ascontiguousarray(np.asarray(image.resize((width, height), resample)).transpose(2, 0, 1))


def anyres_tiles(image: Image.Image, spec: PreprocessSpec) -> tuple[np.ndarray, AnyresGrid]:
    """The base image and the tiles of an RGB image, ``(1 + rows*cols, 3, S, S)`` uint8, and its grid."""
    side = spec.crop_height
    grid = grid_for(image.size, spec.grid_pinpoints, side)
    width, height = image.size
    target_w, target_h = grid.canvas
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(height * scale_w), target_h)
    else:
        new_w, new_h = min(math.ceil(width * scale_h), target_w), target_h
    canvas = np.zeros((3, target_h, target_w), dtype=np.uint8)
    top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    canvas[:, top : top + new_h, left : left + new_w] = _resize_chw(image, new_w, new_h, spec.anyres_resample)
    tiles = np.empty((1 + grid.num_tiles, 3, side, side), dtype=np.uint8)
    tiles[0] = _resize_chw(image, spec.size, spec.size, spec.anyres_resample)
    for row in range(grid.rows):
        for col in range(grid.cols):
            tiles[1 + row * grid.cols + col] = canvas[
                :, row * side : (row + 1) * side, col * side : (col + 1) * side
            ]
    return tiles, grid
