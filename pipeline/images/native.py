"""The compiled resampler (``pipeline/images/_resample.c``): Pillow's resize, exact and vectorised.

The same weights and integer arithmetic as Pillow, vectorised (AVX2 where the CPU has it),
computing only the kept window from only the input it reads, with ``expand2square``'s padding
virtual (background rows are resampled once) and the CHW layout written directly. It is built by
``pip install`` (``setup.py``; optional), checked against the installed Pillow once per process
and filter (:func:`compiled_resampler`) and used for BICUBIC, BILINEAR and BOX;
:func:`resampler_name` says which route runs.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .passes import PROBE_BACKGROUND, PassModel, expand2square, pass_model

logger = logging.getLogger(__name__)

__all__ = ["compiled_resampler", "compiled_window", "resampler_name"]

_EXTENSION = "_resample"
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
def compiled_resampler(resample: int) -> Any | None:
    """The compiled extension when it is built and reproduces the installed Pillow exactly for
    ``resample`` (checked once per process and filter on a few resizes, padded ones included);
    else None, and preprocessing uses Pillow's own passes."""
    if resample not in _COMPILED_FILTERS:
        return None
    model = pass_model(resample)
    if model is None:
        return None
    _resample = _load_extension()
    if _resample is None:
        logger.warning(
            "the compiled resampler (pipeline/images/_resample.c) is not built: preprocessing uses Pillow's "
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


def _probe_compiled(_resample: Any, resample: int, model: PassModel) -> bool:
    rng = np.random.default_rng(4321)
    noise = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    background = PROBE_BACKGROUND
    for (w, h), (nw, nh), (top, left, ch, cw) in _COMPILED_PROBES:
        for pad in (False, True):
            image = Image.fromarray(np.ascontiguousarray(noise[:h, :w]))
            source = expand2square(image, background) if pad else image
            side_h, side_w = source.height, source.width
            horizontal_first = model.horizontal_first(side_w, side_h, nw, nh)
            if pad and not horizontal_first:
                continue
            want = np.asarray(source.resize((nw, nh), resample))[top : top + ch, left : left + cw]
            got = compiled_window(
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


def compiled_window(
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
    """``pipeline.images._resample``, or the build of the installed package when this copy of the
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
            candidate = location / f"{_EXTENSION}{suffix}"
            if not candidate.is_file():
                continue
            spec = importlib.util.spec_from_file_location(f"{__package__}.{_EXTENSION}", candidate)
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
    """Folders that hold this package (``pipeline/images``): under what each import finder would
    pick for ``pipeline`` (an editable install's finder included), then under every ``sys.path`` entry."""
    top, *sub = __package__.split(".")
    found: list[Path] = []
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        try:
            spec = find_spec(top, None) if callable(find_spec) else None
        except Exception:
            continue
        for location in (spec.submodule_search_locations or []) if spec is not None else []:
            found.append(Path(location, *sub))
    found.extend(Path(entry or ".", top, *sub) for entry in sys.path)
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
    module = compiled_resampler(resample)
    if module is None:
        return "pillow"
    return "compiled-avx2" if getattr(module, "SIMD", 0) else "compiled"
