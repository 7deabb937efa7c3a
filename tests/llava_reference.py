"""An independent numerical reference of LLaVA's and LLaVA-NeXT's image feature path, for tests.

Each function follows one upstream definition, named in its docstring:

* haotian-liu/LLaVA (LLaVA-1.5 / 1.6): ``llava/mm_utils.py``, ``llava/model/llava_arch.py``,
  ``llava/model/multimodal_encoder/clip_encoder.py``, ``llava/model/multimodal_projector/builder.py``;
* LLaVA-VL/LLaVA-NeXT (``llava/mm_utils.py`` at 4b2fe57, ``llava/model/llava_arch.py``): the string grid
  form ``"(1x1),...,(6x6)"`` and ``anyres_max_N``;
* transformers (``image_transforms.rescale`` / ``normalize``, ``get_resize_output_image_size``,
  ``center_crop``) for the arithmetic of the CLIP image processor that LLaVA calls.

Conventions are the ORIGINAL LLaVA ones, not transformers': an image size is PIL's ``(width, height)``
and a grid pinpoint is ``[width, height]`` (transformers' LLaVA-NeXT classes take ``(height, width)``
for both). The only deliberate departures from upstream are marked ``DEPARTURE``: none changes a
number, they let the same code run on transformers 5 processors and on tiny test towers.

Deliberately self-contained: numpy, torch, PIL and transformers' processors/models only. It must never
import the product (``pipeline``, ``deployments``): it is what the product is checked against.
"""

from __future__ import annotations

import ast
import math
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

# LLaVA-NeXT asserts the tower's input size is one of these before expanding a string grid form.
ALLOWED_ENCODER_SIZES = (224, 336, 384, 448, 512)


# --------------------------------------------------------------------------------------------------
# Grid pinpoints and tile selection (llava/mm_utils.py)
# --------------------------------------------------------------------------------------------------


def expand_grid_pinpoints(grid_pinpoints, patch_size: int, check_size: bool = True) -> list:
    """The pinpoint list a ``grid_pinpoints`` value stands for.

    LLaVA-VL/LLaVA-NeXT ``llava/mm_utils.py``: the ``isinstance(grid_pinpoints, str) and "x" in
    grid_pinpoints`` branch shared by ``get_anyres_image_grid_shape`` and ``process_anyres_image``
    (and ``llava/train/train.py``, which writes the expanded list into ``config.image_grid_pinpoints``).
    Only the FIRST and the LAST ``(AxB)`` of the string count: ``"(1x1),...,(6x6)"`` and
    ``"(1x1),(6x6)"`` both give every ``(i, j)`` for ``i`` in 1..6 (outer loop), ``j`` in 1..6, each
    multiplied by ``patch_size`` and read as ``[width, height]``. Any other string goes through
    ``ast.literal_eval`` (haotian-liu/LLaVA knows only that form); a list is used as it is.
    ``check_size=False`` skips upstream's ``patch_size in [224, 336, 384, 448, 512]`` assertion
    (DEPARTURE, for tiny test towers only).
    """
    if isinstance(grid_pinpoints, str) and "x" in grid_pinpoints:
        if check_size:
            assert patch_size in ALLOWED_ENCODER_SIZES, "patch_size should be in [224, 336, 384, 448, 512]"
        matches = re.findall(r"\((\d+)x(\d+)\)", grid_pinpoints)
        range_start = tuple(map(int, matches[0]))
        range_end = tuple(map(int, matches[-1]))
        grid = [
            (i, j)
            for i in range(range_start[0], range_end[0] + 1)
            for j in range(range_start[1], range_end[1] + 1)
        ]
        return [[dim * patch_size for dim in pair] for pair in grid]
    if isinstance(grid_pinpoints, list):
        return grid_pinpoints
    return ast.literal_eval(grid_pinpoints)


def select_best_resolution(original_size, possible_resolutions):
    """llava/mm_utils.py: ``select_best_resolution`` (identical in LLaVA and LLaVA-NeXT).

    ``original_size`` is ``(width, height)``, each candidate ``(width, height)``. The first candidate
    with the largest effective resolution wins; ties on it go to the least wasted area, and an exact tie
    on both keeps the EARLIER candidate (so the order of the list matters for small images).
    """
    original_width, original_height = original_size
    best_fit = None
    max_effective_resolution = 0
    min_wasted_resolution = float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective_resolution = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted_resolution = (width * height) - effective_resolution
        if effective_resolution > max_effective_resolution or (
            effective_resolution == max_effective_resolution and wasted_resolution < min_wasted_resolution
        ):
            max_effective_resolution = effective_resolution
            min_wasted_resolution = wasted_resolution
            best_fit = (width, height)
    return best_fit


