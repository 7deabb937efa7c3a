"""``llava-features bench encoder``: our encoder vs the seed path vs the matmul ceiling, in one run.

Random weights of the configured architecture (throughput does not depend on weight values),
synthetic uint8 pixels already on the device. Measured, per batch size:

- ``ours``: :meth:`FeatureEncoder.encode_core` on uint8 pixels — the product's device path:
  normalisation on the device, the tower up to the selected layer, the projector; with the
  configured fast path (load-time transforms, optionally ``torch.compile`` with static batch
  buckets);
- ``ours_host``: :meth:`FeatureEncoder.encode_pixels` from host uint8 arrays to host arrays in the
  stored dtype (pinned copies overlapped with compute on a GPU): what an offline-job actor sees;
- ``seed``: LLaVA's original path — the whole tower with ``output_hidden_states=True``, select
  the layer, drop CLS, projector — in float16 with SDPA on a GPU (the compute dtype on a CPU), on
  pixels already normalised;
- the matmul ceiling (bf16, 8192³ on a GPU, 2048³ on a CPU) and the fraction of it each path
  reaches (FLOPs per image from :func:`~pipeline.bench.flops.encoder_flops`);
- the relative error ‖ours − ref‖ / ‖ref‖ of the projected features against the seed path in
  float32 (TF32 off), on smooth photo-like images;
- ``anyres``: LLaVA-NeXT on the same tower — a web mix of aspect ratios (:data:`ANYRES_MIX`) tiled
  on LLaVA-NeXT's default grid (:func:`anyres_pinpoints`), host tiles → host rows through
  :meth:`FeatureEncoder.encode_tiles`, for the ``tiles`` and the ``packed`` output: images/s,
  tiles/s, tokens/s, and tiles/s over the 1.5 host→host images/s at the largest batch (a tile is
  one 1.5 image's work, so 1.0 means anyres costs nothing beyond its tiles).

CUDA events on a GPU, ``perf_counter`` on a CPU; warm-up calls, then the median of repeats.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ..measure.environment import environment
from ..measure.images import smooth_noise_images
from ..measure.options import BenchOptions
from ..measure.timing import time_callable, time_wall
from ..model.config import setting
from ..model.constants import CompileMode, ComputeDtype
from .arch import BenchArch, bench_arch
from .flops import matmul_ceiling
from .models import bench_resolved, random_modules
from .report import format_table

if TYPE_CHECKING:
    from ..config import Config

logger = logging.getLogger(__name__)

TARGETS = {
    "images_per_s": 1300.0,
    "fraction_of_ceiling": 0.65,
    "ratio_vs_seed": 1.45,
    "rel_error_vs_fp32": 2e-2,
}
"""The issue's targets (H100/H200, ViT-L/14-336 + mlp2x_gelu, batch 256)."""

ANYRES_MIX: tuple[tuple[int, int], ...] = (
    (640, 480),
    (480, 640),
    (1280, 720),
    (720, 1280),
    (800, 800),
    (1024, 683),
    (683, 1024),
    (1500, 500),
)
"""(width, height) of the anyres row's images: 4:3, 3:4, 16:9, 9:16, 1:1, 3:2, 2:3, 3:1."""

Variant = Literal["plain", "fast", "compiled"]
"""``plain``: eager, no transforms; ``fast``: eager + load-time transforms; ``compiled``: fast + torch.compile."""


