"""Checkpoint resolution and loading for the three supported layouts.

- ``llava``: an original LLaVA checkpoint. ``config.json`` names the CLIP tower
  (``mm_vision_tower``) and the projector (``mm_projector_type``, ``mm_hidden_size``,
  ``hidden_size``); projector weights are ``model.mm_projector.*`` inside the (sharded)
  ``*.safetensors``/``*.bin`` files, or a standalone ``mm_projector.bin``. The shard index is
  used so that only the shards holding projector weights are opened: the language model's
  weights are never read.
- ``llava-hf``: a ``LlavaForConditionalGeneration`` checkpoint (``vision_config``,
  ``vision_feature_layer``, ``vision_feature_select_strategy``, ``multi_modal_projector``); the
  vision tower's weights are read out of the checkpoint's shards.
- ``clip``: a bare CLIP vision model plus projector settings (and optional projector weights)
  given in the configuration.

Resolution (:func:`resolve_model`) reads configs and computes weight digests without building
any module, so a job driver can fingerprint a run cheaply; :func:`load_model_modules` builds the
tower and projector from the resolved description (on an encoder actor or replica).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelConfig, validate_projector_type
from .errors import CheckpointError, ErrorCode, MissingWeightError, ShapeMismatchError
from .projector import build_vision_projector
from .tower import CLIPVisionTower, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

FORMATS = ("llava", "llava-hf", "clip")
_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})(/|$)")
_LLAVA_PROJECTOR_PREFIXES = ("model.mm_projector.", "mm_projector.")
_HF_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
_HF_TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.")
_HF_PROJECTOR_RENAME = {"linear_1": "0", "linear_2": "2"}


# -- locating files ---------------------------------------------------------------------------


class _Source:
    """A checkpoint location: a local directory, or a model id served from the HF cache."""

    def __init__(self, name: str, local_files_only: bool = True) -> None:
        self.name = name
        self.local_files_only = local_files_only
        path = Path(name).expanduser()
        self.local_dir: Path | None = path.resolve() if path.is_dir() else None
        if self.local_dir is None and (path.exists() or name.startswith((".", "/", "~"))):
            raise CheckpointError(
                f"Checkpoint path {name!r} is not a directory", code=ErrorCode.CHECKPOINT_NOT_FOUND
            )
        if self.file("config.json") is None:
            where = "directory" if self.local_dir else "model id (looked up in the local HF cache)"
            raise CheckpointError(
                f"No config.json found for {where} {name!r}", code=ErrorCode.CHECKPOINT_NOT_FOUND
            )

    def file(self, filename: str) -> Path | None:
        """Local path of ``filename`` in this checkpoint, or None when it has no such file."""
        if self.local_dir is not None:
            candidate = self.local_dir / filename
            return candidate if candidate.is_file() else None
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(self.name, filename, local_files_only=self.local_files_only))
        except Exception:  # missing from the cache / the repo: the caller decides what is required
            return None

    @property
    def root(self) -> Path:
        return self.local_dir if self.local_dir is not None else self.file("config.json").parent  # type: ignore[union-attr]

    @property
    def revision(self) -> str | None:
        match = _SNAPSHOT.search(str(self.file("config.json")))
        return match.group(1) if match else None

    def json(self, filename: str) -> dict[str, Any]:
        path = self.file(filename)
        if path is None:
            raise CheckpointError(
                f"{filename} not found in {self.name!r}", code=ErrorCode.CHECKPOINT_NOT_FOUND
            )
        return json.loads(path.read_text())


def read_tensors(
    source: _Source, prefixes: tuple[str, ...], *, extra_files: Iterable[str] = ()
) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """Tensors whose names start with one of ``prefixes`` (``""`` matches all), and the weight
    files that were opened. Safetensors first; ``.bin`` through ``torch.load(weights_only=True)``.
    With a shard index, only the shards that hold matching names are opened."""

    def wanted(key: str) -> bool:
        return any(key.startswith(p) for p in prefixes)

    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = source.file(index_name)
        if index is not None:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            shards = sorted({shard for key, shard in weight_map.items() if wanted(key)})
            files = [source.file(s) for s in shards]
            missing = [s for s, f in zip(shards, files, strict=True) if f is None]
            if missing:
                raise CheckpointError(
                    f"Shard(s) {missing} listed in {index_name} are missing from {source.name!r}"
                )
            return _read_files(files, wanted), files  # type: ignore[arg-type]
        path = source.file(single)
        if path is not None:
            return _read_files([path], wanted), [path]
    for name in extra_files:
        path = source.file(name)
        if path is not None:
            return _read_files([path], wanted), [path]
    raise CheckpointError(
        f"No weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json]) in {source.name!r}",
        code=ErrorCode.CHECKPOINT_NOT_FOUND,
    )


def _read_files(files: list[Path], wanted: Any) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if wanted(key):
                        tensors[key] = f.get_tensor(key)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            tensors.update({k: v for k, v in state.items() if wanted(k)})
    return tensors


def strip_prefix(tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Drop the first matching prefix from every name."""
    out = {}
    for key, value in tensors.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out[key] = value
    return out


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``module``; a missing, unexpected or mis-shaped key is a clear error."""
    expected = module.state_dict()
    for key, param in expected.items():
        if key not in state:
            raise MissingWeightError(
                f"{what}: missing weight {key!r} (expected shape {tuple(param.shape)}); found keys: "
                f"{sorted(state)[:8]}{' ...' if len(state) > 8 else ''}"
            )
        if tuple(state[key].shape) != tuple(param.shape):
            raise ShapeMismatchError(
                f"{what}: weight {key!r} has shape {tuple(state[key].shape)}, expected {tuple(param.shape)}"
            )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{what}: unexpected weight(s) {unexpected[:8]} for this model configuration")
    module.load_state_dict(state)


def digest_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes, in name order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# -- resolution -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedModel:
    """Everything needed to build the encoder and to fingerprint its outputs (picklable)."""

    format: str
    """``llava``, ``llava-hf`` or ``clip``."""
    checkpoint: str | None
    """The checkpoint directory or id (None for ``clip``)."""
    vision_tower: str
    """Where the CLIP tower is loaded from (a directory or id; the checkpoint for llava-hf)."""
    tower_revision: str | None
    """Commit of the tower in the HF cache, when loaded from there."""
    tower_sha256: str
    """Digest of the tower's stored weights."""
    select_layer: int
    """Hidden layer the features are taken from."""
    select_feature: str
    """``patch`` or ``cls_patch``."""
    projector_type: str
    """``linear``, ``mlp{N}x_gelu`` or ``identity``."""
    mm_hidden_size: int
    """Projector input width (the tower's hidden size)."""
    hidden_size: int | None
    """Projector output width (None for identity)."""
    projector_sha256: str
    """Digest of the projector's stored weights (of nothing, for identity)."""
    projector_weights: str | None
    """Where the projector weights are read from: the checkpoint, a file, or None (identity)."""
    image_aspect_ratio: str
    """``pad``, ``square`` or ``crop``."""
    image_processor: dict[str, Any] = field(compare=False)
    """The tower's CLIPImageProcessor settings (size, crop, mean, std, resample)."""
    vision_config: dict[str, Any] = field(compare=False)
    """The tower's CLIPVisionConfig as a dict."""
    image_size: int = 0
    """Input resolution of the tower."""
    patch_size: int = 0
    """Patch size of the tower."""

    @property
    def num_tokens(self) -> int:
        n = (self.image_size // self.patch_size) ** 2
        return n + (1 if self.select_feature == "cls_patch" else 0)

    @property
    def feature_dim(self) -> int:
        return self.mm_hidden_size if self.projector_type == "identity" else int(self.hidden_size or 0)

    def describe(self) -> dict[str, Any]:
        """JSON-able description (what outputs record)."""
        out = asdict(self)
        out.pop("vision_config")
        return out


def detect_format(source: _Source) -> str:
    cfg = source.json("config.json")
    if "mm_vision_tower" in cfg:
        return "llava"
    if "vision_config" in cfg and (cfg.get("model_type") == "llava" or "vision_feature_layer" in cfg):
        return "llava-hf"
    if cfg.get("model_type") in ("clip_vision_model", "clip"):
        return "clip"
    raise CheckpointError(
        f"Cannot tell the format of {source.name!r}: its config.json has none of 'mm_vision_tower' "
        "(LLaVA), 'vision_config' + 'vision_feature_layer' (llava-hf) or model_type 'clip_vision_model'"
    )


def _image_processor_dict(source: _Source) -> dict[str, Any]:
    path = source.file("preprocessor_config.json")
    if path is None:
        raise CheckpointError(
            f"No preprocessor_config.json (CLIPImageProcessor settings) in {source.name!r}",
            code=ErrorCode.CHECKPOINT_NOT_FOUND,
        )
    return json.loads(path.read_text())


def _vision_config_dict(cfg: dict[str, Any]) -> dict[str, Any]:
    vc = dict(cfg.get("vision_config", cfg))
    if vc.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
        raise CheckpointError(
            f"Unsupported vision tower type {vc.get('model_type')!r}: only CLIP is supported"
        )
    return vc


def _pick(override: Any, *values: Any) -> Any:
    if override is not None:
        return override
    for value in values:
        if value is not None:
            return value
    return None


def _tower_digest(source: _Source) -> str:
    tensors, _ = read_tensors(source, ("",))
    return digest_tensors({k: v for k, v in tensors.items() if not k.startswith(("text_", "logit_scale"))})


def _resolve_tower_source(name: str, base: _Source | None, local_files_only: bool) -> _Source:
    """A relative tower path in a checkpoint's config is resolved against the checkpoint folder."""
    if base is not None and base.local_dir is not None and not Path(name).is_absolute():
        candidate = base.local_dir / name
        if candidate.is_dir():
            return _Source(str(candidate), local_files_only)
    return _Source(name, local_files_only)


def _projector_state(
    resolved_type: str, source: _Source | None, weights_file: str | None, fmt: str
) -> tuple[dict[str, torch.Tensor], str | None]:
    if resolved_type == "identity":
        return {}, None
    if fmt == "llava-hf":
        assert source is not None
        tensors, _ = read_tensors(source, _HF_PROJECTOR_PREFIXES)
        state = {}
        for key, value in strip_prefix(tensors, _HF_PROJECTOR_PREFIXES).items():
            layer, _, rest = key.partition(".")
            state[f"{_HF_PROJECTOR_RENAME.get(layer, layer)}.{rest}"] = value
        return state, source.name
    if weights_file is not None:
        path = Path(weights_file)
        if not path.is_file():
            raise CheckpointError(
                f"Projector weights file {weights_file!r} not found", code=ErrorCode.CHECKPOINT_NOT_FOUND
            )
        return strip_prefix(_read_files([path], lambda k: True), _LLAVA_PROJECTOR_PREFIXES), str(path)
    if source is None:
        raise CheckpointError(
            f"Projector {resolved_type!r} needs weights: set model.projector_weights (mm_projector.bin or "
            ".safetensors) or use projector_type 'identity'"
        )
    try:
        tensors, _ = read_tensors(source, _LLAVA_PROJECTOR_PREFIXES)
    except CheckpointError:
        tensors = {}
    if not tensors:
        standalone = source.file("mm_projector.bin") or source.file("mm_projector.safetensors")
        if standalone is None:
            raise MissingWeightError(
                f"No projector weights (model.mm_projector.*) in {source.name!r} and no mm_projector.bin beside it"
            )
        tensors = _read_files([standalone], lambda k: True)
    return strip_prefix(tensors, _LLAVA_PROJECTOR_PREFIXES), source.name


def _infer_hidden_size(state: dict[str, torch.Tensor]) -> int | None:
    for key in ("weight", "0.weight"):
        if key in state:
            return int(state[key].shape[0])
    return None


def resolve_model(cfg: ModelConfig) -> ResolvedModel:
    """Read the checkpoint's configuration and weight digests; build no module."""
    lfo = cfg.local_files_only
    source: _Source | None = None
    ckpt: dict[str, Any] = {}
    if cfg.checkpoint:
        source = _Source(cfg.checkpoint, lfo)
        fmt = detect_format(source)
        ckpt = source.json("config.json")
    elif cfg.vision_tower:
        fmt = "clip"
    else:
        raise CheckpointError(
            "No model given: set model.checkpoint (a LLaVA or llava-hf checkpoint) or model.vision_tower "
            "(a CLIP vision model) in the config, or pass --model",
            code=ErrorCode.CHECKPOINT_NOT_FOUND,
        )
    if fmt == "clip" and source is not None and not cfg.vision_tower:
        tower_source = source
        source = None
    elif fmt == "llava-hf" and not cfg.vision_tower:
        tower_source = source  # type: ignore[assignment]
    else:
        tower_name = cfg.vision_tower or ckpt.get("mm_vision_tower")
        tower_source = _resolve_tower_source(tower_name, source, lfo)

    if fmt == "llava-hf":
        layer = ckpt.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise CheckpointError(f"vision_feature_layer={layer!r}: only a single layer is supported")
        strategy = ckpt.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise CheckpointError(
                f"Unknown vision_feature_select_strategy {strategy!r} (expected 'default' or 'full')"
            )
        act = ckpt.get("projector_hidden_act", "gelu")
        if act != "gelu":
            raise CheckpointError(f"projector_hidden_act={act!r}: only 'gelu' (mlp2x_gelu) is supported")
        vision_cfg = _vision_config_dict(ckpt)
        defaults = {
            "select_layer": layer,
            "select_feature": "patch" if strategy == "default" else "cls_patch",
            "projector_type": "mlp2x_gelu",
            "mm_hidden_size": vision_cfg.get("hidden_size"),
            "hidden_size": (ckpt.get("text_config") or {}).get("hidden_size"),
            "image_aspect_ratio": ckpt.get("image_aspect_ratio", "crop"),
        }
    else:
        vision_cfg = _vision_config_dict(tower_source.json("config.json"))
        defaults = {
            "select_layer": ckpt.get("mm_vision_select_layer", -2),
            "select_feature": ckpt.get("mm_vision_select_feature", "patch"),
            "projector_type": ckpt.get("mm_projector_type", "linear" if fmt == "llava" else "identity"),
            "mm_hidden_size": ckpt.get("mm_hidden_size", vision_cfg.get("hidden_size")),
            "hidden_size": ckpt.get("hidden_size"),
            "image_aspect_ratio": ckpt.get("image_aspect_ratio", "pad" if fmt == "llava" else "crop"),
        }
    settings = {key: _pick(getattr(cfg, key), value) for key, value in defaults.items()}
    validate_projector_type(settings["projector_type"])
    if settings["image_aspect_ratio"] not in ("pad", "square", "crop"):
        raise CheckpointError(
            f"image_aspect_ratio {settings['image_aspect_ratio']!r} is not supported (pad, square, crop)"
        )
    if settings["select_feature"] not in ("patch", "cls_patch"):
        raise CheckpointError(f"Unexpected select feature: {settings['select_feature']!r}")

    proj_state, proj_from = _projector_state(
        settings["projector_type"], source if fmt != "clip" else None, cfg.projector_weights, fmt
    )
    if settings["hidden_size"] is None and settings["projector_type"] != "identity":
        settings["hidden_size"] = _infer_hidden_size(proj_state)
    # Check the weights fit the configured projector now, on the driver, not later on an actor.
    if settings["projector_type"] != "identity":
        probe = build_vision_projector(
            {
                "mm_projector_type": settings["projector_type"],
                "mm_hidden_size": settings["mm_hidden_size"],
                "hidden_size": settings["hidden_size"],
            }
        )
        load_state_strict(probe, proj_state, f"projector {settings['projector_type']} from {proj_from}")

    if fmt == "llava-hf" and tower_source is source:
        tensors, _ = read_tensors(tower_source, _HF_TOWER_PREFIXES)
        tower_sha = digest_tensors(strip_prefix(tensors, _HF_TOWER_PREFIXES))
        image_processor = _image_processor_dict(tower_source)
    else:
        tower_sha = _tower_digest(tower_source)
        image_processor = _image_processor_dict(tower_source)

    return ResolvedModel(
        format=fmt,
        checkpoint=cfg.checkpoint if fmt != "clip" or cfg.vision_tower else None,
        vision_tower=str(tower_source.root) if tower_source.local_dir else tower_source.name,
        tower_revision=tower_source.revision,
        tower_sha256=tower_sha,
        select_layer=int(settings["select_layer"]),
        select_feature=settings["select_feature"],
        projector_type=settings["projector_type"],
        mm_hidden_size=int(settings["mm_hidden_size"]),
        hidden_size=None if settings["hidden_size"] is None else int(settings["hidden_size"]),
        projector_sha256=digest_tensors(proj_state),
        projector_weights=proj_from,
        image_aspect_ratio=settings["image_aspect_ratio"],
        image_processor=image_processor,
        vision_config=vision_cfg,
        image_size=int(vision_cfg.get("image_size", 224)),
        patch_size=int(vision_cfg.get("patch_size", 32)),
    )


# -- building ---------------------------------------------------------------------------------


def load_model_modules(
    resolved: ResolvedModel,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    attn_implementation: str = "sdpa",
    local_files_only: bool = True,
) -> tuple[CLIPVisionTower, nn.Module]:
    """Build the tower and the projector described by ``resolved``, on ``device`` in ``dtype``."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    args = {
        "mm_vision_select_layer": resolved.select_layer,
        "mm_vision_select_feature": resolved.select_feature,
    }
    if (
        resolved.format == "llava-hf"
        and resolved.checkpoint
        and resolved.vision_tower
        in (
            resolved.checkpoint,
            str(Path(resolved.checkpoint).resolve())
            if Path(resolved.checkpoint).is_dir()
            else resolved.checkpoint,
        )
    ):
        tower = _tower_from_llava_hf(resolved, args, dt, dev, attn_implementation, local_files_only)
    else:
        tower = CLIPVisionTower(
            resolved.vision_tower,
            args,
            dtype=dt,
            device=dev,
            attn_implementation=attn_implementation,
            local_files_only=local_files_only,
        )
    projector = build_vision_projector(
        {
            "mm_projector_type": resolved.projector_type,
            "mm_hidden_size": resolved.mm_hidden_size,
            "hidden_size": resolved.hidden_size,
        }
    )
    if resolved.projector_type != "identity":
        source = (
            _Source(resolved.checkpoint, local_files_only)
            if resolved.projector_weights == resolved.checkpoint and resolved.checkpoint
            else None
        )
        state, _ = _projector_state(
            resolved.projector_type, source, None if source else resolved.projector_weights, resolved.format
        )
        load_state_strict(projector, state, f"projector from {resolved.projector_weights}")
    projector.requires_grad_(False)
    projector.eval()
    projector.to(device=dev, dtype=dt)
    return tower, projector


def _tower_from_llava_hf(
    resolved: ResolvedModel,
    args: dict[str, Any],
    dtype: torch.dtype,
    device: torch.device,
    attn: str,
    lfo: bool,
) -> CLIPVisionTower:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from .tower import image_processor_class

    source = _Source(resolved.checkpoint, lfo)  # type: ignore[arg-type]
    vision_cfg = CLIPVisionConfig(**{k: v for k, v in resolved.vision_config.items() if k != "model_type"})
    model = CLIPVisionModel._from_config(vision_cfg, attn_implementation=attn, dtype=torch.float32)
    tensors, _ = read_tensors(source, _HF_TOWER_PREFIXES)
    state = strip_prefix(tensors, _HF_TOWER_PREFIXES)
    expected = set(model.state_dict())
    fixed = {}
    for key, value in state.items():
        if (
            key not in expected
            and key.startswith("vision_model.")
            and key[len("vision_model.") :] in expected
        ):
            key = key[len("vision_model.") :]
        elif key not in expected and f"vision_model.{key}" in expected:
            key = f"vision_model.{key}"
        fixed[key] = value
    fixed = {k: v for k, v in fixed.items() if not k.endswith("position_ids") or k in expected}
    load_state_strict(model, fixed, f"vision tower from {resolved.checkpoint}")
    model.to(device=device, dtype=dtype)
    processor = (
        image_processor_class().from_dict(resolved.image_processor) if resolved.image_processor else None
    )
    return CLIPVisionTower.from_model(model, args, processor, name=str(resolved.checkpoint))
