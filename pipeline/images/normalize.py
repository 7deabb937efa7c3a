"""Rescale and normalise uint8 pixels on the encoder's device: ``(x * rescale_factor - mean) / std``.

The last step of the CLIP processor, run where the model runs (4x less data to move than float32
pixels). :class:`Normalizer` holds its constants on one device, built once by its owner (the
encoder); :func:`normalize` is the one-off form.
"""

from __future__ import annotations

import numpy as np
import torch

from .spec import PreprocessSpec

__all__ = ["Normalizer", "normalize"]


class Normalizer:
    """``(x * rescale_factor - mean) / std`` of uint8 ``(B, 3, H, W)`` or ``(3, H, W)`` pixels on ``device``.

    Computed in float32 (the same arithmetic as ``CLIPImageProcessor``: rescale, then subtract the
    mean and divide by the std, per channel), then cast to the requested dtype.
    """

    def __init__(self, spec: PreprocessSpec, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        self.device = torch.device(device)
        self._scale = torch.tensor(spec.rescale_factor, dtype=torch.float32, device=self.device)
        self._mean = torch.tensor(spec.image_mean, dtype=torch.float32, device=self.device).view(3, 1, 1)
        self._std = torch.tensor(spec.image_std, dtype=torch.float32, device=self.device).view(3, 1, 1)

    def __call__(self, pixels_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if pixels_uint8.dtype != torch.uint8:
            raise TypeError(f"normalize expects uint8 pixels, got {pixels_uint8.dtype}")
        if pixels_uint8.dim() not in (3, 4) or pixels_uint8.shape[-3] != 3:
            raise ValueError(f"normalize expects (B, 3, H, W) or (3, H, W), got {tuple(pixels_uint8.shape)}")
        if pixels_uint8.device != self.device:
            raise ValueError(f"pixels are on {pixels_uint8.device}, this normalizer on {self.device}")
        x = pixels_uint8.to(torch.float32)
        x.mul_(self._scale).sub_(self._mean).div_(self._std)
        return x if dtype == torch.float32 else x.to(dtype)


def normalize(
    pixels_uint8: torch.Tensor | np.ndarray,
    spec: PreprocessSpec,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """:class:`Normalizer` on the pixels' own device, once (a numpy array is converted, on the CPU)."""
    if isinstance(pixels_uint8, np.ndarray):
        pixels_uint8 = torch.from_numpy(np.ascontiguousarray(pixels_uint8))
    return Normalizer(spec, pixels_uint8.device)(pixels_uint8, dtype)
