"""Shared benchmark helpers: timing, environment, FLOP counting, architectures, output.

- Timing: :func:`time_callable` (CUDA events on a GPU, ``perf_counter`` on a CPU; warm-up runs,
  then the median of timed repeats), :func:`matmul_ceiling` (the matmul throughput that the
  encoder's fraction-of-ceiling is measured against).
- :func:`environment`: device, driver, CUDA, library versions, CPU count.
- :func:`encoder_flops`: work per image of the tower up to the selected layer + projector.
- Architectures: :func:`bench_arch` turns a config (or ``--tiny``) into a :class:`BenchArch`,
  reading the checkpoint when it is present locally and falling back to a table of known
  models (``openai/clip-vit-large-patch14-336``, ``liuhaotian/llava-v1.5-7b``, ...) when not;
  :func:`random_modules`, :func:`bench_resolved` and :func:`write_random_checkpoint` build
  random-weight models of that architecture (throughput does not depend on weight values).
- Output: :func:`write_json`, :func:`print_table`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..model.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, hidden_state_index, projector_depth

if TYPE_CHECKING:
    import torch

    from ..config import Config
    from ..model import ResolvedModel

logger = logging.getLogger(__name__)

KNOWN_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    },
    "openai/clip-vit-large-patch14": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    },
}
"""CLIPVisionConfig settings of towers benchmarked without their weights."""

_LLAVA15 = {
    "vision_tower": "openai/clip-vit-large-patch14-336",
    "select_layer": -2,
    "select_feature": "patch",
    "projector_type": "mlp2x_gelu",
    "mm_hidden_size": 1024,
}
KNOWN_CHECKPOINTS: dict[str, dict[str, Any]] = {
    "liuhaotian/llava-v1.5-7b": {**_LLAVA15, "hidden_size": 4096, "image_aspect_ratio": "pad"},
    "liuhaotian/llava-v1.5-13b": {**_LLAVA15, "hidden_size": 5120, "image_aspect_ratio": "pad"},
    "llava-hf/llava-1.5-7b-hf": {**_LLAVA15, "hidden_size": 4096, "image_aspect_ratio": "crop"},
    "llava-hf/llava-1.5-13b-hf": {**_LLAVA15, "hidden_size": 5120, "image_aspect_ratio": "crop"},
}
"""LLaVA settings of checkpoints benchmarked without their weights."""


# -- timing -----------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on a CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call: median (the figure reported), min and max of the timed repeats."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int
    method: str
    """``cuda-events`` or ``perf_counter``."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_callable(
    fn: Callable[[], Any], device: torch.device, *, warmup: int = 2, repeats: int = 5
) -> Timing:
    """Time ``fn()`` on ``device``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    On a GPU each call is bracketed by CUDA events recorded on the current stream (the device
    time of everything ``fn`` enqueued, including on streams it waited for) and the device is
    synchronised after each; on a CPU, ``perf_counter`` around the call.
    """
    import torch

    for _ in range(max(0, warmup)):
        fn()
    synchronize(device)
    times: list[float] = []
    cuda = device.type == "cuda"
    for _ in range(max(1, repeats)):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return Timing(
        median_s=statistics.median(times),
        min_s=min(times),
        max_s=max(times),
        repeats=len(times),
        method="cuda-events" if cuda else "perf_counter",
    )


def time_wall(fn: Callable[[], Any], device: torch.device, *, warmup: int = 1, repeats: int = 3) -> Timing:
    """Like :func:`time_callable` but wall-clock (``perf_counter`` + synchronize) on every device:
    for host→host paths whose time is not all on the current stream."""
    for _ in range(max(0, warmup)):
        fn()
    synchronize(device)
    times = []
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return Timing(statistics.median(times), min(times), max(times), len(times), "perf_counter")


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


