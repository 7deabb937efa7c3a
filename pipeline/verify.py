"""``llava-features verify``: our features against the reference path of the checkpoint, on its own weights.

For each image, the features are computed twice:

- **ours**: :class:`~pipeline.encoder.FeatureEncoder` as configured (the decode guard, the exact
  compiled preprocessing, the on-device normalisation, the tower's fast path), once in float32 and
  once in the configured compute dtype;
- **the reference**, in float32 on the CPU, by the code the checkpoint's layout is defined by:
  - llava-hf (LLaVA-1.5 and LLaVA-NeXT): transformers' own classes — the checkpoint's image
    processor (its PIL backend, what LLaVA was trained with) on the image as ``Image.open`` gives it,
    and ``LlavaModel`` / ``LlavaNextModel`` built from the checkpoint's config with its own tower,
    projector and ``image_newline`` weights (``get_image_features``, ``pack_image_features``);
  - original LLaVA (and bare CLIP towers): LLaVA's ``process_images`` semantics written here from
    ``llava/mm_utils.py`` (``Image.open(f).convert("RGB")``, ``expand2square`` with the processor's
    mean colour, or ``process_anyres_image``'s canvas and tiles with PIL; transformers'
    ``CLIPImageProcessor`` for the rest), the full ``CLIPVisionModel`` with ``output_hidden_states``
    (the checkpoint's trained tower when it holds one), LLaVA's projector; anyres tiles are packed
    with :func:`pipeline.model.anyres.pack_tiles`, the port of LLaVA's code the product uses.

It reports max |Δ| and the relative error ‖ours − ref‖ / ‖ref‖ per image and a verdict: float32
within :data:`FLOAT32_REL_TOLERANCE`, the configured dtype within :data:`DTYPE_REL_TOLERANCE`.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .config import Config
from .encoder import FeatureEncoder
from .images.decode import decode_image
from .model import ResolvedModel, build_vision_projector, resolve_device, resolve_dtype, resolve_model
from .model.anyres import AnyresGrid, grid_for, pack_tiles
from .model.checkpoints.common import tower_state
from .model.checkpoints.files import CheckpointSource, read_tensors
from .model.errors import ConfigError, DecodeError
from .storage import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

__all__ = ["ImageCheck", "VerifyReport", "sample_images", "verify"]

FLOAT32_REL_TOLERANCE = 1e-5
"""Largest relative error of our float32 features that passes (the tower's load-time transforms move
the last bits: 0 with them off)."""
DTYPE_REL_TOLERANCE = 2e-2
"""Largest relative error of the configured half-precision dtype against the float32 reference."""


@dataclass
class ImageCheck:
    """One image's comparison."""

    name: str
    shape: tuple[int, ...] = ()
    max_abs: float = math.nan
    rel_error: float = math.nan
    dtype_rel_error: float | None = None
    error: str | None = None
    """Why the image could not be compared (its decode error, a shape mismatch)."""

    @property
    def passed(self) -> bool:
        if self.error is not None or not self.rel_error <= FLOAT32_REL_TOLERANCE:
            return False
        return self.dtype_rel_error is None or self.dtype_rel_error <= DTYPE_REL_TOLERANCE


@dataclass
class VerifyReport:
    """What ``verify`` found."""

    layout: str
    reference: str
    """Which reference path ran."""
    compute_dtype: str
    checks: list[ImageCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)


# -- images ---------------------------------------------------------------------------------------