@dataclass(frozen=True)
class EncoderOptions(BenchOptions):
    """Options of ``bench encoder`` (None: the default of the device and architecture, as each field says)."""

    SECTION: ClassVar[str] = "bench.encoder"

    tiny: bool = False
    """Benchmark the tiny test architecture (56 px, 3 layers) instead of the config's."""
    batch_sizes: tuple[int, ...] | None = setting(None, ge=1)
    """Batch sizes measured (default 32, 128, 256 on a GPU; 8, 32 for the tiny one on a CPU; else 2)."""
    dtype: ComputeDtype | None = None
    """Our compute dtype (default: the config's ``model.dtype``)."""
    seed_dtype: ComputeDtype | None = None
    """The seed path's dtype (null or auto: float16 on a GPU, our dtype on a CPU)."""
    device: str | None = None
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (default: the config's ``model.device``)."""
    compile: bool = False
    """Ours is the ``compiled`` variant: ``torch.compile`` with static batch buckets."""
    compile_mode: CompileMode | None = None
    """``torch.compile`` mode of the compiled variant (null: torch's default)."""
    fast: bool = True
    """Ours has the load-time transforms (fused QKV, folded quick_gelu); False: ours is ``plain``."""
    variants: tuple[Variant, ...] = ()
    """Variants measured in the same run after ours: ``plain``, ``fast``, ``compiled``."""
    warmup: int | None = setting(None, ge=0)
    """Untimed calls before timing (default 3 on a GPU, 20 for the tiny one on a CPU, else 1)."""
    repeats: int | None = setting(None, ge=1)
    """Timed calls, of which the median is reported (default 8 on a GPU, 15 tiny on a CPU, else 3)."""
    ceiling_n: int | None = setting(None, ge=1)
    """N of the N³ bfloat16 matmul ceiling (default 8192 on a GPU, 2048 on a CPU)."""
    error_images: int | None = setting(None, ge=0)
    """Images of the relative error against the float32 seed path (default 8 on a GPU, 2 on a CPU; 0: none)."""
    host_batches: int | None = setting(None, ge=0)
    """Batches per host→host ``encode_pixels`` timing (default 3 on a GPU, 1 on a CPU; 0: none)."""
    anyres_images: int | None = setting(None, ge=0)
    """LLaVA-NeXT images of the anyres row (default 128 on a GPU, 8 tiny on a CPU, else 2; 0: none)."""


def seed_forward(
    model: Any, projector: Any, pixel_values: Any, select_layer: int, select_feature: str
) -> Any:
    """LLaVA's original ``CLIPVisionTower.forward`` + projector: every layer runs and every hidden
    state is kept (``output_hidden_states=True``), then the selected one is sliced."""
    out = model(pixel_values, output_hidden_states=True)
    features = out.hidden_states[select_layer]
    if select_feature == "patch":
        features = features[:, 1:]
    return projector(features)


def anyres_pinpoints(tile: int) -> tuple[tuple[int, int], ...]:
    """LLaVA-NeXT's default ``image_grid_pinpoints`` (``[[336, 672], [672, 336], [672, 672], [1008, 336],
    [336, 1008]]`` for 336 px tiles), as (width, height), for tiles of ``tile`` px."""
    return tuple((w * tile, h * tile) for w, h in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3)))


def _default_batch_sizes(device_type: str, arch: BenchArch) -> tuple[int, ...]:
    if device_type == "cuda":
        return (32, 128, 256)
    return (8, 32) if arch.source == "tiny" else (2,)


