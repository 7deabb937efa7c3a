"""The references the tests compare the product against, written from LLaVA's own definitions.

Never imports the product (``pipeline``/``deployments``): a mistake in the product cannot hide
behind a shared helper. Each function names the upstream code it follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

OPENAI_CLIP_MEAN = [
    0.48145466,
    0.4578275,
    0.40821073,
]  # openai/clip-vit-large-patch14-336 preprocessor_config.json
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def reference_processor(size: int = 336, crop_size: int | None = None) -> Any:
    """The CLIP image processor LLaVA uses, built in code (no download).

    ``CLIPImageProcessor(...)``; when torchvision is installed transformers 5 returns its
    torchvision backend, whose bicubic resize differs from PIL's, so the PIL backend
    (``CLIPImageProcessorPil``) is built then: what ``CLIPImageProcessor`` is without torchvision and
    what LLaVA was trained with.
    """
    from transformers import CLIPImageProcessor

    crop = size if crop_size is None else crop_size
    kwargs = {
        "size": {"shortest_edge": size},
        "crop_size": {"height": crop, "width": crop},
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "do_convert_rgb": True,
    }
    processor = CLIPImageProcessor(**kwargs)
    if getattr(processor, "backend", "pil") != "pil":
        from transformers import CLIPImageProcessorPil

        processor = CLIPImageProcessorPil(**kwargs)
    return processor


def expand2square(pil_img: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    """``llava/mm_utils.py: expand2square``."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def llava_reference(images: Sequence[Image.Image], processor: Any, aspect_ratio: str) -> torch.Tensor:
    """``llava/mm_utils.py: process_images`` for ``pad`` and the default (non-pad) path."""
    if aspect_ratio == "pad":
        background = tuple(int(x * 255) for x in processor.image_mean)
        out = [
            processor.preprocess(expand2square(img, background), return_tensors="pt")["pixel_values"][0]
            for img in images
        ]
        return torch.stack(out)
    return processor(list(images), return_tensors="pt").pixel_values


def seed_forward(model: Any, images: torch.Tensor, layer: int, feature: str) -> torch.Tensor:
    """``llava/model/multimodal_encoder/clip_encoder.py: CLIPVisionTower.forward`` + ``feature_select``:
    the full model with every hidden state, the selected one, CLS dropped for ``patch``."""
    out = model(images, output_hidden_states=True)
    feats = out.hidden_states[layer]
    return feats[:, 1:] if feature == "patch" else feats
