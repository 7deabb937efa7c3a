"""Random-weight models of a benchmark's architecture (throughput does not depend on weight values): the
modules, their resolved description, and a config whose model loads from disk."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .arch import BenchArch, bench_arch

if TYPE_CHECKING:
    from ..config import Config
    from ..model import ResolvedModel

__all__ = ["bench_resolved", "loadable_config", "random_modules"]


def bench_resolved(arch: BenchArch) -> ResolvedModel:
    """A ResolvedModel of ``arch`` with placeholder digests (random weights, nothing on disk)."""
    from ..model import ResolvedModel

    return ResolvedModel(
        format="clip",
        checkpoint=None,
        vision_tower=f"random:{arch.name}",
        tower_revision=None,
        tower_sha256="random-weights",
        select_layer=arch.select_layer,
        select_feature=arch.select_feature,
        projector_type=arch.projector_type,
        mm_hidden_size=arch.mm_hidden_size,
        hidden_size=arch.hidden_size,
        projector_sha256="random-weights",
        projector_weights=None,
        image_aspect_ratio=arch.image_aspect_ratio,
        image_processor=dict(arch.image_processor),
        vision_config=dict(arch.vision_config),
        image_size=arch.image_size,
        patch_size=arch.patch_size,
    )


def random_modules(arch: BenchArch, *, seed: int = 0, attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """(CLIPVisionModel, projector) of ``arch`` with random weights, float32 on the CPU."""
    from ..model.tiny import random_clip

    return random_clip(
        arch.vision_config,
        projector_type=arch.projector_type,
        mm_hidden_size=arch.mm_hidden_size,
        hidden_size=arch.hidden_size,
        seed=seed,
        attn_implementation=attn_implementation,
    )


def loadable_config(config: Config | None, *, tiny: bool, workdir: str | Path) -> Config:
    """A Config whose model loads from disk: the given one when its model is available locally,
    else the same settings on a random-weight checkpoint of its architecture written under
    ``workdir`` (``--tiny``: the tiny LLaVA checkpoint). Job/serve/decode settings are kept."""
    from ..config import Config as ConfigCls
    from ..model import resolve_model
    from ..model.errors import CheckpointError
    from ..model.tiny import make_tiny_model, write_clip_checkpoint

    base = config or ConfigCls()
    workdir = Path(workdir)
    if tiny:
        path = make_tiny_model(workdir / "tiny-llava", "llava")
        model = replace(
            base.model,
            checkpoint=str(path),
            vision_tower=None,
            projector_weights=None,
            select_layer=None,
            select_feature=None,
            projector_type=None,
            mm_hidden_size=None,
            hidden_size=None,
            image_aspect_ratio=None,
        )
        return replace(base, model=model)
    try:
        resolve_model(base.model)
        return base
    except CheckpointError:
        pass
    arch = bench_arch(base)
    path = write_clip_checkpoint(workdir / "random-checkpoint", *random_modules(arch)).resolve()
    projector = path / "mm_projector.bin"
    model = replace(
        base.model,
        checkpoint=None,
        vision_tower=str(path),
        select_layer=arch.select_layer,
        select_feature=arch.select_feature,
        projector_type=arch.projector_type,
        mm_hidden_size=arch.mm_hidden_size,
        hidden_size=arch.hidden_size,
        image_aspect_ratio=arch.image_aspect_ratio,
        projector_weights=str(projector) if projector.exists() else None,
    )
    return replace(base, model=model)
