"""Helpers of the GPU tests: the architectures, random-weight encoders on a device, comparisons.

The encoders are the benchmarks' (:func:`pipeline.bench.encoder.make_bench_encoder` on
:func:`pipeline.bench.models.random_modules` of :func:`~pipeline.bench.arch.bench_arch`), so the
tests and ``bench encoder`` build exactly the same thing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.bench.arch import BenchArch, bench_arch
from pipeline.bench.encoder import make_bench_encoder
from pipeline.config import Config, load_config
from pipeline.encoder import FeatureEncoder
from pipeline.measure.images import smooth_noise_images

REPO = Path(__file__).resolve().parents[2]
VIT_CONFIG = REPO / "configs" / "llava-v1.5-7b.yaml"

FP32_MAX_ABS = 1e-4
"""CUDA float32 (TF32 off) vs the CPU float32 reference: largest absolute difference allowed."""
BF16_REL_ERROR = 2e-2
"""CUDA bfloat16 vs the CPU float32 reference: largest relative error ‖Δ‖ / ‖ref‖ allowed."""


def vit_config() -> Config:
    """``configs/llava-v1.5-7b.yaml``: LLaVA-1.5-7B's vision path (CLIP ViT-L/14-336 + mlp2x_gelu)."""
    return load_config(VIT_CONFIG)


def vit_arch() -> BenchArch:
    """The real ViT-L/14-336 architecture (random weights: the checkpoint is not needed)."""
    return bench_arch(vit_config())


def photo_pixels(n: int, arch: BenchArch, seed: int = 1) -> torch.Tensor:
    """``n`` photo-like uint8 ``(3, S, S)`` images at the architecture's input size (host tensor)."""
    size = arch.image_size
    images = smooth_noise_images(n, size, size, seed=seed)
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def encoder_on(
    arch: BenchArch,
    master: tuple[Any, Any],
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    variant: str = "fast",
    batch_sizes: tuple[int, ...] = (8,),
    compile_mode: str | None = None,
    config: Config | None = None,
    **options: Any,
) -> FeatureEncoder:
    """A FeatureEncoder of ``arch`` with copies of the random ``master`` modules on ``device``."""
    return make_bench_encoder(
        config or Config(),
        arch,
        master,
        device=torch.device(device),
        dtype=dtype,
        variant=variant,
        batch_sizes=batch_sizes,
        compile_mode=compile_mode,
        **options,
    )


def max_abs(got: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    """Largest absolute difference, in float32 on the host."""
    a, b = (
        torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x).detach().cpu().float()
        for x in (got, ref)
    )
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return float((a - b).abs().max())


def rel_error(got: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    """‖got − ref‖ / ‖ref‖, in float32 on the host."""
    a, b = (
        torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x).detach().cpu().float()
        for x in (got, ref)
    )
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return float((a - b).norm() / b.norm())


def release(*encoders: FeatureEncoder) -> None:
    """Close encoders and return their device memory."""
    for encoder in encoders:
        encoder.close()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