def make_bench_encoder(
    config: Any,
    arch: BenchArch,
    master: tuple[Any, Any],
    *,
    device: Any,
    dtype: Any,
    variant: str,
    batch_sizes: Sequence[int],
    compile_mode: str | None = None,
    features: str = "projected",
    pooled: bool = False,
    resolved: Any = None,
    anyres_output: str | None = None,
    image_newline: Any = None,
    fuse_qkv: bool | None = None,
    fold_quick_gelu: bool | None = None,
    output_dtype: str | None = None,
) -> Any:
    """A :class:`FeatureEncoder` of ``variant`` (``plain``, ``fast``, ``compiled``) on copies of the random
    ``master`` modules, on ``device`` in ``dtype``, for batches of ``batch_sizes`` (the compiled
    variant's buckets). ``fuse_qkv`` / ``fold_quick_gelu`` set one load-time transform apart from
    the variant's choice (both on unless ``plain``); ``output_dtype`` the returned dtype."""
    from ..encoder import FeatureEncoder
    from ..model import CLIPVisionTower

    model, projector = master
    args = {"mm_vision_select_layer": arch.select_layer, "mm_vision_select_feature": arch.select_feature}
    tower = CLIPVisionTower.from_model(
        copy.deepcopy(model).to(device=device, dtype=dtype), args, name=f"random:{arch.name}"
    )
    proj = copy.deepcopy(projector).to(device=device, dtype=dtype)
    fast = variant != "plain"
    model_cfg = replace(
        config.model,
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        fuse_qkv=fast if fuse_qkv is None else fuse_qkv,
        fold_quick_gelu=fast if fold_quick_gelu is None else fold_quick_gelu,
        compile=variant == "compiled",
        compile_mode=compile_mode,
    )
    encoder_cfg = replace(
        config.encoder,
        features=features,
        pooled=pooled,
        batch_size=max(batch_sizes),
        batch_buckets=tuple(sorted(set(batch_sizes))) if variant == "compiled" else (),
        anyres_output=anyres_output or config.encoder.anyres_output,
        output_dtype=output_dtype or config.encoder.output_dtype,
    )
    cfg = replace(config, model=model_cfg, encoder=encoder_cfg)
    return FeatureEncoder(
        cfg, resolved or bench_resolved(arch), modules=(tower, proj), image_newline=image_newline
    )