def sample_images() -> dict[str, bytes]:
    """The bundled sample photos (scikit-image's, when installed) plus generated odd shapes, as PNG."""
    images: dict[str, np.ndarray] = {}
    try:
        from skimage import data

        for name in ("astronaut", "coffee", "chelsea", "rocket"):
            images[name] = np.asarray(getattr(data, name)())
    except Exception:  # scikit-image is the demo's extra: generated images only
        logger.info("scikit-image is not installed: verifying on generated images only")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:120, 0:480]
    images["wide-gradient"] = np.stack([x * 255 // 480, y * 2, (x + y) % 256], axis=-1).astype(np.uint8)
    images["tall-noise"] = rng.integers(0, 256, (300, 70, 3), dtype=np.uint8)
    images["tiny"] = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    out = {}
    for name, array in images.items():
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        out[name] = buf.getvalue()
    return out


def images_in(folder: str | Path, limit: int = 16) -> dict[str, bytes]:
    """Up to ``limit`` image files of ``folder`` (sorted), by name."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)[:limit]
    if not files:
        raise ConfigError(f"No image files in {folder} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return {p.name: p.read_bytes() for p in files}


# -- the reference paths --------------------------------------------------------------------------


def _pil_processor(settings: dict[str, Any]) -> Any:
    """The transformers image processor of saved ``settings``, its PIL backend (LLaVA's numbers)."""
    import transformers

    name = str(settings.get("image_processor_type") or "CLIPImageProcessor").removesuffix("Fast")
    cls = getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)
    kwargs = {k: v for k, v in settings.items() if k not in ("image_processor_type", "processor_class")}
    return cls(**kwargs)


def _reference_tower(resolved: ResolvedModel) -> Any:
    """The full ``CLIPVisionModel`` (float32, CPU, eager attention) with the checkpoint's tower weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if not resolved.tower_in_checkpoint:
        return CLIPVisionModel.from_pretrained(
            resolved.vision_tower, dtype=torch.float32, attn_implementation="eager"
        ).eval()
    config = CLIPVisionConfig(**{k: v for k, v in resolved.vision_config.items() if k != "model_type"})
    model = CLIPVisionModel._from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    prefixes = (
        ("model.vision_tower.vision_tower.",)
        if resolved.format == "llava"
        else ("model.vision_tower.", "vision_tower.")
    )
    tensors, _ = read_tensors(CheckpointSource(str(resolved.checkpoint)), prefixes)
    model.load_state_dict(tower_state(tensors, prefixes, set(model.state_dict())), strict=True)
    return model


def _select(hidden_states: Any, resolved: ResolvedModel) -> torch.Tensor:
    layers = resolved.select_layers
    features = (
        torch.cat([hidden_states[i] for i in layers], dim=-1) if len(layers) > 1 else hidden_states[layers[0]]
    )
    return features[:, 1:] if resolved.select_feature == "patch" else features


class _LlavaReference:
    """LLaVA's own path (original layout, bare CLIP): ``process_images`` + tower + projector (+ packing)."""

    name = "LLaVA's process_images + CLIPVisionModel(output_hidden_states) + projector"

    def __init__(self, encoder: FeatureEncoder) -> None:
        self.resolved = resolved = encoder.resolved
        self.processor = _pil_processor(resolved.image_processor)
        self.tower = _reference_tower(resolved)
        self.projector = build_vision_projector(
            {
                "mm_projector_type": resolved.projector_type,
                "mm_hidden_size": resolved.mm_hidden_size,
                "hidden_size": resolved.hidden_size,
            }
        )
        self.projector.load_state_dict({k: v.float() for k, v in encoder.projector.state_dict().items()})
        self.projector.eval()
        self.newline = encoder.image_newline.float().cpu() if encoder.image_newline is not None else None
        self.encoder = encoder

    def pixels(self, image: Image.Image) -> tuple[torch.Tensor, AnyresGrid | None]:
        """``llava/mm_utils.py: process_images`` for one image."""
        resolved, processor = self.resolved, self.processor
        background = tuple(int(x * 255) for x in processor.image_mean)
        if resolved.image_aspect_ratio == "pad":
            width, height = image.size
            side = max(width, height)
            square = Image.new(image.mode, (side, side), background)
            square.paste(image, ((side - width) // 2, (side - height) // 2))
            return processor.preprocess(square, return_tensors="pt")["pixel_values"], None
        if resolved.image_aspect_ratio == "anyres":
            tile = processor.crop_size["height"]
            grid = grid_for(image.size, resolved.image_grid_pinpoints, tile)
            target_w, target_h = grid.canvas
            scale_w, scale_h = target_w / image.width, target_h / image.height
            if scale_w < scale_h:
                size = (target_w, min(math.ceil(image.height * scale_w), target_h))
            else:
                size = (min(math.ceil(image.width * scale_h), target_w), target_h)
            canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
            canvas.paste(image.resize(size), ((target_w - size[0]) // 2, (target_h - size[1]) // 2))
            patches = [
                canvas.crop((left, top, left + tile, top + tile))
                for top in range(0, target_h, tile)
                for left in range(0, target_w, tile)
            ]
            base = image.resize((processor.size["shortest_edge"],) * 2)
            tiles = [
                processor.preprocess(t, return_tensors="pt")["pixel_values"][0] for t in [base, *patches]
            ]
            return torch.stack(tiles), grid
        return processor(image, return_tensors="pt")["pixel_values"], None

    @torch.no_grad()
    def __call__(self, data: bytes) -> np.ndarray:
        image = Image.open(io.BytesIO(data)).convert("RGB")  # LLaVA's loader
        pixels, grid = self.pixels(image)
        out = self.tower(pixels, output_hidden_states=True)
        features = self.projector(_select(out.hidden_states, self.resolved))
        if grid is None:
            return features[0].numpy()
        if self.encoder.anyres_output == "tiles":
            return features.numpy()
        r = self.resolved
        packed = pack_tiles(
            features,
            grid,
            merge_type=r.patch_merge_type,
            image_newline=self.newline,
            rounding=r.unpad_rounding,
            anyres_max=r.anyres_max,
        )
        return packed.numpy()


class _TransformersReference:
    """transformers' own classes (llava-hf layouts): the image processor + ``Llava(Next)Model``."""

    name = "transformers' image processor + Llava(Next)Model.get_image_features"

    def __init__(self, encoder: FeatureEncoder) -> None:
        from transformers import AutoConfig

        self.resolved = resolved = encoder.resolved
        source = CheckpointSource(str(resolved.checkpoint))
        self.processor = _pil_processor(resolved.image_processor)
        config = AutoConfig.from_pretrained(str(source.root))
        config.text_config.num_hidden_layers = 1  # the language model is never run: keep it small
        config.text_config.vocab_size = 8
        config.text_config.intermediate_size = 8
        self.next = config.model_type == "llava_next"
        import transformers

        model_class = transformers.LlavaNextModel if self.next else transformers.LlavaModel
        model = model_class._from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
        state = {}
        prefixes = ("model.vision_tower.", "vision_tower.")
        tensors, _ = read_tensors(source, prefixes)
        state.update(
            {
                f"vision_tower.{k}": v
                for k, v in tower_state(tensors, prefixes, set(model.vision_tower.state_dict())).items()
            }
        )
        prefixes = ("model.multi_modal_projector.", "multi_modal_projector.")
        tensors, _ = read_tensors(source, prefixes)
        state.update({f"multi_modal_projector.{k.split('projector.', 1)[1]}": v for k, v in tensors.items()})
        if self.next:
            tensors, _ = read_tensors(source, ("model.image_newline", "image_newline"))
            state["image_newline"] = next(iter(tensors.values()))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("language_model.")]
        if missing or unexpected:
            raise ConfigError(
                f"the reference model did not take the checkpoint's weights: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
        self.model = model
        self.encoder = encoder

    @torch.no_grad()
    def __call__(self, data: bytes) -> np.ndarray:
        image = Image.open(io.BytesIO(data))  # as given to the processor: it converts (do_convert_rgb)
        image.load()
        inputs = self.processor(images=[image], return_tensors="pt")
        layer = self.resolved.select_layer
        layer = list(layer) if isinstance(layer, tuple) else layer
        strategy = "default" if self.resolved.select_feature == "patch" else "full"
        if not self.next:
            out = self.model.get_image_features(
                pixel_values=inputs["pixel_values"],
                vision_feature_layer=layer,
                vision_feature_select_strategy=strategy,
                output_hidden_states=True,
            )
            return out.pooler_output[0].numpy()
        if self.encoder.anyres_output == "packed":
            out = self.model.get_image_features(
                pixel_values=inputs["pixel_values"],
                image_sizes=inputs["image_sizes"],
                vision_feature_layer=layer,
                vision_feature_select_strategy=strategy,
                output_hidden_states=True,
            )
            return out.pooler_output[0].numpy()
        tiles = inputs["pixel_values"][0]
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        count = image_size_to_num_patches(
            inputs["image_sizes"][0],
            self.model.config.image_grid_pinpoints,
            self.model.config.vision_config.image_size,
        )
        hidden = self.model.vision_tower(tiles[:count], output_hidden_states=True).hidden_states
        return self.model.multi_modal_projector(_select(hidden, self.resolved)).numpy()


# -- the comparison -------------------------------------------------------------------------------


def _features(encoder: FeatureEncoder, data: bytes, name: str) -> np.ndarray:
    batch = encoder.encode_prepared([encoder.encode_pre(data, name)], pooled=False, features="projected")
    row = batch.projected[0]
    if batch.dtype == "bfloat16":
        row = (row.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(row, dtype=np.float32)


def verify(
    config: Config, images: dict[str, bytes], *, resolved: ResolvedModel | None = None
) -> VerifyReport:
    """Compare our features with the checkpoint's reference path on ``images`` (see the module docstring)."""
    resolved = resolved or resolve_model(config.model)
    exact = replace(
        config,
        model=replace(config.model, dtype="float32", device="cpu", compile=False),
        encoder=replace(config.encoder, output_dtype="float32", features="projected"),
    )
    ours32 = FeatureEncoder(exact, resolved)
    compute = resolve_dtype(config.model.dtype, resolve_device(config.model.device))
    configured = None
    if compute != torch.float32:
        configured = FeatureEncoder(
            replace(config, encoder=replace(config.encoder, features="projected")), resolved
        )
    reference = _TransformersReference(ours32) if resolved.format == "llava-hf" else _LlavaReference(ours32)
    report = VerifyReport(
        layout=resolved.format, reference=reference.name, compute_dtype=str(compute).removeprefix("torch.")
    )
    for name, data in images.items():
        check = ImageCheck(name)
        report.checks.append(check)
        try:
            decode_image(data, name, config.decode)
            ref = reference(data)
            got = _features(ours32, data, name)
        except DecodeError as exc:
            check.error = f"{exc.code}: {exc.message}"
            continue
        check.shape = tuple(got.shape)
        if got.shape != ref.shape:
            check.error = f"shape {got.shape} but the reference has {ref.shape}"
            continue
        diff = got.astype(np.float64) - ref.astype(np.float64)
        check.max_abs = float(np.abs(diff).max()) if diff.size else 0.0
        check.rel_error = float(np.linalg.norm(diff) / max(np.linalg.norm(ref.astype(np.float64)), 1e-30))
        if configured is not None:
            half = _features(configured, data, name).astype(np.float64)
            check.dtype_rel_error = float(
                np.linalg.norm(half - ref) / max(np.linalg.norm(ref.astype(np.float64)), 1e-30)
            )
    return report
