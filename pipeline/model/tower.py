"""``CLIPVisionTower``: LLaVA's CLIP vision encoder, computing only what the selected layer needs.

Same outputs as LLaVA's original tower (full model with ``output_hidden_states=True``, select a
layer, drop or keep CLS), with less work: the embeddings and only the encoder layers up to the
selected one run, SDPA attention by default, and a list of images is encoded in batches of equal
shapes instead of one call per image.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from .constants import SELECT_FEATURES, TORCH_DTYPE_NAMES, hidden_state_index
from .errors import ConfigError, ModelStateError

logger = logging.getLogger(__name__)

LIST_BATCH_SIZE = 64
"""Largest batch formed from a list input (equal shapes are stacked up to this many)."""

DTYPE_NAMES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in TORCH_DTYPE_NAMES}
"""``torch.dtype`` of each concrete compute/storage dtype name."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``/None → cuda when available, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``/None → bfloat16 on a GPU, float32 on a CPU; else the named dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ConfigError(
            f"Unknown dtype {dtype!r}; valid values are {sorted(DTYPE_NAMES)} or 'auto'"
        ) from None


def image_processor_class() -> type:
    """``transformers.CLIPImageProcessor``; without torchvision, the PIL backend it falls back to.

    transformers 5 resolves ``CLIPImageProcessor`` to ``CLIPImageProcessorPil`` when torchvision
    is missing, with a warning in every process that touches the name; taking the PIL class
    directly gives the same processor without the noise.
    """
    import importlib.util

    import transformers

    if importlib.util.find_spec("torchvision") is None:
        return transformers.CLIPImageProcessorPil
    return transformers.CLIPImageProcessor


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """transformers' progress bars ("Loading weights", "Writing model shards") off inside the block,
    as they were after it; its warnings and logs are untouched (every actor and replica loads the
    weights: one bar each would bury the job's own progress)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _arg(args: Any, key: str, default: Any = None) -> Any:
    if isinstance(args, dict):
        return args.get(key, default)
    return getattr(args, key, default)


class CLIPVisionTower(nn.Module):
    """LLaVA's CLIP vision tower.

    Args:
        vision_tower: a local directory or a model id (served from the local HF cache) holding a
            ``CLIPVisionModel`` and its ``CLIPImageProcessor``.
        args: any object (or dict) with ``mm_vision_select_layer`` and optionally
            ``mm_vision_select_feature`` (``patch`` drops CLS, ``cls_patch`` keeps it) and
            ``unfreeze_mm_vision_tower``.
        delay_load: keep only the config (``cfg_only``) until :meth:`load_model`, unless
            ``args.unfreeze_mm_vision_tower`` is set.
        dtype, device: where and in what precision the tower computes (default: bfloat16 on a
            GPU, float32 on a CPU).
        attn_implementation: ``sdpa`` (default) or ``eager``.
        local_files_only: never reach a model hub for ids (the default).
    """

    def __init__(
        self,
        vision_tower: str,
        args: Any,
        delay_load: bool = False,
        *,
        dtype: str | torch.dtype | None = "auto",
        device: str | torch.device | None = "auto",
        attn_implementation: str = "sdpa",
        local_files_only: bool = True,
    ) -> None:
        super().__init__()
        device = resolve_device(device)
        self._setup(
            vision_tower, args, device, resolve_dtype(dtype, device), attn_implementation, local_files_only
        )
        if not delay_load or _arg(args, "unfreeze_mm_vision_tower", False):
            self.load_model()
        else:
            self.cfg_only = CLIPVisionConfig.from_pretrained(
                self.vision_tower_name, local_files_only=local_files_only
            )

    # -- loading ---------------------------------------------------------------------------

    def load_model(self, device_map: Any = None) -> None:
        """Load the image processor and the vision model, and freeze the tower. Idempotent."""
        if self.is_loaded:
            logger.warning(
                "%s is already loaded, `load_model` called again, skipping.", self.vision_tower_name
            )
            return
        self.image_processor = image_processor_class().from_pretrained(
            self.vision_tower_name, local_files_only=self._local_files_only
        )
        model = CLIPVisionModel.from_pretrained(
            self.vision_tower_name,
            device_map=device_map,
            dtype=self._dtype,
            attn_implementation=self._attn_implementation,
            local_files_only=self._local_files_only,
        )
        if device_map is None:
            model = model.to(self._device)
        self._attach(model)

    @classmethod
    def from_model(
        cls,
        model: CLIPVisionModel,
        args: Any,
        image_processor: Any = None,
        *,
        name: str = "<in-memory>",
    ) -> CLIPVisionTower:
        """Wrap an already built ``CLIPVisionModel`` (e.g. read out of a llava-hf checkpoint)."""
        tower = cls.__new__(cls)
        nn.Module.__init__(tower)
        first = next(model.parameters())
        tower._setup(name, args, first.device, first.dtype, model.config._attn_implementation, True)
        tower.image_processor = image_processor
        tower._attach(model)
        return tower

    def _setup(
        self,
        name: str,
        args: Any,
        device: torch.device,
        dtype: torch.dtype,
        attn: str,
        local_files_only: bool,
    ) -> None:
        """State shared by both constructors: the selection (validated) and where to compute."""
        self.is_loaded = False
        self.vision_tower_name = name
        layer = _arg(args, "mm_vision_select_layer")
        # One layer (LLaVA), or several concatenated along the channels (transformers' llava classes).
        self.select_layer: int | tuple[int, ...] = (
            tuple(int(v) for v in layer) if isinstance(layer, list | tuple) else int(layer)
        )
        self.select_feature: str = _arg(args, "mm_vision_select_feature", "patch") or "patch"
        if self.select_feature not in SELECT_FEATURES:
            raise ConfigError(
                f"Unexpected select feature: {self.select_feature!r}; valid values are {SELECT_FEATURES}"
            )
        self._device, self._dtype = device, dtype
        self._attn_implementation = attn
        self._local_files_only = local_files_only

    def _attach(self, model: CLIPVisionModel) -> None:
        model.requires_grad_(False)
        model.eval()
        self.vision_tower = model
        core = getattr(model, "vision_model", model)  # transformers < 5 nests the modules
        layers = self.select_layer if isinstance(self.select_layer, tuple) else (self.select_layer,)
        try:
            self._indices = tuple(hidden_state_index(layer, len(core.encoder.layers)) for layer in layers)
        except ConfigError as exc:
            raise ConfigError(f"mm_vision_{exc.message}") from None
        self._core = core
        self._layers_needed = max(self._indices)  # hidden_states[index] is the output of layer index-1
        self.is_loaded = True

    @property
    def vision_core(self) -> nn.Module:
        """The ``CLIPVisionTransformer`` (embeddings, ``pre_layrnorm``, ``encoder.layers``) the tower runs."""
        return self._core

    @property
    def layers_used(self) -> list[nn.Module]:
        """The encoder layers the selected hidden state depends on (the ones :meth:`encode` runs)."""
        return list(self._core.encoder.layers[: self._layers_needed])

    # -- forward ----------------------------------------------------------------------------

    def feature_select(self, image_forward_outs: Any) -> torch.Tensor:
        """Seed-compatible selection: from model outputs with ``hidden_states``, or from the
        already selected hidden state (a tensor)."""
        if isinstance(image_forward_outs, torch.Tensor):
            image_features = image_forward_outs
        elif isinstance(self.select_layer, tuple):
            states = image_forward_outs.hidden_states
            image_features = torch.cat([states[layer] for layer in self.select_layer], dim=-1)
        else:
            image_features = image_forward_outs.hidden_states[self.select_layer]
        if self.select_feature == "patch":
            return image_features[:, 1:]
        if self.select_feature == "cls_patch":
            return image_features
        raise ConfigError(f"Unexpected select feature: {self.select_feature}")

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Selected features of a normalized ``(B,3,H,W)`` batch already on the tower's device and
        dtype, in the tower's dtype. Runs only the layers the selected one depends on."""
        core = self._core
        hidden = core.pre_layrnorm(core.embeddings(pixel_values))
        kept = {0: hidden} if 0 in self._indices else {}
        for index, layer in enumerate(core.encoder.layers[: self._layers_needed], start=1):
            out = layer(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out
            if index in self._indices:
                kept[index] = hidden
        if len(self._indices) == 1:
            return self.feature_select(hidden)
        return self.feature_select(torch.cat([kept[i] for i in self._indices], dim=-1))

    @torch.no_grad()
    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Features of a ``(B,3,H,W)`` batch (→ ``(B,N,D)``) or of a list of ``(3,H,W)`` images
        (→ a list of ``(1,N,D)``), each in its input's dtype."""
        if not self.is_loaded:
            raise ModelStateError(f"{self.vision_tower_name} is not loaded; call load_model() first")
        if isinstance(images, list):
            return self._forward_list(images)
        features = self.encode(images.to(device=self.device, dtype=self.dtype))
        return features.to(images.dtype)

    def _forward_list(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        groups: dict[tuple[tuple[int, ...], torch.dtype], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            groups[(tuple(image.shape), image.dtype)].append(i)
        results: list[torch.Tensor | None] = [None] * len(images)
        for (_, in_dtype), indices in groups.items():
            for start in range(0, len(indices), LIST_BATCH_SIZE):
                chunk = indices[start : start + LIST_BATCH_SIZE]
                batch = torch.stack([images[i] for i in chunk]).to(device=self.device, dtype=self.dtype)
                features = self.encode(batch).to(in_dtype)
                for row, i in enumerate(chunk):
                    results[i] = features[row : row + 1]
        return results  # type: ignore[return-value]

    # -- properties -------------------------------------------------------------------------

    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.dtype if self.is_loaded else self._dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.device if self.is_loaded else self._device

    @property
    def config(self) -> CLIPVisionConfig:
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2

    @property
    def num_tokens(self) -> int:
        """Tokens per image in the output: patches, plus one when CLS is kept."""
        return self.num_patches + (1 if self.select_feature == "cls_patch" else 0)