def random_pixels(batch: int, arch: BenchArch, device: Any, *, seed: int) -> Any:
    """``(batch, 3, S, S)`` random uint8 pixels of ``arch``'s image size on ``device``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    size = arch.image_size
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen).to(device)


def _rel_error(got: Any, ref: Any) -> float:
    got, ref = got.float(), ref.float()
    return float((got - ref).norm() / ref.norm())


def _reference_features(master: tuple[Any, Any], arch: BenchArch, pixels: Any, spec: Any, device: Any) -> Any:
    """Seed path in float32 on ``device`` with TF32 off: the numerical reference."""
    import torch

    from ..images.normalize import normalize

    model, projector = (copy.deepcopy(m).to(device=device, dtype=torch.float32) for m in master)
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            values = normalize(pixels, spec, dtype=torch.float32)
            return seed_forward(model, projector, values, arch.select_layer, arch.select_feature).float()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
        del model, projector
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _error_pixels(n: int, arch: BenchArch, device: Any) -> Any:
    import numpy as np
    import torch

    size = arch.image_size
    images = smooth_noise_images(n, size, size, seed=1)  # (n, H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)


def _measure_variant(
    make_encoder: Callable[..., Any],
    arch: BenchArch,
    dev: Any,
    *,
    variant: str,
    sizes: Sequence[int],
    warmup: int,
    repeats: int,
    host_batches: int,
    err_pixels: Any,
    ref: Any,
) -> tuple[dict[int, dict[str, Any]], float | None]:
    """One encoder variant (``make_encoder(variant=)`` builds it) at every batch size (+ host→host when
    ``host_batches``, + its error)."""
    import numpy as np
    import torch

    encoder = make_encoder(variant=variant)
    warm_s = encoder.warmup(max(sizes))
    logger.info("variant %s: warm-up %.1fs", variant, warm_s)
    out: dict[int, dict[str, Any]] = {}
    for b in sizes:
        pixels = random_pixels(b, arch, dev, seed=b)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        with torch.inference_mode():
            timing = time_callable(
                lambda px=pixels: encoder.encode_core(px), dev, warmup=warmup, repeats=repeats
            )
        out[b] = {"images_per_s": b / timing.median_s, "timing": timing.as_dict(), "warmup_s": warm_s}
        if dev.type == "cuda":  # weights, the compiled graphs' pools and this batch's activations
            out[b]["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        if host_batches > 0:
            host = pixels.cpu().numpy()
            host = np.concatenate([host] * host_batches) if host_batches > 1 else host
            t = time_wall(
                lambda h=host, bs=b: encoder.encode_pixels(h, batch_size=bs),
                dev,
                warmup=max(1, warmup),
                repeats=max(1, repeats // 2),
            )
            out[b]["host"] = {"images_per_s": len(host) / t.median_s, "timing": t.as_dict()}
    err = None
    if err_pixels is not None:
        with torch.inference_mode():
            err = _rel_error(encoder.encode_core(err_pixels)["projected"], ref)
    if dev.type == "cuda":
        del encoder
        torch.cuda.empty_cache()
    return out, err


def _anyres_inputs(arch: BenchArch, n: int) -> tuple[Any, Any, list[int], list[Any]]:
    """The anyres ResolvedModel of ``arch`` and ``n`` images of :data:`ANYRES_MIX` (cycled) as host
    tiles ``(sum(counts), 3, S, S)``, per-image tile counts and grids."""
    import numpy as np
    from PIL import Image

    from ..encoder import preprocess_spec
    from ..images.anyres import anyres_tiles

    resolved = replace(
        bench_resolved(arch),
        image_aspect_ratio="anyres",
        image_grid_pinpoints=anyres_pinpoints(arch.image_size),
        patch_merge_type="spatial_unpad",
        newline_sha256="random-weights",
    )
    spec = preprocess_spec(resolved)
    per_size = {}
    for index, (width, height) in enumerate(ANYRES_MIX[: min(n, len(ANYRES_MIX))]):
        image = Image.fromarray(smooth_noise_images(1, height, width, seed=index)[0])
        per_size[index] = anyres_tiles(image, spec)
    chosen = [per_size[i % len(per_size)] for i in range(n)]
    tiles = np.concatenate([t for t, _ in chosen])
    return resolved, tiles, [len(t) for t, _ in chosen], [g for _, g in chosen]


def _measure_anyres(
    make_encoder: Callable[..., Any],
    arch: BenchArch,
    dev: Any,
    *,
    images: int,
    batch_size: int,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """The anyres row: ``images`` LLaVA-NeXT images through ``encode_tiles``, ``tiles`` and ``packed``
    (``make_encoder(resolved=, anyres_output=, image_newline=)`` builds the measured variant)."""
    import torch

    resolved, tiles, counts, grids = _anyres_inputs(arch, images)
    newline = torch.randn(arch.feature_dim, generator=torch.Generator().manual_seed(3))
    out: dict[str, Any] = {
        "images": images,
        "mix": [list(s) for s in ANYRES_MIX],
        "pinpoints": [list(p) for p in resolved.image_grid_pinpoints],
        "tiles": len(tiles),
        "mean_tiles_per_image": len(tiles) / images,
        "batch_size": batch_size,
        "outputs": {},
    }
    for output in ("tiles", "packed"):
        encoder = make_encoder(resolved=resolved, anyres_output=output, image_newline=newline)
        encoder.warmup(batch_size)
        result = encoder.encode_tiles(tiles, counts, grids)
        rows = [result.projected[i] for i in range(images)]  # tiles [1+n, tokens, dim], packed [tokens, dim]
        tokens = sum(r.shape[0] * (r.shape[1] if r.ndim == 3 else 1) for r in rows)
        timing = time_wall(
            lambda e=encoder: e.encode_tiles(tiles, counts, grids),
            dev,
            warmup=max(1, warmup // 4),
            repeats=max(1, repeats // 2),
        )
        out["outputs"][output] = {
            "images_per_s": images / timing.median_s,
            "tiles_per_s": len(tiles) / timing.median_s,
            "tokens_per_image": tokens / images,
            "tokens_per_s": tokens / timing.median_s,
            "timing": timing.as_dict(),
        }
        if dev.type == "cuda":
            del encoder
            torch.cuda.empty_cache()
    return out


def _measure_seed(
    arch: BenchArch,
    master: tuple[Any, Any],
    dev: Any,
    *,
    dtype: Any,
    sizes: Sequence[int],
    spec: Any,
    warmup: int,
    repeats: int,
    err_pixels: Any,
    ref: Any,
) -> tuple[dict[int, dict[str, Any]], float | None]:
    """The seed path at every batch size (+ its error vs the float32 reference)."""
    import torch

    from ..images.normalize import normalize

    model, projector = (copy.deepcopy(m).to(device=dev, dtype=dtype) for m in master)

    def run(values: Any) -> Any:
        return seed_forward(model, projector, values, arch.select_layer, arch.select_feature)

    out: dict[int, dict[str, Any]] = {}
    for b in sizes:
        values = normalize(random_pixels(b, arch, dev, seed=b), spec, dtype=torch.float32).to(dtype)
        with torch.inference_mode():
            timing = time_callable(lambda v=values: run(v), dev, warmup=warmup, repeats=repeats)
        out[b] = {"seed_images_per_s": b / timing.median_s, "seed_timing": timing.as_dict()}
    err = None
    if err_pixels is not None:
        with torch.inference_mode():
            err = _rel_error(run(normalize(err_pixels, spec, dtype=torch.float32).to(dtype)), ref)
    if dev.type == "cuda":
        del model, projector
        torch.cuda.empty_cache()
    return out, err


def bench_encoder(config: Config | None, options: EncoderOptions) -> dict[str, Any]:
    """Measure our encoder, the seed path and the matmul ceiling on one device; returns a JSON-able dict.

    The variant the options select (``compiled`` with ``compile``, ``plain`` without ``fast``, else
    ``fast``) is reported as ``ours``; ``variants`` are measured after it, in order.
    """
    import torch

    from ..config import Config
    from ..encoder import preprocess_spec
    from ..model import resolve_device, resolve_dtype

    config = config if config is not None else Config()
    dev = resolve_device(options.device or config.model.device)
    arch = bench_arch(None if options.tiny else config, tiny=options.tiny)
    ours_dtype = resolve_dtype(options.dtype or config.model.dtype, dev)
    seed_dtype = options.seed_dtype
    ref_dtype = (
        resolve_dtype(seed_dtype, dev)
        if seed_dtype and seed_dtype != "auto"
        else (torch.float16 if dev.type == "cuda" else ours_dtype)
    )
    sizes = tuple(options.batch_sizes or _default_batch_sizes(dev.type, arch))
    primary = "compiled" if options.compile else ("fast" if options.fast else "plain")
    names = list(dict.fromkeys([primary, *options.variants]))
    compile_mode, ceiling_n = options.compile_mode, options.ceiling_n
    cuda = dev.type == "cuda"
    small = (
        arch.source == "tiny"
    )  # cheap calls: many warm-ups (CPU kernels settle after ~15 calls), many repeats

    def pick(value: int | None, gpu: int, tiny_cpu: int, cpu: int) -> int:
        return value if value is not None else (gpu if cuda else (tiny_cpu if small else cpu))

    warmup = pick(options.warmup, 3, 20, 1)
    repeats = pick(options.repeats, 8, 15, 3)
    host_batches = pick(options.host_batches, 3, 1, 1)
    error_images = pick(options.error_images, 8, 2, 2)
    anyres_images = pick(options.anyres_images, 128, 8, 2)
    flops = arch.flops()
    per_image = flops["total"]
    logger.info(
        "bench encoder: %s (%s) on %s, ours %s, seed %s, batches %s, variants %s, %.1f GFLOP/image",
        arch.name,
        arch.source,
        dev,
        ours_dtype,
        ref_dtype,
        list(sizes),
        names,
        per_image / 1e9,
    )

    master = random_modules(arch)
    ceiling = matmul_ceiling(dev, n=ceiling_n)
    ceilings = {"bfloat16": ceiling}
    if ours_dtype != torch.bfloat16:
        ceilings[str(ours_dtype).removeprefix("torch.")] = matmul_ceiling(dev, n=ceiling_n, dtype=ours_dtype)
    same = ceilings[str(ours_dtype).removeprefix("torch.")]

    def fraction(images_per_s: float | None, ceil: dict[str, Any]) -> float | None:
        return None if not images_per_s else images_per_s * per_image / (ceil["tflops"] * 1e12)

    rows: dict[int, dict[str, Any]] = {b: {"batch_size": b, "variants": {}} for b in sizes}
    errors: dict[str, float] = {}
    spec = preprocess_spec(bench_resolved(arch))
    err_pixels = _error_pixels(error_images, arch, dev) if error_images > 0 else None
    ref = _reference_features(master, arch, err_pixels, spec, dev) if err_pixels is not None else None

    # Every variant is built on copies of the same random modules, on the same device, in our dtype.
    make = partial(
        make_bench_encoder,
        config,
        arch,
        master,
        device=dev,
        dtype=ours_dtype,
        batch_sizes=sizes,
        compile_mode=compile_mode,
    )
    for index, variant in enumerate(names):
        measured, err = _measure_variant(
            make,
            arch,
            dev,
            variant=variant,
            sizes=sizes,
            warmup=warmup,
            repeats=repeats,
            host_batches=host_batches if index == 0 else 0,
            err_pixels=err_pixels,
            ref=ref,
        )
        for b in sizes:
            host = measured[b].pop("host", None)
            rows[b]["variants"][variant] = measured[b]
            if host is not None:
                rows[b]["ours_host_images_per_s"] = host["images_per_s"]
                rows[b]["ours_host_timing"] = host["timing"]
        if err is not None:
            errors[variant] = err

    seed_rows, seed_error = _measure_seed(
        arch,
        master,
        dev,
        dtype=ref_dtype,
        sizes=sizes,
        spec=spec,
        warmup=warmup,
        repeats=repeats,
        err_pixels=err_pixels,
        ref=ref,
    )
    for b in sizes:
        rows[b].update(seed_rows[b])
    anyres = None
    if anyres_images > 0:
        anyres = _measure_anyres(
            partial(make, variant=names[0]),
            arch,
            dev,
            images=anyres_images,
            batch_size=max(sizes),
            warmup=warmup,
            repeats=repeats,
        )
        anyres["variant"] = names[0]

    out_rows = []
    for b in sizes:
        row = rows[b]
        ours = row["variants"][names[0]]["images_per_s"]
        seed = row["seed_images_per_s"]
        ours_best = b / row["variants"][names[0]]["timing"]["min_s"]
        seed_best = b / row["seed_timing"]["min_s"]
        row.update(
            ours_best_images_per_s=ours_best,
            seed_best_images_per_s=seed_best,
            ratio_vs_seed_best=ours_best / seed_best,
            ours_images_per_s=ours,
            ratio_vs_seed=ours / seed if seed else None,
            ours_fraction_of_ceiling=fraction(ours, ceiling),
            seed_fraction_of_ceiling=fraction(seed, ceiling),
            ours_fraction_of_same_dtype_ceiling=fraction(ours, same),
            ours_ms_per_batch=1e3 * b / ours,
        )
        for v in row["variants"].values():
            v["ratio_vs_seed"] = v["images_per_s"] / seed if seed else None
            v["best_images_per_s"] = b / v["timing"]["min_s"]
            v["fraction_of_ceiling"] = fraction(v["images_per_s"], ceiling)
        out_rows.append(row)

    headline = max(out_rows, key=lambda r: r["batch_size"])
    if anyres is not None and headline.get("ours_host_images_per_s"):
        for v in anyres["outputs"].values():
            v["tiles_vs_host_images"] = v["tiles_per_s"] / headline["ours_host_images_per_s"]
    rel_error = errors.get(names[0])
    met = {
        "images_per_s": headline["ours_images_per_s"] >= TARGETS["images_per_s"],
        "fraction_of_ceiling": (headline["ours_fraction_of_ceiling"] or 0) >= TARGETS["fraction_of_ceiling"],
        "ratio_vs_seed": (headline["ratio_vs_seed"] or 0) >= TARGETS["ratio_vs_seed"],
        "rel_error_vs_fp32": rel_error is not None and rel_error <= TARGETS["rel_error_vs_fp32"],
    }
    return {
        "bench": "encoder",
        "env": environment(dev),
        "arch": arch.describe(),
        "device": str(dev),
        "dtype": str(ours_dtype).removeprefix("torch."),
        "seed_dtype": str(ref_dtype).removeprefix("torch."),
        "variants": names,
        "compile_mode": compile_mode,
        "flops_per_image": per_image,
        "gflops_per_image": per_image / 1e9,
        "flops": flops,
        "ceiling": {**ceiling, "images_per_s": ceiling["tflops"] * 1e12 / per_image},
        "ceiling_same_dtype": {**same, "images_per_s": same["tflops"] * 1e12 / per_image},
        "rows": out_rows,
        "anyres": anyres,
        "rel_error": {
            "ours_vs_fp32_seed": rel_error,
            "variants_vs_fp32_seed": errors,
            "seed_vs_fp32_seed": seed_error,
            "images": error_images,
            "metric": "||features - reference|| / ||reference|| over the projected features",
        },
        "targets": {
            "values": TARGETS,
            "batch_size": headline["batch_size"],
            "met": met,
            "note": "targets apply to ViT-L/14-336 + mlp2x_gelu at batch 256 on an H100/H200",
        },
        "settings": {"warmup": warmup, "repeats": repeats, "host_batches": host_batches},
    }


def format_encoder_report(result: dict[str, Any]) -> str:
    """A short human-readable table of :func:`bench_encoder`'s result."""
    env = result["env"]
    ceiling = result["ceiling"]
    title = (
        f"encoder: {result['arch']['name']} on {env.get('device_name')} ({result['device']}), "
        f"ours {result['dtype']} [{', '.join(result['variants'])}] vs seed {result['seed_dtype']}; "
        f"{result['gflops_per_image']:.1f} GFLOP/image; ceiling {ceiling['dtype']} {ceiling['n']}³ "
        f"{ceiling['tflops']:.1f} TFLOP/s = {ceiling['images_per_s']:,.1f} images/s"
    )
    rows = []
    for r in result["rows"]:
        row = dict(r)
        for name, v in r["variants"].items():
            row[f"v_{name}"] = v["images_per_s"]
        rows.append(row)
    columns = [
        ("batch_size", "batch", ""),
        ("ours_images_per_s", "ours img/s", ",.1f"),
        ("seed_images_per_s", "seed img/s", ",.1f"),
        ("ratio_vs_seed", "×seed", ".2f"),
        ("ours_fraction_of_ceiling", "ours/ceil", ".1%"),
        ("seed_fraction_of_ceiling", "seed/ceil", ".1%"),
        ("ours_host_images_per_s", "ours host→host img/s", ",.1f"),
    ]
    if len(result["variants"]) > 1:
        columns += [(f"v_{name}", f"{name} img/s", ",.1f") for name in result["variants"]]
    parts = [format_table(rows, columns, title=title)]
    anyres = result.get("anyres")
    if anyres:
        parts.append(
            format_table(
                [{"output": name, **v} for name, v in anyres["outputs"].items()],
                [
                    ("output", "anyres output", ""),
                    ("images_per_s", "img/s", ",.1f"),
                    ("tiles_per_s", "tiles/s", ",.1f"),
                    ("tokens_per_image", "tokens/img", ",.0f"),
                    ("tokens_per_s", "tokens/s", ",.0f"),
                    ("tiles_vs_host_images", "tiles/s ÷ 1.5 host img/s", ".2f"),
                ],
                title=(
                    f"anyres (LLaVA-NeXT): {anyres['images']} images of {len(anyres['mix'])} aspect ratios, "
                    f"{anyres['mean_tiles_per_image']:.2f} tiles/image, batch {anyres['batch_size']}"
                ),
            )
        )
    err = result["rel_error"]
    if err["ours_vs_fp32_seed"] is not None:
        errors = ", ".join(f"{k} {v:.2e}" for k, v in err["variants_vs_fp32_seed"].items())
        seed_err = err["seed_vs_fp32_seed"]
        seed = f"; seed {result['seed_dtype']} {seed_err:.2e}" if seed_err is not None else ""
        parts.append(f"relative error vs the fp32 seed path ({err['images']} images): {errors}{seed}")
    return "\n".join(parts)
