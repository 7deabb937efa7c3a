"""Optional batched GPU JPEG decode (nvJPEG through torchvision) with resize/crop on the device.

For when CPU decode is the bottleneck (a 640×480 JPEG: ~300 decodes/s per CPU core with PIL,
~10,000/s batched on an H100 with nvJPEG + a bicubic resize; docs/benchmarks.md).

:class:`BatchedJpegDecoder` takes encoded inputs and returns, per input, uint8 ``(3, H, W)``
pixels on the device (the same shape :class:`~pipeline.preprocess.Preprocessor` produces) or the
:class:`~pipeline.model.errors.DecodeError` the CPU decode guard raises for it:

- inputs that are plain baseline/progressive JPEGs within the guard's limits (size, pixel count,
  RGB or grey, no EXIF rotation) go to ``torchvision.io.decode_jpeg(device="cuda")`` in one batch,
  then :func:`prepare_on_device` (LLaVA's expand2square, shortest-edge resize with antialiased
  bicubic, center crop) on the GPU;
- everything else — other formats, CMYK, EXIF-rotated, anything over a guard limit, anything
  nvJPEG refuses — takes the exact CPU path (:class:`~pipeline.preprocess.Preprocessor`), which
  also produces the right error codes; so does everything when torchvision or CUDA is missing
  (torchvision cannot be installed beside this project's torch build, so this is the default).

Tolerance (GPU route vs the CPU reference, on uint8 pixels): the resize differs from PIL's by
rounding only (PIL rounds and clips to uint8 between its horizontal and vertical passes, torch
does not): measured on photos (tests/test_bench.py), mean |Δ| 0.07–0.18 level, 99.9 % of pixels
within 1 level, a few pixels (< 0.02 %) off by up to 9 levels at high-contrast edges when
upscaling;
nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by ±1–2 levels in smooth regions
and more at sharp chroma edges. Expect the features' relative error vs the CPU route to be of
the order of 1e-2 (the same order as bf16 compute); the route is therefore opt-in, not the
default, and never used by the parity tests. :data:`NVJPEG_TOLERANCE` is the bound the GPU tests
hold the whole route to (``tests/gpu/test_paths_cuda.py``, on real photos; the measured values
are recorded by ``scripts/gpu-check``).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..config import DecodeConfig
from ..model import resolve_device
from ..model.errors import DecodeError
from .preprocess import Preprocessor
from .spec import PreprocessSpec, resize_output_size

logger = logging.getLogger(__name__)

DecodeFn = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]
"""Batched decoder: 1-D uint8 CPU tensors of JPEG bytes → uint8 ``(3, H, W)`` RGB tensors on the device."""

NVJPEG_TOLERANCE: dict[str, float] = {
    "levels": 3,
    "fraction_within": 0.97,
    "mean_levels": 2.0,
    "features_rel_error": 5e-2,
}
"""The GPU route vs the exact CPU path, per image: at least ``fraction_within`` of the uint8 pixel
values within ``levels`` levels, mean |Δ| at most ``mean_levels``, and projected features (float32)
within ``features_rel_error`` relative error (‖Δ‖ / ‖ref‖)."""

_INTERPOLATE = {3: "bicubic", 2: "bilinear", 0: "nearest"}  # PIL filter id → torch mode (others: CPU route)
_EXIF_ORIENTATION = 0x0112


def load_decode_jpeg() -> DecodeFn | None:
    """torchvision's batched ``decode_jpeg`` (RGB output), or None when torchvision is missing."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        logger.debug("torchvision JPEG decode unavailable: %s", exc)
        return None

    def decode(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        out = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        return list(out) if isinstance(out, list | tuple) else [out]

    return decode


def gpu_decode_available(device: str | torch.device | None = "auto") -> bool:
    """True when ``device`` is a usable CUDA device and torchvision's GPU decode can be imported."""
    dev = resolve_device(device)
    return dev.type == "cuda" and torch.cuda.is_available() and load_decode_jpeg() is not None


def prepare_on_device(image: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 ``(3, H, W)`` RGB → uint8 ``(3, crop_h, crop_w)`` on the image's device, following
    :class:`~pipeline.preprocess.Preprocessor`: expand2square (``pad``), shortest-edge resize
    (antialiased; bicubic a=-0.5 like PIL), HF center crop (zero padding when smaller)."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected uint8 (3, H, W), got {image.dtype} {tuple(image.shape)}")
    mode = _INTERPOLATE.get(spec.resample)
    if mode is None:
        raise ValueError(f"resample filter {spec.resample} has no device equivalent")
    _, height, width = image.shape
    if spec.aspect_ratio == "pad" and width != height:
        side = max(width, height)
        fill = torch.tensor(spec.background, dtype=torch.uint8, device=image.device).view(3, 1, 1)
        canvas = fill.expand(3, side, side).clone()
        top, left = ((side - height) // 2, 0) if width > height else (0, (side - width) // 2)
        canvas[:, top : top + height, left : left + width] = image
        image, height, width = canvas, side, side
    new_h, new_w = resize_output_size(height, width, spec.size)
    if (new_h, new_w) != (height, width):
        x = image.unsqueeze(0).float()
        if mode == "nearest":
            x = F.interpolate(x, size=(new_h, new_w), mode="nearest-exact")
        else:
            x = F.interpolate(x, size=(new_h, new_w), mode=mode, antialias=True, align_corners=False)
        image = x.squeeze(0).round_().clamp_(0, 255).to(torch.uint8)
    if not spec.do_center_crop:
        return image.contiguous()
    return _center_crop(image, spec.crop_height, spec.crop_width)


def _center_crop(image: torch.Tensor, crop_h: int, crop_w: int) -> torch.Tensor:
    """``transformers``' center_crop on CHW, zero padding included (as the CPU path does)."""
    _, height, width = image.shape
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return image[:, top : top + crop_h, left : left + crop_w].contiguous()
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    padded = image.new_zeros((3, new_h, new_w))
    top_pad, left_pad = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    padded[:, top_pad : top_pad + height, left_pad : left_pad + width] = image
    top, left = top + top_pad, left + left_pad
    return padded[:, max(0, top) : max(0, top) + crop_h, max(0, left) : max(0, left) + crop_w].contiguous()


@dataclass(frozen=True)
class DevicePrepared:
    """An input ready for the encoder, already on the device."""

    pixels: torch.Tensor
    """uint8 ``(3, H, W)`` on the decoder's device."""
    width: int
    """Width of the decoded image."""
    height: int
    """Height of the decoded image."""
    format: str
    """Input format (``JPEG``, ...)."""
    route: str
    """``gpu`` (nvJPEG + device resize) or ``cpu`` (the exact CPU preprocessor)."""


class BatchedJpegDecoder:
    """Encoded images → :class:`DevicePrepared` (or the ``DecodeError``), GPU route when possible.

    Args:
        spec: the preprocessing to reproduce.
        decode_config: the decode guard's limits (applied on both routes).
        device: where the pixels end up (``auto``: cuda when available).
        decode_fn: a batched decoder (default: torchvision's ``decode_jpeg`` when importable).
            When given explicitly it is used on any device (tests run it on a CPU).
        use_gpu: False forces the CPU route; None (default) uses the GPU route when available.
    """

    def __init__(
        self,
        spec: PreprocessSpec,
        decode_config: DecodeConfig | None = None,
        device: str | torch.device | None = "auto",
        *,
        decode_fn: DecodeFn | None = None,
        use_gpu: bool | None = None,
    ) -> None:
        self.spec = spec
        self.decode_config = decode_config if decode_config is not None else DecodeConfig()
        self.preprocessor = Preprocessor(spec, self.decode_config)
        self.device = resolve_device(device)
        injected = decode_fn is not None
        self._decode_fn = (
            decode_fn if injected else (load_decode_jpeg() if self.device.type == "cuda" else None)
        )
        reasons = []
        if use_gpu is False:
            reasons.append("disabled")
        if self._decode_fn is None:
            reasons.append("torchvision decode_jpeg not available")
        if not injected and self.device.type != "cuda":
            reasons.append(f"device is {self.device}")
        if spec.resample not in _INTERPOLATE:
            reasons.append(f"resample filter {spec.resample} has no device equivalent")
        self.use_gpu = not reasons
        if use_gpu and not self.use_gpu:
            logger.warning(
                "GPU JPEG decode requested but unavailable (%s): decoding on the CPU", ", ".join(reasons)
            )
        self.stats = {"gpu": 0, "cpu": 0, "gpu_failed": 0}

    def __repr__(self) -> str:
        return f"BatchedJpegDecoder(device={self.device}, use_gpu={self.use_gpu})"

    def _gpu_eligible(self, data: bytes) -> tuple[int, int] | None:
        """(width, height) when ``data`` is a JPEG the GPU route can take, else None."""
        cfg = self.decode_config
        if len(data) > cfg.max_bytes or not data.startswith(b"\xff\xd8"):
            return None
        if "JPEG" not in cfg.allowed_formats and "MPO" not in cfg.allowed_formats:
            return None
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                if img.format not in ("JPEG", "MPO") or img.mode not in ("RGB", "L"):
                    return None
                width, height = img.size
                orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:
            return None
        if orientation not in (None, 1):
            return None
        if min(width, height) < cfg.min_side or width * height > cfg.max_image_pixels:
            return None
        return width, height

    def _cpu(self, data: bytes, name: str | None) -> DevicePrepared | DecodeError:
        try:
            prepared = self.preprocessor(data, name)
        except DecodeError as exc:
            return exc
        pixels = torch.from_numpy(prepared.pixels).to(self.device)
        self.stats["cpu"] += 1
        return DevicePrepared(pixels, prepared.width, prepared.height, prepared.format, "cpu")

    def _decode(self, datas: list[bytes]) -> list[torch.Tensor | None]:
        """Batched decode; on a batch failure, one by one (None where nvJPEG refuses an input)."""
        assert self._decode_fn is not None
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        try:
            out = self._decode_fn(tensors, self.device)
            if len(out) == len(tensors):
                return list(out)
        except Exception as exc:
            logger.debug("batched GPU decode failed (%s); decoding one by one", exc)
        single: list[torch.Tensor | None] = []
        for t in tensors:
            try:
                single.append(self._decode_fn([t], self.device)[0])
            except Exception as exc:
                logger.debug("GPU decode refused an input (%s); CPU route", exc)
                single.append(None)
        return single

    def __call__(
        self, datas: Sequence[bytes], names: Sequence[str | None] | None = None
    ) -> list[DevicePrepared | DecodeError]:
        """One result per input, in order: pixels on the device, or the input's DecodeError."""
        names = list(names) if names is not None else [None] * len(datas)
        results: list[DevicePrepared | DecodeError | None] = [None] * len(datas)
        gpu: list[tuple[int, int, int]] = []
        if self.use_gpu:
            for i, data in enumerate(datas):
                size = self._gpu_eligible(bytes(data))
                if size is not None:
                    gpu.append((i, *size))
        if gpu:
            decoded = self._decode([bytes(datas[i]) for i, _, _ in gpu])
            for (i, width, height), image in zip(gpu, decoded, strict=True):
                if image is None or tuple(image.shape) != (3, height, width):
                    self.stats["gpu_failed"] += 1
                    continue
                results[i] = DevicePrepared(prepare_on_device(image, self.spec), width, height, "JPEG", "gpu")
                self.stats["gpu"] += 1
        for i, data in enumerate(datas):
            if results[i] is None:
                results[i] = self._cpu(bytes(data), names[i])
        return results  # type: ignore[return-value]

    @staticmethod
    def stack(results: Sequence[DevicePrepared | DecodeError]) -> tuple[torch.Tensor | None, list[int]]:
        """The successful results as one ``(B, 3, H, W)`` batch, and their indices in ``results``."""
        ok = [i for i, r in enumerate(results) if isinstance(r, DevicePrepared)]
        if not ok:
            return None, []
        return torch.stack([results[i].pixels for i in ok]), ok  # type: ignore[union-attr]


def describe(device: str | torch.device | None = "auto") -> dict[str, Any]:
    """Where JPEGs would be decoded on ``device`` (for logs and benchmark records)."""
    dev = resolve_device(device)
    return {
        "device": str(dev),
        "gpu_decode": gpu_decode_available(dev),
        "torchvision": load_decode_jpeg() is not None,
    }