# -- environment ------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """Device, driver and library versions, CPU count: what a figure was measured with."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "versions": {
            name: _version(name)
            for name in (
                "torch",
                "transformers",
                "torchvision",
                "triton",
                "ray",
                "pyarrow",
                "numpy",
                "pillow",
                "safetensors",
            )
        },
        "cuda_available": torch.cuda.is_available(),
    }
    if device is not None:
        env["device"] = str(device)
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=torch.cuda.get_device_name(device),
            device_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            driver=_nvidia_driver(),
        )
    else:
        env["device_name"] = env["cpu"]
    return env


# -- FLOPs ------------------------------------------------------------------------------------


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


# -- architectures ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchArch:
    """The encoder architecture a benchmark builds (with random weights)."""

    name: str
    """Where it came from (a model id, a checkpoint, ``tiny``)."""
    vision_config: dict[str, Any]
    """CLIPVisionConfig settings."""
    select_layer: int
    """Hidden layer the features are taken from."""
    select_feature: str
    """``patch`` or ``cls_patch``."""
    projector_type: str
    """``linear``, ``mlp{N}x_gelu`` or ``identity``."""
    mm_hidden_size: int
    """Projector input width."""
    hidden_size: int | None
    """Projector output width."""
    image_aspect_ratio: str = "pad"
    """LLaVA's aspect-ratio mode."""
    image_processor: dict[str, Any] = field(default_factory=dict, compare=False)
    """CLIPImageProcessor settings (size, crop, mean, std, resample)."""
    source: str = "table"
    """``checkpoint`` (read from local files), ``table`` (known architecture) or ``tiny``."""

    @property
    def image_size(self) -> int:
        return int(self.vision_config["image_size"])

    @property
    def patch_size(self) -> int:
        return int(self.vision_config["patch_size"])

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + (1 if self.select_feature == "cls_patch" else 0)

    @property
    def feature_dim(self) -> int:
        return self.mm_hidden_size if self.projector_type == "identity" else int(self.hidden_size or 0)

    def flops(self) -> dict[str, Any]:
        return encoder_flops(
            self.vision_config,
            select_layer=self.select_layer,
            select_feature=self.select_feature,
            projector_type=self.projector_type,
            mm_hidden_size=self.mm_hidden_size,
            hidden_size=self.hidden_size,
        )

    def describe(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("image_processor")
        return out


def clip_image_processor_dict(image_size: int) -> dict[str, Any]:
    """``preprocessor_config.json`` of an OpenAI CLIP tower at ``image_size`` px."""
    return {
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "do_convert_rgb": True,
        "image_processor_type": "CLIPImageProcessor",
    }


def tiny_arch() -> BenchArch:
    """The tiny test architecture (CLIP 56 px / patch 14, 3 layers, hidden 32; mlp2x_gelu 32→64)."""
    from ..model.tiny import TINY_SETTINGS, TINY_TEXT, TINY_VISION

    vision = dict(TINY_VISION)
    return BenchArch(
        name="tiny",
        vision_config=vision,
        select_layer=int(TINY_SETTINGS["mm_vision_select_layer"]),
        select_feature=str(TINY_SETTINGS["mm_vision_select_feature"]),
        projector_type=str(TINY_SETTINGS["mm_projector_type"]),
        mm_hidden_size=int(vision["hidden_size"]),
        hidden_size=int(TINY_TEXT["hidden_size"]),
        image_aspect_ratio=str(TINY_SETTINGS["image_aspect_ratio"]),
        image_processor=clip_image_processor_dict(int(vision["image_size"])),
        source="tiny",
    )


def _pick(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def bench_arch(config: Config | None = None, *, tiny: bool = False) -> BenchArch:
    """The architecture of ``config``'s encoder, without needing its weights.

    The checkpoint is read when it is available locally (its configs only; no module is built);
    otherwise the model ids are looked up in :data:`KNOWN_CHECKPOINTS` / :data:`KNOWN_TOWERS`.
    Settings given in the config (layer, projector, widths, aspect ratio) win either way.
    """
    if tiny or config is None:
        return tiny_arch()
    from ..model import resolve_model
    from ..model.errors import CheckpointError

    m = config.model
    try:
        r = resolve_model(m)
    except CheckpointError as exc:
        logger.info("Model not available locally (%s); using the known-architecture table", exc)
    else:
        return BenchArch(
            name=r.checkpoint or r.vision_tower,
            vision_config={k: v for k, v in r.vision_config.items() if not k.startswith("_")},
            select_layer=r.select_layer,
            select_feature=r.select_feature,
            projector_type=r.projector_type,
            mm_hidden_size=r.mm_hidden_size,
            hidden_size=r.hidden_size,
            image_aspect_ratio=r.image_aspect_ratio,
            image_processor=dict(r.image_processor),
            source="checkpoint",
        )
    known = KNOWN_CHECKPOINTS.get(m.checkpoint or "", {})
    tower = m.vision_tower or known.get("vision_tower") or m.checkpoint
    if tower not in KNOWN_TOWERS:
        raise ValueError(
            f"Cannot build the architecture of {m.checkpoint or m.vision_tower!r}: not available locally and "
            f"not a known tower ({sorted(KNOWN_TOWERS)}) or checkpoint ({sorted(KNOWN_CHECKPOINTS)})"
        )
    vision = dict(KNOWN_TOWERS[tower])
    projector_type = _pick(m.projector_type, known.get("projector_type"), "mlp2x_gelu")
    hidden = _pick(m.hidden_size, known.get("hidden_size"))
    if hidden is None and projector_type != "identity":
        raise ValueError(f"Set model.hidden_size (the projector's output width) to benchmark {tower!r}")
    return BenchArch(
        name=m.checkpoint or tower,
        vision_config=vision,
        select_layer=int(_pick(m.select_layer, known.get("select_layer"), -2)),
        select_feature=str(_pick(m.select_feature, known.get("select_feature"), "patch")),
        projector_type=str(projector_type),
        mm_hidden_size=int(_pick(m.mm_hidden_size, known.get("mm_hidden_size"), vision["hidden_size"])),
        hidden_size=None if hidden is None else int(hidden),
        image_aspect_ratio=str(_pick(m.image_aspect_ratio, known.get("image_aspect_ratio"), "pad")),
        image_processor=clip_image_processor_dict(int(vision["image_size"])),
        source="table",
    )


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
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from ..model import build_vision_projector

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(**{k: v for k, v in arch.vision_config.items() if k != "model_type"})
    model = CLIPVisionModel._from_config(cfg, attn_implementation=attn_implementation, dtype=torch.float32)
    model.eval().requires_grad_(False)
    projector = build_vision_projector(
        {
            "mm_projector_type": arch.projector_type,
            "mm_hidden_size": arch.mm_hidden_size,
            "hidden_size": arch.hidden_size,
        }
    )
    projector.eval().requires_grad_(False)
    return model, projector


def write_random_checkpoint(arch: BenchArch, directory: str | Path, *, seed: int = 0) -> dict[str, Any]:
    """Write a random-weight bare-CLIP checkpoint of ``arch`` (+ ``mm_projector.bin``) into
    ``directory``; returns the ``model`` config section that loads it."""
    import torch
    from transformers import CLIPImageProcessor

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model, projector = random_modules(arch, seed=seed)
    model.save_pretrained(out)
    processor = {k: v for k, v in arch.image_processor.items() if k != "image_processor_type"}
    CLIPImageProcessor(**processor).save_pretrained(out)
    section: dict[str, Any] = {
        "checkpoint": None,
        "vision_tower": str(out.resolve()),
        "select_layer": arch.select_layer,
        "select_feature": arch.select_feature,
        "projector_type": arch.projector_type,
        "mm_hidden_size": arch.mm_hidden_size,
        "hidden_size": arch.hidden_size,
        "image_aspect_ratio": arch.image_aspect_ratio,
        "projector_weights": None,
    }
    if arch.projector_type != "identity":
        torch.save(
            {f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()},
            out / "mm_projector.bin",
        )
        section["projector_weights"] = str((out / "mm_projector.bin").resolve())
    return section


def loadable_config(config: Config | None, *, tiny: bool, workdir: str | Path) -> Config:
    """A Config whose model loads from disk: the given one when its model is available locally,
    else the same settings on a random-weight checkpoint of its architecture written under
    ``workdir`` (``--tiny``: the tiny LLaVA checkpoint). Job/serve/decode settings are kept."""
    from ..config import Config as ConfigCls
    from ..model import resolve_model
    from ..model.errors import CheckpointError
    from ..model.tiny import make_tiny_model

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
    section = write_random_checkpoint(arch, workdir / "random-checkpoint")
    return replace(base, model=replace(base.model, **section))


# -- synthetic images -------------------------------------------------------------------------


def smooth_noise_images(n: int, height: int, width: int, *, seed: int = 0) -> np.ndarray:
    """``(n, height, width, 3)`` uint8 photo-like images: low-frequency colour noise plus a little
    fine grain (so JPEG sizes and decode costs resemble photographs', unlike flat or white-noise
    images)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, height, width, 3), dtype=np.uint8)
    for i in range(n):
        coarse = rng.uniform(0, 255, size=(max(2, height // 32), max(2, width // 32), 3))
        ys = np.linspace(0, coarse.shape[0] - 1, height)
        xs = np.linspace(0, coarse.shape[1] - 1, width)
        y0 = np.floor(ys).astype(int).clip(0, coarse.shape[0] - 2)
        x0 = np.floor(xs).astype(int).clip(0, coarse.shape[1] - 2)
        fy = (ys - y0)[:, None, None]
        fx = (xs - x0)[None, :, None]
        top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
        bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
        img = top * (1 - fy) + bottom * fy + rng.normal(0, 6, size=(height, width, 3))
        out[i] = img.clip(0, 255).astype(np.uint8)
    return out


def photo_images(n: int, height: int = 480, width: int = 640, *, seed: int = 0) -> list[np.ndarray]:
    """``n`` HWC uint8 RGB photos of ``height × width``: scikit-image's bundled photographs,
    randomly cropped, flipped and resized (smooth noise when scikit-image is not installed)."""
    try:
        from PIL import Image
        from skimage import data
    except ImportError:
        return list(smooth_noise_images(n, height, width, seed=seed))
    sources = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"):
        try:
            arr = np.asarray(getattr(data, name)())
        except Exception:  # a dataset file missing from this install: use the others
            continue
        if arr.ndim == 3 and arr.shape[2] >= 3:
            sources.append(Image.fromarray(np.ascontiguousarray(arr[..., :3])))
    if not sources:
        return list(smooth_noise_images(n, height, width, seed=seed))
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        w, h = src.size
        scale = rng.uniform(0.6, 1.0)
        cw, ch = max(16, int(w * scale)), max(16, int(h * scale))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = src.crop((x0, y0, x0 + cw, y0 + ch)).resize((width, height), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(np.asarray(img))
    return out


def write_jpegs(images: Sequence[np.ndarray], folder: str | Path, *, quality: int = 90) -> list[Path]:
    """Write HWC uint8 images as ``img-000000.jpg``...; returns the paths."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(images):
        path = folder / f"img-{i:06d}.jpg"
        Image.fromarray(arr).save(path, format="JPEG", quality=quality)
        paths.append(path)
    return paths


# -- output -----------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON (parents created; non-finite floats → null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=2, sort_keys=False, default=str) + "\n")
    return path


def format_value(value: Any, spec: str = "") -> str:
    """``value`` formatted with ``spec`` (``-`` for None; thousands separators for big numbers)."""
    if value is None:
        return "-"
    if spec:
        try:
            return format(value, spec)
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def print_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]], *, title: str | None = None
) -> str:
    """Print (and return) a plain-text table; ``columns`` are ``(key, header, format spec)``."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([format_value(row.get(key), spec) for key, _, spec in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    if title:
        lines.append(title)
    for i, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text)
    return text
