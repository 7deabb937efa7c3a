"""Preprocessing benchmark: our decode guard + :class:`Preprocessor` + :func:`normalize` against
what LLaVA runs (PIL decode + ``transformers.CLIPImageProcessor``), on one CPU core.

Also home of the *reference* implementation of LLaVA's ``process_images`` used by the parity
tests (:func:`reference_processor`, :func:`llava_reference`), so that the tests and the benchmark
compare against exactly the same thing. Needs ``scikit-image`` (a test dependency) for the photos.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from ..images.decode import decode_image
from ..images.native import resampler_name
from ..images.normalize import normalize
from ..images.passes import expand2square
from ..images.preprocess import Preprocessor
from ..images.spec import PreprocessSpec
from ..measure.images import bundled_photos, jpeg_bytes
from ..measure.options import BenchOptions
from ..model.config import setting
from ..model.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, AspectRatio

logger = logging.getLogger(__name__)

__all__ = [
    "PreprocessOptions",
    "bench_preprocess",
    "benchmark_photos",
    "llava_reference",
    "reference_processor",
]

BENCHMARK_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "stereo_motorcycle",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)
"""The scikit-image photographs the preprocessing benchmark measures on."""


@dataclass(frozen=True)
class PreprocessOptions(BenchOptions):
    """Options of ``bench preprocess``."""

    SECTION: ClassVar[str] = "bench.preprocess"

    size: int = setting(336, ge=1)
    """The tower's image size (shortest edge and crop): LLaVA-1.5's 336 by default."""
    aspect_ratio: AspectRatio = "pad"
    """LLaVA's ``image_aspect_ratio``: ``pad`` or ``crop`` (the paths ``CLIPImageProcessor`` takes)."""
    seconds: float = setting(3.0, gt=0)
    """CPU seconds for each of the two main paths, in alternating rounds of 0.5 s."""
    image_size: tuple[int, int] = setting((640, 480), ge=1)
    """(width, height) the photos are resized to before JPEG encoding."""
    batch_size: int = setting(16, ge=1)
    """Images per batch on both sides."""


def reference_processor(size: int = 336, crop_size: int | None = None) -> Any:
    """The CLIP image processor LLaVA uses, built in code (no download).

    ``CLIPImageProcessorPil(...)``: the PIL backend, which is what ``CLIPImageProcessor`` is
    without torchvision and what LLaVA was trained with (with torchvision installed,
    transformers 5's ``CLIPImageProcessor`` is its torchvision backend, whose bicubic resize
    differs from PIL's; without it, naming ``CLIPImageProcessor`` prints a fallback warning).
    """
    from transformers import CLIPImageProcessorPil

    crop = size if crop_size is None else crop_size
    kwargs = {
        "size": {"shortest_edge": size},
        "crop_size": {"height": crop, "width": crop},
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "do_convert_rgb": True,
    }
    return CLIPImageProcessorPil(**kwargs)


def llava_reference(images: Sequence[Image.Image], processor: Any, aspect_ratio: str) -> torch.Tensor:
    """LLaVA's ``process_images`` (llava/mm_utils.py) for ``pad`` and the default (non-pad) path:
    the baseline this benchmark times (the tests check the product against their own reference,
    ``tests/llava_reference.py``, so that a mistake here could not hide one in the product)."""
    if aspect_ratio == "pad":
        background = tuple(int(x * 255) for x in processor.image_mean)
        out = [
            processor.preprocess(expand2square(img, background), return_tensors="pt")["pixel_values"][0]
            for img in images
        ]
        return torch.stack(out)
    return processor(list(images), return_tensors="pt").pixel_values


def benchmark_photos(image_size: tuple[int, int] = (640, 480)) -> list[Image.Image]:
    """scikit-image's bundled colour photos (:data:`BENCHMARK_PHOTOS`), resized (bicubic) to ``image_size``
    (width, height)."""
    photos = bundled_photos(BENCHMARK_PHOTOS)
    if len(photos) != len(BENCHMARK_PHOTOS):  # pragma: no cover - scikit-image is a test dependency
        raise RuntimeError(
            f"the preprocessing benchmark needs scikit-image with its photos {', '.join(BENCHMARK_PHOTOS)} "
            f"(pip install scikit-image); {len(photos)} of them are here"
        )
    return [p.resize(image_size, Image.Resampling.BICUBIC) for p in photos]


