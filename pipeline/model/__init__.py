"""The model core: pure torch + transformers (never imports ray, PIL or pyarrow).

``CLIPVisionTower`` and ``build_vision_projector`` follow LLaVA's own names and semantics;
``resolve_model``/``load_model_modules`` read the supported checkpoint layouts (``checkpoints/``).

Names are resolved lazily so that ``pipeline.model.errors`` and ``pipeline.model.config`` (pure
Python) can be imported by CPU-only workers without loading torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LAYOUTS": "checkpoints",
    "ResolvedModel": "checkpoints",
    "load_model_modules": "checkpoints",
    "load_newline": "checkpoints",
    "resolve_model": "checkpoints",
    "ModelConfig": "config",
    "ErrorCode": "errors",
    "LlavaFeaturesError": "errors",
    "IdentityMap": "projector",
    "build_vision_projector": "projector",
    "CLIPVisionTower": "tower",
    "resolve_device": "tower",
    "resolve_dtype": "tower",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline.model' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return __all__
