"""What encoding one image gives: :class:`EncodeResult` (plain data: it may cross a deployment handle)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.model.errors import ErrorCode, LlavaFeaturesError

from . import http


@dataclass
class EncodeResult:
    """What encoding one image gives (plain data: it may cross a deployment handle)."""

    ok: bool
    image_id: str | None
    fingerprint: str
    features: np.ndarray | None = None
    """(tokens, dim) in ``dtype`` (bfloat16 as its uint16 bit pattern); anyres: the image's own shape
    (``tiles`` [1 + tiles, tokens, dim], ``packed`` [tokens, dim]); None for ``want="pooled"``."""
    dtype: str = "float32"
    """The encoder's returned dtype of ``features`` (``encoder.output_dtype``)."""
    pooled: np.ndarray | None = None
    """(dim,) float32 mean over tokens; None for ``want="features"``."""
    width: int | None = None
    height: int | None = None
    error_code: str | None = None
    error_message: str | None = None

    def raise_for_error(self) -> None:
        if not self.ok:
            raise LlavaFeaturesError(
                self.error_message or "error", code=ErrorCode(self.error_code or "internal")
            )

    def response_array(self, pooled: bool) -> np.ndarray:
        """What a response carries: the pooled float32 vector, or the features (bfloat16 widened to float32)."""
        if pooled:
            assert self.pooled is not None
            return self.pooled
        assert self.features is not None
        return http.response_array(self.features, self.dtype)

    def item(self, pooled: bool) -> dict[str, Any]:
        """The per-item JSON of ``/v1/features:batch``."""
        if not self.ok:
            return {
                "ok": False,
                "image_id": self.image_id,
                "error_code": self.error_code,
                "error_message": self.error_message,
            }
        return {
            "ok": True,
            "image_id": self.image_id,
            "width": self.width,
            "height": self.height,
            **http.array_payload(self.response_array(pooled)),
        }