def resize_and_pad_image(image: Image.Image, target_resolution) -> Image.Image:
    """llava/mm_utils.py: ``resize_and_pad_image``.

    Aspect-preserving resize with PIL's DEFAULT filter (``Image.resize`` without ``resample``: bicubic
    for RGB, whatever the processor's ``resample`` says), the free side ``min(ceil(side * scale),
    target)``, pasted centred (offset floored) on a black ``(0, 0, 0)`` RGB canvas.
    """
    original_width, original_height = image.size
    target_width, target_height = target_resolution
    scale_w = target_width / original_width
    scale_h = target_height / original_height
    if scale_w < scale_h:
        new_width = target_width
        new_height = min(math.ceil(original_height * scale_w), target_height)
    else:
        new_height = target_height
        new_width = min(math.ceil(original_width * scale_h), target_width)
    resized_image = image.resize((new_width, new_height))
    new_image = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    paste_x = (target_width - new_width) // 2
    paste_y = (target_height - new_height) // 2
    new_image.paste(resized_image, (paste_x, paste_y))
    return new_image


def divide_to_patches(image: Image.Image, patch_size: int) -> list[Image.Image]:
    """llava/mm_utils.py: ``divide_to_patches``: row-major ``patch_size`` squares (rows outer)."""
    patches = []
    width, height = image.size
    for i in range(0, height, patch_size):
        for j in range(0, width, patch_size):
            patches.append(image.crop((j, i, j + patch_size, i + patch_size)))
    return patches


def get_anyres_image_grid_shape(image_size, grid_pinpoints, patch_size: int, check_size: bool = True):
    """llava/mm_utils.py: ``get_anyres_image_grid_shape`` (LLaVA-NeXT version, string form included).

    ``image_size`` is ``(width, height)``; ``patch_size`` is the TOWER's input size (llava_arch.py
    passes ``vision_tower.image_size`` / ``vision_tower.config.image_size``), not the ViT patch.
    Returns ``(num_patch_width, num_patch_height)``: the tile grid.
    """
    possible_resolutions = expand_grid_pinpoints(grid_pinpoints, patch_size, check_size)
    width, height = select_best_resolution(image_size, possible_resolutions)
    return width // patch_size, height // patch_size


# --------------------------------------------------------------------------------------------------
# Preprocessing (llava/mm_utils.py) on top of the CLIP image processor LLaVA calls
# --------------------------------------------------------------------------------------------------


def _processor_shortest_edge(processor) -> int:
    """``shortest_edge`` as LLaVA-NeXT's ``process_anyres_image`` reads it.

    Upstream: ``processor.size["shortest_edge"] if isinstance(processor.size, dict) else
    min(processor.size)``. DEPARTURE: transformers 5 stores ``size`` as a ``SizeDict`` (not a ``dict``),
    on which upstream's ``min(...)`` returns a ``(key, value)`` pair; read the key wherever it exists.
    """
    size = processor.size
    if isinstance(size, dict) or "shortest_edge" in size:
        return size["shortest_edge"]
    return min(size)


def _processor_string_form_size(processor) -> int:
    """LLaVA-NeXT ``process_anyres_image``: ``processor.size[0]``, else ``processor.size["shortest_edge"]``."""
    try:
        return processor.size[0]  # SigLIP processors of LLaVA-NeXT carry a (384, 384) tuple
    except Exception:
        return processor.size["shortest_edge"]


def process_anyres_image(image: Image.Image, processor, grid_pinpoints, check_size: bool = True):
    """llava/mm_utils.py: ``process_anyres_image`` (LLaVA-NeXT version; the list form equals LLaVA-1.6's).

    Tiles ``[base, tile_0, ...]`` as a ``[1 + rows * cols, 3, crop, crop]`` tensor: the base image is
    the WHOLE image squashed to ``shortest_edge x shortest_edge`` (PIL default bicubic, aspect not kept),
    the tiles cut row-major from ``resize_and_pad_image`` at the best pinpoint; each goes through
    ``processor.preprocess`` on its own.
    """
    if isinstance(grid_pinpoints, str) and "x" in grid_pinpoints:
        grid_pinpoints = expand_grid_pinpoints(
            grid_pinpoints, _processor_string_form_size(processor), check_size
        )
    # a list as it is, any other string through ast.literal_eval (the multiplier is unused then)
    possible_resolutions = expand_grid_pinpoints(grid_pinpoints, patch_size=0)
    best_resolution = select_best_resolution(image.size, possible_resolutions)
    image_padded = resize_and_pad_image(image, best_resolution)
    patches = divide_to_patches(image_padded, processor.crop_size["height"])
    shortest_edge = _processor_shortest_edge(processor)
    image_original_resize = image.resize((shortest_edge, shortest_edge))
    image_patches = [image_original_resize, *patches]
    image_patches = [processor.preprocess(p, return_tensors="pt")["pixel_values"][0] for p in image_patches]
    return torch.stack(image_patches, dim=0)


