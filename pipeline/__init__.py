"""llava-features: LLaVA vision features (CLIP vision tower + projector) at scale, on Ray.

Layers (imports only go downward):

- ``pipeline.model``: pure torch + transformers (tower, projector, checkpoint loading, errors).
- ``pipeline``: decode guard, preprocessing, the shared encoder, storage, the feature table, the Ray Data job.
- ``deployments``: the Ray Serve application.

This ``__init__`` imports nothing heavy: ``read_features`` is resolved lazily so that importing
``pipeline.model`` never pulls in pyarrow, PIL or ray.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "read_features"]


def __getattr__(name: str) -> Any:
    if name == "read_features":
        from .table import read_features

        return read_features
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
