"""The model core: pure torch + transformers (never imports ray, PIL or pyarrow).

``CLIPVisionTower`` and ``build_vision_projector`` follow LLaVA's own names and semantics;
``resolve_model``/``load_model_modules`` read the supported checkpoint layouts.
"""

from .checkpoint import FORMATS, ResolvedModel, load_model_modules, resolve_model
from .config import ModelConfig
from .errors import ErrorCode, LlavaFeaturesError
from .projector import IdentityMap, build_vision_projector
from .tower import CLIPVisionTower, resolve_device, resolve_dtype

__all__ = [
    "FORMATS",
    "CLIPVisionTower",
    "ErrorCode",
    "IdentityMap",
    "LlavaFeaturesError",
    "ModelConfig",
    "ResolvedModel",
    "build_vision_projector",
    "load_model_modules",
    "resolve_device",
    "resolve_dtype",
    "resolve_model",
]