def expand2square(pil_img: Image.Image, background_color) -> Image.Image:
    """llava/mm_utils.py: ``expand2square``: pad the short side, image centred (offset floored)."""
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


def pad_background_color(image_processor) -> tuple[int, ...]:
    """llava/mm_utils.py ``process_images``: ``tuple(int(x*255) for x in image_processor.image_mean)``.

    Truncation, not rounding: CLIP's mean (0.48145466, 0.4578275, 0.40821073) gives (122, 116, 104).
    """
    return tuple(int(x * 255) for x in image_processor.image_mean)


def process_images(
    images, image_processor, image_aspect_ratio=None, image_grid_pinpoints=None, check_size: bool = True
):
    """llava/mm_utils.py: ``process_images`` with ``model_cfg``'s two fields passed explicitly.

    ``pad``: ``expand2square`` with ``pad_background_color`` then ``image_processor.preprocess``;
    ``anyres`` (and LLaVA-NeXT's ``anyres_max_N``): ``process_anyres_image`` per image; anything else
    (LLaVA's default ``square``, or ``None``): ``image_processor(images)``, a plain CLIP resize +
    centre crop. Per-image results are stacked when every shape agrees, else returned as a list.
    """
    new_images = []
    if image_aspect_ratio == "pad":
        for image in images:
            image = expand2square(image, pad_background_color(image_processor))
            new_images.append(image_processor.preprocess(image, return_tensors="pt")["pixel_values"][0])
    elif image_aspect_ratio is not None and (
        image_aspect_ratio == "anyres" or "anyres_max" in image_aspect_ratio
    ):
        for image in images:
            new_images.append(process_anyres_image(image, image_processor, image_grid_pinpoints, check_size))
    else:
        return image_processor(images, return_tensors="pt")["pixel_values"]
    if all(x.shape == new_images[0].shape for x in new_images):
        new_images = torch.stack(new_images, dim=0)
    return new_images


