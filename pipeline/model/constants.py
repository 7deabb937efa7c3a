"""The model layer's vocabulary: every value set, pattern and constant of the encoder, defined once.

Pure Python (no torch): the config sections, the CLI and the checkpoint readers validate against
these names, and the modules that compute with them import them from here.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from .errors import ConfigError

SelectFeature = Literal["patch", "cls_patch"]
"""``mm_vision_select_feature``: ``patch`` drops the CLS token, ``cls_patch`` keeps it."""
SELECT_FEATURES: tuple[str, ...] = get_args(SelectFeature)

AspectRatio = Literal["pad", "square", "crop"]
"""LLaVA's ``image_aspect_ratio``: ``pad`` is ``expand2square`` then the CLIP processor; ``square`` and
``crop`` are the plain CLIP processor (shortest-edge resize + center crop)."""
ASPECT_RATIOS: tuple[str, ...] = get_args(AspectRatio)

ComputeDtype = Literal["auto", "float32", "float16", "bfloat16"]
"""Compute dtype of the tower and projector; ``auto`` is bfloat16 on a GPU, float32 on a CPU."""
COMPUTE_DTYPES: tuple[str, ...] = get_args(ComputeDtype)
TORCH_DTYPE_NAMES: tuple[str, ...] = ("float32", "float16", "bfloat16")
"""The concrete floating dtypes (``torch.<name>``) of computation and storage."""

AttnImplementation = Literal["sdpa", "eager"]
"""Attention kernel of the CLIP tower."""

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
"""``torch.compile`` modes the encoder can use."""
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
CUDAGRAPH_COMPILE_MODES: frozenset[str] = frozenset({"reduce-overhead", "max-autotune"})
"""Compile modes that replay CUDA graphs (their outputs must be copied before the next replay)."""

CheckpointLayout = Literal["llava", "llava-hf", "clip"]
"""Checkpoint layouts :func:`pipeline.model.resolve_model` reads."""
CHECKPOINT_LAYOUTS: tuple[str, ...] = get_args(CheckpointLayout)
WEIGHT_FORMATS: tuple[str, ...] = ("safetensors", "bin")
"""How weights are stored: ``model*.safetensors`` (preferred) or ``pytorch_model*.bin`` (``torch.load(weights_only=True)``)."""

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel mean of OpenAI's CLIP image processor (pixels in 0..1)."""
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel standard deviation of OpenAI's CLIP image processor."""

QUICK_GELU_ALPHA = 1.702
"""``quick_gelu(z) = z * sigmoid(1.702 z)`` (CLIP's activation)."""

_MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")
PROJECTOR_TYPES_TEXT = "'linear', 'identity' and 'mlp{N}x_gelu' for N >= 1 (e.g. 'mlp2x_gelu')"


def projector_depth(projector_type: str) -> int:
    """Number of linear layers of a projector type: 1 for ``linear``, N for ``mlp{N}x_gelu``, 0 for
    ``identity``. Raises :class:`ConfigError` (a ``ValueError``) for any other type, naming the valid ones."""
    if projector_type == "identity":
        return 0
    if projector_type == "linear":
        return 1
    match = _MLP_GELU.match(projector_type) if isinstance(projector_type, str) else None
    if match and int(match.group(1)) >= 1:
        return int(match.group(1))
    raise ConfigError(f"Unknown projector type: {projector_type!r}; valid types are {PROJECTOR_TYPES_TEXT}")


def validate_projector_type(projector_type: str) -> None:
    """Raise :class:`ConfigError` unless ``projector_type`` is linear, mlp{N}x_gelu (N >= 1) or identity."""
    projector_depth(projector_type)


def hidden_state_index(select_layer: int, num_layers: int) -> int:
    """Index into ``hidden_states`` (0 = the embeddings, ``i`` = the output of layer ``i - 1``) of
    ``select_layer`` (negative counts from the end, as Python indexing does) for a tower of
    ``num_layers`` encoder layers: also the number of layers that hidden state depends on.

    Raises :class:`ConfigError` naming the valid range when the layer does not exist.
    """
    index = select_layer if select_layer >= 0 else num_layers + 1 + select_layer
    if not 0 <= index <= num_layers:
        raise ConfigError(
            f"select_layer={select_layer} is out of range for a tower with {num_layers} layers "
            f"(valid: {-(num_layers + 1)}..{num_layers})"
        )
    return index
