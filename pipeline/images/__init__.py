"""Images: the decode guard and LLaVA's preprocessing, bytes → uint8 pixels → normalised tensors.

- :mod:`~pipeline.images.decode`: the decode guard (untrusted bytes → RGB image or a typed ``DecodeError``);
- :mod:`~pipeline.images.spec`: :class:`PreprocessSpec`, read from a saved image processor;
- :mod:`~pipeline.images.preprocess`: :class:`Preprocessor` (bytes → :class:`PreparedImage`);
- :mod:`~pipeline.images.passes` and :mod:`~pipeline.images.native`: the two exact resize routes
  (Pillow's passes; the compiled resampler ``_resample.c``);
- :mod:`~pipeline.images.normalize`: rescale + normalise on the encoder's device;
- :mod:`~pipeline.images.gpu_decode`: the opt-in nvJPEG route.

Names are resolved lazily, so that importing one module does not load the others (the decode
guard needs neither torch nor the compiled resampler).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DecodedImage": "decode",
    "decode_image": "decode",
    "to_rgb": "decode",
    "PreprocessSpec": "spec",
    "resize_output_size": "spec",
    "PreparedImage": "preprocess",
    "Preprocessor": "preprocess",
    "expand2square": "passes",
    "resampler_name": "native",
    "Normalizer": "normalize",
    "normalize": "normalize",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline.images' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return __all__