def clip_output_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """transformers ``image_transforms.get_resize_output_image_size(default_to_square=False)``, as ``(w, h)``.

    The short side becomes ``shortest_edge``, the long one ``int(shortest_edge * long / short)`` (floor).
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def clip_preprocess(
    image: Image.Image,
    shortest_edge: int,
    crop_size: tuple[int, int],
    image_mean,
    image_std,
    rescale_factor: float = 1 / 255,
    resample=Image.Resampling.BICUBIC,
) -> np.ndarray:
    """What ``CLIPImageProcessor`` (PIL backend) does to one RGB image, from transformers' definitions.

    Resize the shortest edge with PIL (``clip_output_size``), centre crop ``crop_size = (h, w)`` at
    ``((H - h) // 2, (W - w) // 2)``, then ``image_transforms.rescale``: ``uint8 -> float64 * factor ->
    float32``, then ``image_transforms.normalize`` in float32: ``(x - float32(mean)) / float32(std)``.
    Returns ``[3, h, w]`` float32.
    """
    assert image.mode == "RGB", "convert to RGB first (LLaVA does .convert('RGB') on load)"
    width, height = image.size
    new_size = clip_output_size(width, height, shortest_edge)
    if new_size != image.size:
        image = image.resize(new_size, resample=resample)
    array = np.asarray(image)
    crop_h, crop_w = crop_size
    top, left = (array.shape[0] - crop_h) // 2, (array.shape[1] - crop_w) // 2
    assert top >= 0 and left >= 0, "crop larger than the resized image: transformers zero-pads (not modelled)"
    array = array[top : top + crop_h, left : left + crop_w]
    x = (array.astype(np.float64) * rescale_factor).astype(np.float32)
    x = (x - np.asarray(image_mean, dtype=np.float32)) / np.asarray(image_std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


OPENAI_CLIP_MEAN = [
    0.48145466,
    0.4578275,
    0.40821073,
]  # openai/clip-vit-large-patch14-336 preprocessor_config.json
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def clip_image_processor(size: int = 336, crop_size: int | None = None):
    """The CLIP image processor LLaVA uses, built in code (no download): ``CLIPImageProcessor`` with
    OpenAI's mean/std, or its PIL backend ``CLIPImageProcessorPil`` when transformers 5 would pick
    the torchvision one (whose bicubic resize differs from PIL's): what LLaVA was trained with."""
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


# --------------------------------------------------------------------------------------------------
# Vision tower and projector
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def clip_vision_tower_features(
    vision_model, images: torch.Tensor, select_layer: int = -2, select_feature: str = "patch"
) -> torch.Tensor:
    """llava/model/multimodal_encoder/clip_encoder.py: ``CLIPVisionTower.forward`` + ``feature_select``.

    ``CLIPVisionModel(images, output_hidden_states=True).hidden_states[select_layer]`` (index 0 is the
    embedding output after ``pre_layrnorm``, so -1 is the last encoder layer, before ``post_layernorm``),
    ``patch`` drops the CLS token (``[:, 1:]``), ``cls_patch`` keeps it; cast back to the input dtype.
    """
    out = vision_model(
        images.to(device=vision_model.device, dtype=vision_model.dtype), output_hidden_states=True
    )
    features = out.hidden_states[select_layer]
    if select_feature == "patch":
        features = features[:, 1:]
    elif select_feature == "cls_patch":
        pass
    else:
        raise ValueError(f"Unexpected select feature: {select_feature}")
    return features.to(images.dtype)


class IdentityMap(nn.Module):
    """llava/model/multimodal_projector/builder.py: ``IdentityMap``."""

    def forward(self, x, *args, **kwargs):
        return x

    @property
    def config(self):
        return {"mm_projector_type": "identity"}


def build_vision_projector(config) -> nn.Module:
    """llava/model/multimodal_projector/builder.py: ``build_vision_projector``.

    ``config`` needs ``mm_projector_type`` (default ``linear``), ``mm_hidden_size`` and ``hidden_size``.
    ``linear``: ``nn.Linear(mm_hidden, hidden)``; ``mlp{N}x_gelu``: ``nn.Sequential(Linear, GELU, Linear,
    ...)`` with N Linear layers (checkpoint names ``mm_projector.0``, ``.2``, ...; exact erf GELU);
    ``identity``: ``IdentityMap``.
    """
    projector_type = getattr(config, "mm_projector_type", "linear")
    if projector_type == "linear":
        return nn.Linear(config.mm_hidden_size, config.hidden_size)
    mlp_gelu_match = re.match(r"^mlp(\d+)x_gelu$", projector_type)
    if mlp_gelu_match:
        mlp_depth = int(mlp_gelu_match.group(1))
        modules = [nn.Linear(config.mm_hidden_size, config.hidden_size)]
        for _ in range(1, mlp_depth):
            modules.append(nn.GELU())
            modules.append(nn.Linear(config.hidden_size, config.hidden_size))
        return nn.Sequential(*modules)
    if projector_type == "identity":
        return IdentityMap()
    raise ValueError(f"Unknown projector type: {projector_type}")


@torch.no_grad()
def encode_images(
    vision_model,
    projector: nn.Module,
    images: torch.Tensor,
    select_layer: int = -2,
    select_feature: str = "patch",
) -> torch.Tensor:
    """llava/model/llava_arch.py: ``LlavaMetaForCausalLM.encode_images``: projector(tower(images))."""
    return projector(clip_vision_tower_features(vision_model, images, select_layer, select_feature))


# --------------------------------------------------------------------------------------------------
# LLaVA-NeXT packing (llava/model/llava_arch.py)
# --------------------------------------------------------------------------------------------------


def unpad_image(tensor: torch.Tensor, original_size) -> torch.Tensor:
    """llava/model/llava_arch.py: ``unpad_image``.

    ``tensor`` is ``[C, H, W]``; ``original_size`` is PIL's ``(width, height)`` (upstream's docstring
    says "(height, width)" but the code unpacks ``original_width, original_height`` and llava passes
    ``image.size``). The kept side is ``int(side * scale)``: a plain floor (transformers rounds to 7
    decimals first), and the same ``padding`` is cut from both ends.
    """
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]
    original_aspect_ratio = original_width / original_height
    current_aspect_ratio = current_width / current_height
    if original_aspect_ratio > current_aspect_ratio:
        scale_factor = current_width / original_width
        new_height = int(original_height * scale_factor)
        padding = (current_height - new_height) // 2
        return tensor[:, padding : current_height - padding, :]
    scale_factor = current_height / original_height
    new_width = int(original_width * scale_factor)
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding : current_width - padding]