def _rate(fn: Callable[[int], int], seconds: float) -> float:
    """Items per CPU-second of ``fn(i)`` (which returns how many items it handled), run for ``seconds``.

    Measured with the calling thread's CPU time (user + system), not wall-clock time: everything
    runs in this one thread (PIL, numpy, torch with 1 thread), so this is the throughput of one
    core, and it does not change when other processes compete for the machine.
    """
    fn(0)  # warm-up
    done, i = 0, 0
    start, wall = time.thread_time(), time.perf_counter()
    while True:
        done += fn(i)
        i += 1
        elapsed = time.thread_time() - start
        if elapsed >= seconds or time.perf_counter() - wall >= 10 * seconds:
            return done / max(elapsed, 1e-9)


def bench_preprocess(options: PreprocessOptions) -> dict[str, Any]:
    """Images/s on one core: ours (decode guard + ``Preprocessor.pixels`` + ``normalize``) against
    PIL decode + ``CLIPImageProcessor`` as LLaVA calls it, on JPEGs (quality 90) of real photos.

    Both sides produce float32 ``(B, 3, size, size)`` batches of ``batch_size`` images. The HF
    side decodes with ``Image.open(..., formats=["JPEG"]).convert("RGB")`` (the fastest way to
    call PIL, so the comparison does not flatter us). Rates are images per CPU-second of the one
    thread doing the work (see :func:`_rate`); ``seconds`` of CPU time go to each of the two main
    paths, in alternating rounds, and the median round is reported.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _bench(options)
    finally:
        torch.set_num_threads(previous_threads)


def _bench(options: PreprocessOptions) -> dict[str, Any]:
    size, aspect_ratio, seconds = options.size, options.aspect_ratio, options.seconds
    image_size, batch_size = options.image_size, options.batch_size
    processor = reference_processor(size)
    spec = PreprocessSpec.from_image_processor(processor, aspect_ratio=aspect_ratio)
    pre = Preprocessor(spec)
    photos = benchmark_photos(image_size)
    datas = [jpeg_bytes(p) for p in photos]
    n = len(datas)
    batches = [[datas[(b * batch_size + j) % n] for j in range(batch_size)] for b in range(n)]

    def pil_decode(data: bytes) -> Image.Image:
        return Image.open(io.BytesIO(data), formats=["JPEG"]).convert("RGB")

    def ours_batch(i: int) -> int:
        pixels = np.stack([pre(data).pixels for data in batches[i % n]])
        normalize(torch.from_numpy(pixels), spec)
        return batch_size

    def ours_uint8_batch(i: int) -> int:
        # What a decode task of the offline job does per image: the normalisation runs on the
        # encoder's device, so this is our whole per-core CPU cost.
        np.stack([pre(data).pixels for data in batches[i % n]])
        return batch_size

    def hf_batch(i: int) -> int:
        llava_reference([pil_decode(data) for data in batches[i % n]], processor, aspect_ratio)
        return batch_size

    decoded = [decode_image(d).image for d in datas]

    def decode_only(i: int) -> int:
        decode_image(datas[i % n])
        return 1

    def pil_decode_only(i: int) -> int:
        pil_decode(datas[i % n])
        return 1

    def pixels_only(i: int) -> int:
        pre.pixels(decoded[i % n])
        return 1

    # Parity on the same inputs.
    ours = normalize(torch.from_numpy(np.stack([pre(d).pixels for d in datas])), spec)
    ref = llava_reference([pil_decode(d) for d in datas], processor, aspect_ratio)
    max_abs_diff = float((ours - ref).abs().max()) if ours.shape == ref.shape else float("inf")

    # Alternate short rounds of both so that drifting machine load hits both alike.
    rounds = max(1, int(seconds / 0.5))
    ours_rates, uint8_rates, hf_rates = [], [], []
    for _ in range(rounds):
        ours_rates.append(_rate(ours_batch, seconds / rounds))
        uint8_rates.append(_rate(ours_uint8_batch, seconds / rounds))
        hf_rates.append(_rate(hf_batch, seconds / rounds))
    ours_rate = float(np.median(ours_rates))
    uint8_rate = float(np.median(uint8_rates))
    hf_rate = float(np.median(hf_rates))
    result = {
        "size": size,
        "aspect_ratio": aspect_ratio,
        "image_size": list(image_size),
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "ours_images_per_s": ours_rate,
        "hf_images_per_s": hf_rate,
        "speedup": ours_rate / hf_rate,
        "ours_uint8_images_per_s": uint8_rate,
        "speedup_uint8": uint8_rate / hf_rate,
        "max_abs_diff": max_abs_diff,
        "decode_only_images_per_s": _rate(decode_only, seconds / 3),
        "pil_decode_only_images_per_s": _rate(pil_decode_only, seconds / 3),
        "pixels_only_images_per_s": _rate(pixels_only, seconds / 3),
        "hf_backend": str(getattr(processor, "backend", "pil")),
        "resampler": resampler_name(spec.resample),
        "clock": "thread_cpu_time",
    }
    logger.info("preprocess benchmark: %s", result)
    return result
