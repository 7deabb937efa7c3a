"""Reading checkpoints: where their files are, their tensors (only what is asked for), digests.

A :class:`CheckpointSource` is a local directory or a model id served from the local Hugging Face
cache (never the hub unless ``local_files_only`` is off). :func:`read_tensors` opens only the
weight files that hold the requested names (through the shard index); safetensors first, ``.bin``
through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..constants import PROCESSOR_FILES, image_processor_settings
from ..errors import CheckpointError, ErrorCode, MissingWeightError, ShapeMismatchError

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointSource",
    "digest_tensors",
    "image_processor_dict",
    "load_state_strict",
    "read_tensors",
    "read_weight_files",
    "strip_prefix",
    "vision_config_dict",
]

_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})(/|$)")


class CheckpointSource:
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
    source: CheckpointSource, prefixes: tuple[str, ...], *, extra_files: Iterable[str] = ()
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
            return read_weight_files(files, wanted), files  # type: ignore[arg-type]
        path = source.file(single)
        if path is not None:
            return read_weight_files([path], wanted), [path]
    for name in extra_files:
        path = source.file(name)
        if path is not None:
            return read_weight_files([path], wanted), [path]
    raise CheckpointError(
        f"No weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json]) in {source.name!r}",
        code=ErrorCode.CHECKPOINT_NOT_FOUND,
    )


def read_weight_files(files: list[Path], wanted: Any) -> dict[str, torch.Tensor]:
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


def image_processor_dict(source: CheckpointSource) -> dict[str, Any]:
    """The image processor settings saved with a checkpoint: ``preprocessor_config.json``
    (transformers 4, flat) or ``processor_config.json`` (transformers 5, nested under ``image_processor``)."""
    for name in PROCESSOR_FILES:
        path = source.file(name)
        if path is not None:
            return image_processor_settings(json.loads(path.read_text()))
    raise CheckpointError(
        f"No image processor settings ({' or '.join(PROCESSOR_FILES)}) in {source.name!r}",
        code=ErrorCode.CHECKPOINT_NOT_FOUND,
    )


def vision_config_dict(cfg: dict[str, Any]) -> dict[str, Any]:
    """The CLIP vision config of a ``config.json`` (its ``vision_config``, or itself); only CLIP is supported."""
    vc = dict(cfg.get("vision_config", cfg))
    if vc.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
        raise CheckpointError(
            f"Unsupported vision tower type {vc.get('model_type')!r}: only CLIP is supported"
        )
    return vc
