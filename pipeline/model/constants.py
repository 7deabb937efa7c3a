"""The model layer's vocabulary: every value set, pattern and constant of the encoder, defined once.

Pure Python (no torch): the config sections, the CLI and the checkpoint readers validate against
these names, and the modules that compute with them import them from here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal, get_args

from .errors import ConfigError

SelectFeature = Literal["patch", "cls_patch"]
"""``mm_vision_select_feature``: ``patch`` drops the CLS token, ``cls_patch`` keeps it."""
SELECT_FEATURES: tuple[str, ...] = get_args(SelectFeature)

AspectRatio = Literal["pad", "square", "crop", "anyres"]
"""LLaVA's ``image_aspect_ratio``: ``pad`` is ``expand2square`` then the CLIP processor; ``square`` and
``crop`` are the plain CLIP processor (shortest-edge resize + center crop); ``anyres`` is LLaVA-NeXT's
tiling (``process_anyres_image``: a base image plus tiles of the best grid pinpoint)."""
ASPECT_RATIOS: tuple[str, ...] = get_args(AspectRatio)
_ANYRES_MAX = re.compile(r"^anyres_max_(\d+)$")

PatchMergeType = Literal["flat", "spatial", "spatial_unpad"]
"""LLaVA-NeXT's ``mm_patch_merge_type``: how an anyres image's tile features become one sequence."""
PATCH_MERGE_TYPES: tuple[str, ...] = get_args(PatchMergeType)

UnpadRounding = Literal["floor", "round"]
"""How the kept rows/columns of ``unpad_image`` are counted: LLaVA's ``int(side * scale)`` (``floor``) or
transformers' ``int(round(side * scale, 7))`` (``round``); they differ when a float product falls just
below an integer."""

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
TINY_FORMATS: tuple[str, ...] = (*CHECKPOINT_LAYOUTS, "llava-next", "llava-next-hf")
"""Tiny random-weight checkpoints ``make-tiny-model`` writes: every layout, and LLaVA-NeXT (anyres) in both
of its layouts."""
WEIGHT_FORMATS: tuple[str, ...] = ("safetensors", "bin")
"""How weights are stored: ``model*.safetensors`` (preferred) or ``pytorch_model*.bin`` (``torch.load(weights_only=True)``)."""

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
"""Where a checkpoint keeps its image processor's settings: transformers 4 writes them flat into
``preprocessor_config.json``; transformers 5's processors write ``processor_config.json`` only,
with the image processor's settings nested under ``"image_processor"``."""


def image_processor_settings(saved: Mapping[str, Any]) -> dict[str, Any]:
    """The image processor's settings of a saved processor file (either form of :data:`PROCESSOR_FILES`)."""
    nested = saved.get("image_processor")
    return dict(nested) if isinstance(nested, Mapping) else dict(saved)


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


def parse_aspect_ratio(value: str) -> tuple[str, int | None]:
    """``(mode, anyres_max)`` of an ``image_aspect_ratio`` value: one of :data:`ASPECT_RATIOS`, or
    LLaVA-NeXT's ``anyres_max_N`` (``("anyres", N)``). Raises :class:`ConfigError` for anything else."""
    if value in ASPECT_RATIOS:
        return value, None
    match = _ANYRES_MAX.match(value) if isinstance(value, str) else None
    if match and int(match.group(1)) >= 1:
        return "anyres", int(match.group(1))
    raise ConfigError(
        f"image_aspect_ratio {value!r} is not supported; supported: {', '.join(ASPECT_RATIOS)} and anyres_max_N"
    )


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
