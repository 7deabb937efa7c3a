"""The work per image of the encoder (FLOPs) and the device's matmul ceiling it is measured against."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..measure.timing import time_callable
from ..model.constants import hidden_state_index, projector_depth

if TYPE_CHECKING:
    import torch

__all__ = ["encoder_flops", "matmul_ceiling", "projector_flops"]


def projector_flops(projector_type: str, tokens: int, mm_hidden_size: int, hidden_size: int | None) -> float:
    """Multiply-adds ×2 of ``linear``, ``mlp{N}x_gelu`` or ``identity`` on ``tokens`` rows."""
    depth = projector_depth(projector_type)
    if depth == 0:
        return 0.0
    if hidden_size is None:
        raise ValueError(f"projector {projector_type!r} needs hidden_size")
    return (
        2.0 * tokens * mm_hidden_size * hidden_size + (depth - 1) * 2.0 * tokens * hidden_size * hidden_size
    )


def encoder_flops(
    vision_config: Mapping[str, Any],
    *,
    select_layer: int,
    select_feature: str,
    projector_type: str,
    mm_hidden_size: int | None = None,
    hidden_size: int | None = None,
) -> dict[str, Any]:
    """FLOPs per image (2 per multiply-add) of the encoder as it runs on the fast path.

    Patch embedding (a ``p×p`` stride-``p`` conv), then per encoder layer up to the selected one:
    QKV projection, attention scores ``QKᵀ``, ``attn·V``, output projection and the two MLP
    GEMMs (T = patches + 1 CLS tokens); then the projector on the selected tokens. Element-wise
    work (norms, softmax, activations, residuals) is not counted. For CLIP ViT-L/14-336, layer
    -2 (23 layers) and ``mlp2x_gelu`` 1024→4096: 390.2 GFLOP (the H100 anchor's 389.5 in
    docs/benchmarks.md leaves out the patch embedding, 0.69 GFLOP).
    """
    d = int(vision_config["hidden_size"])
    inter = int(vision_config["intermediate_size"])
    num_layers = int(vision_config["num_hidden_layers"])
    patch = int(vision_config["patch_size"])
    image = int(vision_config["image_size"])
    channels = int(vision_config.get("num_channels", 3))
    patches = (image // patch) ** 2
    t = patches + 1
    used = hidden_state_index(select_layer, num_layers)
    per_layer = {
        "qkv": 2.0 * t * d * 3 * d,
        "scores": 2.0 * t * t * d,
        "attn_v": 2.0 * t * t * d,
        "out_proj": 2.0 * t * d * d,
        "mlp": 2.0 * 2 * t * d * inter,
    }
    patch_embed = 2.0 * patches * channels * patch * patch * d
    layers = used * sum(per_layer.values())
    out_tokens = patches if select_feature == "patch" else t
    proj = projector_flops(projector_type, out_tokens, int(mm_hidden_size or d), hidden_size)
    total = patch_embed + layers + proj
    return {
        "total": total,
        "gflops": total / 1e9,
        "patch_embed": patch_embed,
        "layers": layers,
        "layers_used": used,
        "per_layer": per_layer,
        "projector": proj,
        "tokens": t,
    }


def matmul_ceiling(
    device: torch.device,
    *,
    n: int | None = None,
    dtype: torch.dtype | None = None,
    warmup: int = 3,
    repeats: int = 8,
) -> dict[str, Any]:
    """Throughput of an ``n``³ matmul (bf16 by default; n = 8192 on a GPU, 2048 on a CPU)."""
    import torch

    dtype = dtype or torch.bfloat16
    n = n or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    with torch.inference_mode():
        timing = time_callable(lambda: torch.mm(a, b), device, warmup=warmup, repeats=repeats)
    flops = 2.0 * n**3
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": timing.median_s,
        "tflops": flops / timing.median_s / 1e12,
        "timing": timing.as_dict(),
    }