def pack_image_features(
    tile_features: torch.Tensor,
    image_size,
    grid_pinpoints,
    patch_size_or_image_size: int,
    image_newline: torch.Tensor | None,
    mm_patch_merge_type: str = "spatial_unpad",
    image_aspect_ratio: str = "anyres",
    check_size: bool = True,
) -> torch.Tensor:
    """One image's ``[tokens, dim]`` sequence, as llava/model/llava_arch.py:
    ``prepare_inputs_labels_for_multimodal`` builds it (LLaVA-NeXT version, which adds ``anyres_max_N``).

    ``tile_features``: ``[1 + rows * cols, side * side, dim]`` projected tile features (base first);
    ``image_size``: the ORIGINAL image's ``(width, height)``; ``patch_size_or_image_size``: the tower's
    input size (what llava passes to ``get_anyres_image_grid_shape``); ``image_newline``: ``[dim]``
    (``model.image_newline`` in the checkpoint; needed for ``*unpad*``).

    ``flat``: all tiles flattened. ``spatial*`` with several tiles: the tiles are viewed
    ``[rows, cols, side, side, dim]`` and laid out as one ``[dim, rows*side, cols*side]`` map; with
    ``unpad``, ``unpad_image`` cuts the letterbox rows/columns, (``anyres_max_N`` only) the map is
    bilinearly resized by ``times = sqrt(h * w / (N * side**2))`` to ``[int(h // times), int(w //
    times)]`` when ``times > 1.1``, then ``image_newline`` ends every row; the base image's ``side**2``
    tokens come first (unless ``nobase``). Plain ``spatial``: tiles one after another, each row-major,
    no newline. A single tile: its tokens, plus one ``image_newline`` with ``unpad``.
    """
    if mm_patch_merge_type == "flat":
        return tile_features.flatten(0, 1)
    if not mm_patch_merge_type.startswith("spatial"):
        raise ValueError(f"Unexpected mm_patch_merge_type: {mm_patch_merge_type}")
    if tile_features.shape[0] == 1:
        feature = tile_features[0]
        if "unpad" in mm_patch_merge_type:
            feature = torch.cat((feature, image_newline[None].to(feature.device)), dim=0)
        return feature

    base_image_feature = tile_features[0]
    feature = tile_features[1:]
    height = width = math.isqrt(base_image_feature.shape[0])  # vision_tower.num_patches_per_side
    assert height * width == base_image_feature.shape[0]
    matched_anyres_max_num_patches = None
    if "anyres_max" in image_aspect_ratio:
        matched_anyres_max_num_patches = re.match(r"anyres_max_(\d+)", image_aspect_ratio)
        if matched_anyres_max_num_patches:
            max_num_patches = int(matched_anyres_max_num_patches.group(1))
    if image_aspect_ratio == "anyres" or "anyres_max" in image_aspect_ratio:
        num_patch_width, num_patch_height = get_anyres_image_grid_shape(
            image_size, grid_pinpoints, patch_size_or_image_size, check_size
        )
        feature = feature.view(num_patch_height, num_patch_width, height, width, -1)
    else:
        feature = feature.view(2, 2, height, width, -1)

    if "unpad" in mm_patch_merge_type:
        unit = feature.shape[2]
        feature = feature.permute(4, 0, 2, 1, 3).contiguous()
        feature = feature.flatten(1, 2).flatten(2, 3)
        feature = unpad_image(feature, image_size)
        if "anyres_max" in image_aspect_ratio and matched_anyres_max_num_patches:
            _, h, w = feature.shape
            times = math.sqrt(h * w / (max_num_patches * unit**2))
            if times > 1.1:
                feature = F.interpolate(feature[None], [int(h // times), int(w // times)], mode="bilinear")[0]
        newline = image_newline[:, None, None].expand(*feature.shape[:-1], 1).to(feature.device)
        feature = torch.cat((feature, newline), dim=-1)
        feature = feature.flatten(1, 2).transpose(0, 1)
    else:
        feature = feature.permute(0, 2, 1, 3, 4).contiguous()
        feature = feature.flatten(0, 3)
    if "nobase" in mm_patch_merge_type:
        return feature
    return torch.cat((base_image_feature, feature), dim=0)
