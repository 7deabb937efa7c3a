"""Rescale and normalise uint8 pixels on the encoder's device, bit for bit as the HF processor does.

transformers' ``CLIPImageProcessor`` (and the llava-hf ones) compute, per pixel: ``rescale``
(``float64(u8) * rescale_factor``, then cast to float32), then ``normalize`` in float32
(``(x - float32(mean)) / float32(std)``). A uint8 channel has 256 values, so the result is a
table: :class:`Normalizer` computes each channel's 256 entries exactly that way (numpy, on the
host, once) and normalisation on the device is a table lookup — the processor's numbers to the
last bit (float32 arithmetic on the device, e.g. a multiply by float32(1/255), rounds 126 of the
256 values differently) and one gather instead of three element-wise passes. The table is kept in
each compute dtype that is asked for, so the lookup writes the tower's input directly.
"""

from __future__ import annotations

import numpy as np
import torch

from .spec import PreprocessSpec

__all__ = ["Normalizer", "normalization_table", "normalize"]


def normalization_table(spec: PreprocessSpec) -> np.ndarray:
    """``(3, 256)`` float32: the normalised value of every uint8 value of each channel, computed as the
    HF processor computes it (rescale in float64 then cast, normalise in float32)."""
    values = np.arange(256, dtype=np.uint8)
    rescaled = (values.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    mean = np.asarray(spec.image_mean, dtype=np.float32)[:, None]
    std = np.asarray(spec.image_std, dtype=np.float32)[:, None]
    return ((rescaled[None, :] - mean) / std).astype(np.float32)


class Normalizer:
    """The processor's rescale + normalise of uint8 ``(B, 3, H, W)`` or ``(3, H, W)`` pixels on ``device``,
    as a per-channel table lookup (:func:`normalization_table`), in the dtype asked for."""

    def __init__(self, spec: PreprocessSpec, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        self.device = torch.device(device)
        self._table32 = torch.from_numpy(normalization_table(spec)).to(self.device)
        self._tables: dict[torch.dtype, torch.Tensor] = {torch.float32: self._table32}

    def _table(self, dtype: torch.dtype) -> torch.Tensor:
        table = self._tables.get(dtype)
        if table is None:  # the float32 values rounded once, as casting the float32 result would
            table = self._tables[dtype] = self._table32.to(dtype)
        return table

    def __call__(self, pixels_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if pixels_uint8.dtype != torch.uint8:
            raise TypeError(f"normalize expects uint8 pixels, got {pixels_uint8.dtype}")
        if pixels_uint8.dim() not in (3, 4) or pixels_uint8.shape[-3] != 3:
            raise ValueError(f"normalize expects (B, 3, H, W) or (3, H, W), got {tuple(pixels_uint8.shape)}")
        if pixels_uint8.device != self.device:
            raise ValueError(f"pixels are on {pixels_uint8.device}, this normalizer on {self.device}")
        table = self._table(dtype)
        out = torch.empty(pixels_uint8.shape, dtype=dtype, device=self.device)
        for channel in range(3):
            index = pixels_uint8.select(-3, channel).to(torch.int32)
            out.select(-3, channel).copy_(table[channel][index])
        return out


def normalize(
    pixels_uint8: torch.Tensor | np.ndarray,
    spec: PreprocessSpec,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """:class:`Normalizer` on the pixels' own device, once (a numpy array is converted, on the CPU)."""
    if isinstance(pixels_uint8, np.ndarray):
        pixels_uint8 = torch.from_numpy(np.ascontiguousarray(pixels_uint8))
    return Normalizer(spec, pixels_uint8.device)(pixels_uint8, dtype)
