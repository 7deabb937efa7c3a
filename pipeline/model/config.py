"""Model settings: which checkpoint, which layer, which projector, which dtype and device.

Pure dataclasses (no torch import needed to build one), so the CLI and the job driver can
resolve and fingerprint a configuration without touching the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from .errors import ConfigError

SELECT_FEATURES = ("patch", "cls_patch")
DTYPES = ("auto", "float32", "float16", "bfloat16")
_MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")


def validate_projector_type(projector_type: str) -> None:
    """Raise ConfigError (a ValueError) unless ``projector_type`` is linear, mlp{N}x_gelu (N >= 1) or identity."""
    if projector_type in ("linear", "identity"):
        return
    match = _MLP_GELU.match(projector_type)
    if match and int(match.group(1)) >= 1:
        return
    raise ConfigError(
        f"Unknown projector type: {projector_type!r}; valid types are 'linear', 'identity' and "
        "'mlp{N}x_gelu' for N >= 1 (e.g. 'mlp2x_gelu')"
    )


@dataclass(frozen=True)
class ModelConfig:
    """Which encoder to build. ``None`` fields are read from the checkpoint."""

    checkpoint: str | None = None
    """LLaVA or llava-hf checkpoint: a local directory or a model id in the local HF cache."""
    vision_tower: str | None = None
    """Bare CLIP vision model (directory or id); overrides the checkpoint's tower when both are set."""
    projector_weights: str | None = None
    """Standalone projector weights (``mm_projector.bin`` / ``.safetensors``) for a bare CLIP tower."""
    select_layer: int | None = None
    """Hidden layer to take features from (``mm_vision_select_layer``; LLaVA-1.5 uses -2)."""
    select_feature: str | None = None
    """``patch`` drops the CLS token, ``cls_patch`` keeps it (``mm_vision_select_feature``)."""
    projector_type: str | None = None
    """``linear``, ``mlp{N}x_gelu`` or ``identity`` (``mm_projector_type``)."""
    mm_hidden_size: int | None = None
    """Projector input width; defaults to the tower's hidden size."""
    hidden_size: int | None = None
    """Projector output width (the language model's hidden size)."""
    image_aspect_ratio: str | None = None
    """``pad`` (expand to square with the mean colour), ``square`` or ``crop`` (CLIP resize + center crop)."""
    dtype: str = "auto"
    """Compute dtype: ``auto`` (bfloat16 on a GPU, float32 on a CPU), float32, float16 or bfloat16."""
    device: str = "auto"
    """``auto`` (cuda when available, else cpu), ``cpu``, ``cuda`` or ``cuda:N``."""
    attn_implementation: str = "sdpa"
    """Attention kernel of the CLIP tower (``sdpa`` or ``eager``)."""
    local_files_only: bool = True
    """Resolve model ids from the local HF cache only; never reach a hub unless this is False."""
    fuse_qkv: bool = True
    """Fast path: one Linear for q/k/v per layer (weights concatenated at load; same numbers, one GEMM)."""
    fold_quick_gelu: bool = True
    """Fast path: fold quick_gelu's 1.702 into fc1/fc2 so the activation is one SiLU kernel (float32 |Δ| ≤ 1e-5)."""
    compile: bool = False
    """``torch.compile`` the tower + projector with static shapes: one graph per batch bucket, built at warm-up."""
    compile_mode: str | None = None
    """``torch.compile`` mode: None (default), ``reduce-overhead``, ``max-autotune``, ``max-autotune-no-cudagraphs``."""
    batch_buckets: tuple[int, ...] = ()
    """Compiled batch sizes (a batch is padded up to a bucket, results sliced); empty: derived from the batch sizes."""
    overlap_chunks: int = 2
    """On a GPU, a single-batch ``encode_pixels`` call runs as this many sub-batches so copies overlap compute (1: off)."""
    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    """Unrecognised keys kept from the source (not part of the fingerprint)."""

    def __post_init__(self) -> None:
        if self.select_feature is not None and self.select_feature not in SELECT_FEATURES:
            raise ConfigError(
                f"Unexpected select feature: {self.select_feature!r}; valid values are {SELECT_FEATURES}"
            )
        if self.projector_type is not None:
            validate_projector_type(self.projector_type)
        if self.dtype not in DTYPES:
            raise ConfigError(f"Unknown dtype {self.dtype!r}; valid values are {DTYPES}")
        if self.image_aspect_ratio is not None and self.image_aspect_ratio not in ("pad", "square", "crop"):
            raise ConfigError(
                f"Unknown image_aspect_ratio {self.image_aspect_ratio!r}; valid values are 'pad', 'square', 'crop'"
            )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name != "extra")
