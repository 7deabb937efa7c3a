"""Synthetic photo-like images for the benchmarks: scikit-image's bundled photographs, randomly cropped,
flipped and resized (smooth colour noise where scikit-image is not installed), as arrays, JPEG bytes or
JPEG files."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

__all__ = [
    "PHOTOS",
    "bundled_photos",
    "iter_photos",
    "jpeg_bytes",
    "photo_images",
    "photo_jpeg",
    "smooth_noise_images",
    "write_jpegs",
]

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
"""The scikit-image photographs the generated images are cut from."""


def smooth_noise_images(n: int, height: int, width: int, *, seed: int = 0) -> np.ndarray:
    """``(n, height, width, 3)`` uint8 photo-like images: low-frequency colour noise plus a little
    fine grain (so JPEG sizes and decode costs resemble photographs', unlike flat or white-noise
    images)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, height, width, 3), dtype=np.uint8)
    for i in range(n):
        coarse = rng.uniform(0, 255, size=(max(2, height // 32), max(2, width // 32), 3))
        ys = np.linspace(0, coarse.shape[0] - 1, height)
        xs = np.linspace(0, coarse.shape[1] - 1, width)
        y0 = np.floor(ys).astype(int).clip(0, coarse.shape[0] - 2)
        x0 = np.floor(xs).astype(int).clip(0, coarse.shape[1] - 2)
        fy = (ys - y0)[:, None, None]
        fx = (xs - x0)[None, :, None]
        top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
        bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
        img = top * (1 - fy) + bottom * fy + rng.normal(0, 6, size=(height, width, 3))
        out[i] = img.clip(0, 255).astype(np.uint8)
    return out


def bundled_photos(names: Sequence[str] = PHOTOS) -> list[Image.Image]:
    """scikit-image's bundled colour photographs of these names, as RGB images (for a name whose data is a
    stereo pair, its first image); those this install lacks are left out, and none without scikit-image."""
    try:
        from PIL import Image
        from skimage import data
    except ImportError:
        return []
    out = []
    for name in names:
        try:
            arr = getattr(data, name)()
        except Exception:  # a dataset file missing from this install: use the others
            logger.debug("scikit-image's %s is not available", name)
            continue
        arr = np.asarray(arr[0] if isinstance(arr, tuple) else arr)
        if arr.ndim == 3 and arr.shape[2] >= 3:
            out.append(Image.fromarray(np.ascontiguousarray(arr[..., :3])))
    return out


def iter_photos(n: int, height: int = 480, width: int = 640, *, seed: int = 0) -> Iterator[np.ndarray]:
    """``n`` HWC uint8 RGB photos of ``height × width``, one at a time: :data:`PHOTOS` randomly cropped,
    flipped and resized (smooth noise when scikit-image is not installed)."""
    from PIL import Image

    sources = bundled_photos()
    if not sources:
        yield from smooth_noise_images(n, height, width, seed=seed)
        return
    rng = np.random.default_rng(seed)
    for i in range(n):
        src = sources[i % len(sources)]
        w, h = src.size
        scale = rng.uniform(0.6, 1.0)
        cw, ch = max(16, int(w * scale)), max(16, int(h * scale))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = src.crop((x0, y0, x0 + cw, y0 + ch)).resize((width, height), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        yield np.asarray(img)


def photo_images(n: int, height: int = 480, width: int = 640, *, seed: int = 0) -> list[np.ndarray]:
    """The ``n`` photos of :func:`iter_photos`, as a list."""
    return list(iter_photos(n, height, width, seed=seed))


def jpeg_bytes(image: np.ndarray | Image.Image, *, quality: int = 90) -> bytes:
    """An HWC uint8 array (or a Pillow image) as JPEG bytes."""
    from PIL import Image

    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def photo_jpeg(width: int = 640, height: int = 480, *, seed: int = 0, quality: int = 90) -> bytes:
    """One photo of :func:`iter_photos` (the ``seed``'s first) as JPEG bytes."""
    return jpeg_bytes(next(iter_photos(1, height, width, seed=seed)), quality=quality)


def write_jpegs(images: Iterable[np.ndarray], folder: str | Path, *, quality: int = 90) -> list[Path]:
    """Write HWC uint8 images as ``img-000000.jpg``...; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(images):
        path = folder / f"img-{i:06d}.jpg"
        path.write_bytes(jpeg_bytes(arr, quality=quality))
        paths.append(path)
    return paths
