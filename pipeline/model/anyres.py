"""LLaVA-NeXT's "anyres": the tile grid an image gets, and how its tile features become one sequence.

Pure Python + torch, written from LLaVA's own definitions (``llava/mm_utils.py``:
``select_best_resolution``, ``get_anyres_image_grid_shape``; ``llava/model/llava_arch.py``:
``unpad_image`` and the ``spatial_unpad`` branch of ``prepare_inputs_labels_for_multimodal``).

Conventions are LLaVA's: an image size is ``(width, height)`` and a grid pinpoint is
``(width, height)``. transformers' LLaVA-NeXT classes read pinpoints as ``(height, width)``: the
llava-hf layout converts them on resolution (:func:`pinpoints_from_hf`), which keeps transformers'
order of candidates and so its tie-breaking. The grid part is pure Python (the decode stage uses
it); only the packing imports torch.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:  # the grid is pure Python (decode tasks use it); the packing needs torch
    import torch

__all__ = [
    "AnyresGrid",
    "expand_pinpoints",
    "grid_for",
    "pack_tiles",
    "pinpoints_from_hf",
    "select_best_resolution",
    "unpad",
]

_GRID_RANGE = re.compile(r"\((\d+)x(\d+)\)")

Pinpoints = tuple[tuple[int, int], ...]


def expand_pinpoints(value: Any, tile_size: int) -> Pinpoints:
    """The ``(width, height)`` pinpoints an ``image_grid_pinpoints`` value stands for.

    A list of ``[width, height]`` pairs is used as it is; LLaVA-NeXT's string form ``"(1x1),...,(6x6)"``
    expands from its FIRST and LAST ``(AxB)`` to every ``(i, j)`` (``i`` outer) times ``tile_size``; any
    other string is a Python literal list (``ast.literal_eval``, as LLaVA reads it).
    """
    if isinstance(value, str):
        if "x" in value:
            matches = _GRID_RANGE.findall(value)
            if not matches:
                raise ConfigError(f"image_grid_pinpoints {value!r}: no '(AxB)' ranges in the string")
            (a0, a1), (b0, b1) = (tuple(map(int, m)) for m in (matches[0], matches[-1]))
            value = [[i * tile_size, j * tile_size] for i in range(a0, b0 + 1) for j in range(a1, b1 + 1)]
        else:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError) as exc:
                raise ConfigError(
                    f"image_grid_pinpoints {value!r} is not a list of [width, height]: {exc}"
                ) from None
    try:
        pinpoints = tuple((int(w), int(h)) for w, h in value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"image_grid_pinpoints must be a list of [width, height] pairs, got {value!r}"
        ) from None
    if not pinpoints or any(w <= 0 or h <= 0 for w, h in pinpoints):
        raise ConfigError(f"image_grid_pinpoints must hold positive [width, height] pairs, got {value!r}")
    bad = [p for p in pinpoints if p[0] % tile_size or p[1] % tile_size]
    if bad:
        raise ConfigError(f"image_grid_pinpoints {bad} are not multiples of the tile size {tile_size}")
    return pinpoints


def pinpoints_from_hf(value: Any, tile_size: int) -> Pinpoints:
    """transformers' ``image_grid_pinpoints`` (a list of ``[height, width]``) as ``(width, height)`` pairs,
    in the same order (so that ties resolve as transformers resolves them)."""
    if isinstance(value, str):
        raise ConfigError("a llava-hf config's image_grid_pinpoints must be a list of [height, width] pairs")
    return tuple((w, h) for h, w in expand_pinpoints(value, tile_size))


def select_best_resolution(size: tuple[int, int], pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """``llava/mm_utils.py: select_best_resolution``: the pinpoint keeping the most of the image's
    resolution (then wasting the least area; the earlier one on an exact tie). Sizes are ``(w, h)``."""
    width, height = size
    best, best_effective, best_waste = None, 0, math.inf
    for cand_w, cand_h in pinpoints:
        scale = min(cand_w / width, cand_h / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        waste = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (cand_w, cand_h), effective, waste
    assert best is not None
    return best


class AnyresGrid:
    """The grid an image is tiled with: ``rows`` × ``cols`` tiles of ``tile_size``, the canvas
    ``(width, height)`` the image is letterboxed onto, and the original image size."""

    __slots__ = ("canvas", "cols", "image_size", "rows", "tile_size")

    def __init__(self, image_size: tuple[int, int], canvas: tuple[int, int], tile_size: int) -> None:
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.canvas = (int(canvas[0]), int(canvas[1]))
        self.tile_size = int(tile_size)
        self.cols, self.rows = self.canvas[0] // tile_size, self.canvas[1] // tile_size

    @property
    def num_tiles(self) -> int:
        """Tiles of the canvas (the base image not counted)."""
        return self.rows * self.cols

    def __repr__(self) -> str:
        return f"AnyresGrid({self.rows}x{self.cols} of {self.tile_size}, canvas {self.canvas}, image {self.image_size})"


def grid_for(image_size: tuple[int, int], pinpoints: Sequence[tuple[int, int]], tile_size: int) -> AnyresGrid:
    """The :class:`AnyresGrid` of an image of ``image_size`` (``(w, h)``)."""
    return AnyresGrid(image_size, select_best_resolution(image_size, pinpoints), tile_size)


def unpad(features: torch.Tensor, image_size: tuple[int, int], rounding: str) -> torch.Tensor:
    """``llava/model/llava_arch.py: unpad_image`` of a ``[C, H, W]`` map for an original image of
    ``(width, height)``: the letterbox rows (or columns) cut from both ends. ``rounding`` says how the
    kept lines are counted: ``floor`` (LLaVA: ``int(side * scale)``) or ``round`` (transformers:
    ``int(round(side * scale, 7))``)."""
    width, height = image_size
    current_h, current_w = features.shape[1:]

    def kept(side: int, scale: float) -> int:
        return int(side * scale) if rounding == "floor" else int(round(side * scale, 7))

    if width / height > current_w / current_h:
        padding = (current_h - kept(height, current_w / width)) // 2
        return features[:, padding : current_h - padding, :]
    padding = (current_w - kept(width, current_h / height)) // 2
    return features[:, :, padding : current_w - padding]


def pack_tiles(
    tiles: torch.Tensor,
    grid: AnyresGrid,
    *,
    merge_type: str,
    image_newline: torch.Tensor | None,
    rounding: str = "floor",
    anyres_max: int | None = None,
) -> torch.Tensor:
    """One image's ``[tokens, dim]`` sequence from its ``[1 + rows*cols, side*side, dim]`` tile
    features (base first), as LLaVA-NeXT's ``prepare_inputs_labels_for_multimodal`` builds it.

    ``flat``: every tile's tokens in order. ``spatial``: the base tokens, then the tiles laid out
    as one ``rows*side × cols*side`` map, row-major. ``spatial_unpad``: the same map with the
    letterbox cut (:func:`unpad`), shrunk bilinearly for ``anyres_max`` when it holds more than
    about ``anyres_max`` tiles' worth of tokens, and ``image_newline`` ending every row. A single
    tile: its tokens (+ one ``image_newline`` with ``spatial_unpad``).
    """
    import torch
    import torch.nn.functional as F

    if merge_type == "flat":
        return tiles.flatten(0, 1)
    if tiles.shape[0] == 1:
        feature = tiles[0]
        if merge_type == "spatial_unpad":
            assert image_newline is not None
            feature = torch.cat((feature, image_newline[None].to(feature.dtype)), dim=0)
        return feature
    base, rest = tiles[0], tiles[1:]
    side = math.isqrt(base.shape[0])
    if side * side != base.shape[0]:
        raise ConfigError(
            f"spatial merging needs square tiles of patches, got {base.shape[0]} tokens (cls_patch?)"
        )
    if rest.shape[0] != grid.num_tiles:
        raise ConfigError(f"{rest.shape[0]} tile features for a {grid.rows}x{grid.cols} grid")
    feature = rest.view(grid.rows, grid.cols, side, side, -1)
    if merge_type == "spatial":
        return torch.cat((base, feature.permute(0, 2, 1, 3, 4).flatten(0, 3)), dim=0)
    assert image_newline is not None
    feature = (
        feature.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
    )  # [dim, rows*side, cols*side]
    feature = unpad(feature, grid.image_size, rounding)
    if anyres_max is not None:
        h, w = feature.shape[1:]
        times = math.sqrt(h * w / (anyres_max * side**2))
        if times > 1.1:
            feature = F.interpolate(feature[None], [int(h // times), int(w // times)], mode="bilinear")[0]
    newline = image_newline[:, None, None].expand(*feature.shape[:-1], 1).to(feature.dtype)
    feature = torch.cat((feature, newline), dim=-1).flatten(1, 2).transpose(0, 1)
    return torch.cat((base, feature), dim=0)
