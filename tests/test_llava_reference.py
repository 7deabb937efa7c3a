"""The reference in tests/llava_reference.py against transformers' own classes, wherever they exist.

Every check compares numbers (shapes, max |Δ|) computed by the reference, which follows LLaVA's code,
with the same quantity computed by transformers' processors and models; where transformers departs from
LLaVA, the test pins the departure down (sizes and token counts) instead of hiding it.

Conventions: LLaVA sizes are PIL ``(width, height)`` and LLaVA pinpoints ``[width, height]``;
transformers' LLaVA-NeXT takes ``image_sizes`` as ``(height, width)`` and pinpoints as ``[height,
width]``, so the same grid needs the pinpoints swapped (``hf_pinpoints``).
"""

from __future__ import annotations

import logging
import math
import types

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
)
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape as hf_grid_shape
from transformers.models.llava_next.modeling_llava_next import unpad_image as hf_unpad_image

from tests import llava_reference as R

# transformers warns once per class that torchvision is missing and that it falls back to the PIL
# backend (the classes below ARE the PIL classes then): keep the test log readable.
logging.getLogger("transformers").setLevel(logging.ERROR)

LLAVA16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6 config.json
TINY = 56  # tiny tower input: 4 x 4 patches of 14
TINY_PINPOINTS = [[p // 6 for p in pair] for pair in LLAVA16_PINPOINTS]  # the same grid, at 56 per tile


def hf_pinpoints(pinpoints):
    """LLaVA's ``[width, height]`` pinpoints as transformers' ``[height, width]``, order kept."""
    return [[h, w] for w, h in pinpoints]


def max_abs(a, b) -> float:
    a = torch.as_tensor(np.asarray(a)) if not torch.is_tensor(a) else a
    b = torch.as_tensor(np.asarray(b)) if not torch.is_tensor(b) else b
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# 512 x 512, 600 x 400, 451 x 300, 512 x 512 grey, 640 x 427, 384 x 191 grey
PHOTOS = ["astronaut", "coffee", "chelsea", "camera", "rocket", "page"]
ODD_SIZES = [(2000, 80), (60, 1500), (5, 3), (1, 1), (3, 400), (337, 335)]  # (width, height)


def images_under_test():
    return [(name, photo(name)) for name in PHOTOS] + [
        (f"noise{w}x{h}", noise(w, h, seed=i)) for i, (w, h) in enumerate(ODD_SIZES)
    ]


def clip_processor(size: int = 336) -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


# ------------------------------------------------------------------------------------------------
# Grid pinpoints and tile selection
# ------------------------------------------------------------------------------------------------


def test_string_grid_form_expands_from_first_to_last_pair():
    grid = R.expand_grid_pinpoints("(1x1),...,(6x6)", 384)
    assert len(grid) == 36
    assert grid[:7] == [
        [384, 384],
        [384, 768],
        [384, 1152],
        [384, 1536],
        [384, 1920],
        [384, 2304],
        [768, 384],
    ]
    assert grid[-1] == [2304, 2304]
    # Only the first and the last pair count: the middle of the string is ignored.
    assert R.expand_grid_pinpoints("(1x1),(6x6)", 384) == grid
    assert R.expand_grid_pinpoints("(1x1), (2x2)", 336) == [[336, 336], [336, 672], [672, 336], [672, 672]]
    assert R.expand_grid_pinpoints("(2x1),...,(3x2)", 10, check_size=False) == [
        [20, 10],
        [20, 20],
        [30, 10],
        [30, 20],
    ]
    # A literal list string is literal_eval'ed; a list is used as it is.
    assert R.expand_grid_pinpoints("[(336, 672), (672, 336)]", 336) == [(336, 672), (672, 336)]
    assert R.expand_grid_pinpoints(LLAVA16_PINPOINTS, 336) is LLAVA16_PINPOINTS
    with pytest.raises(AssertionError):  # LLaVA-NeXT only expands for 224/336/384/448/512 towers
        R.expand_grid_pinpoints("(1x1),...,(2x2)", TINY)
    assert R.expand_grid_pinpoints("(1x1),...,(2x2)", TINY, check_size=False)[-1] == [112, 112]


def test_select_best_resolution_equals_transformers_with_swapped_pinpoints():
    """transformers' select_best_resolution is LLaVA's with (h, w) everywhere: same grid, same ties,
    once the pinpoints are swapped. With llava-hf's UNswapped list the ties break the other way."""
    string_grid = R.expand_grid_pinpoints("(1x1),...,(6x6)", 384)
    sizes = [(w, h) for w in range(1, 2400, 37) for h in range(1, 2400, 41)]
    tie_flips = []
    for pins in (LLAVA16_PINPOINTS, string_grid):
        for w, h in sizes:
            ours = R.select_best_resolution((w, h), pins)
            theirs = hf_select_best_resolution((h, w), hf_pinpoints(pins))
            assert ours == (theirs[1], theirs[0]), (w, h)
            unswapped = hf_select_best_resolution((h, w), pins)
            if ours != (unswapped[1], unswapped[0]):
                tie_flips.append((w, h))
    # The 1.6 list and the string grid are symmetric sets, so the UNswapped list (what llava-hf ships)
    # only differs on exact ties: images that fit inside the smallest pinpoint, e.g. 300 x 200.
    assert (300, 200) not in sizes
    assert R.select_best_resolution((300, 200), LLAVA16_PINPOINTS) == (336, 672)  # 1 column, 2 rows
    assert hf_select_best_resolution((200, 300), LLAVA16_PINPOINTS) == (336, 672)  # (h, w): 2 columns, 1 row
    assert tie_flips and all(w * h <= 336 * 672 for w, h in tie_flips)
    assert len(tie_flips) == 161


def test_grid_shape_equals_transformers():
    for w, h in [(512, 512), (600, 400), (451, 300), (2000, 80), (60, 1500), (5, 3), (1100, 700)]:
        ours = R.get_anyres_image_grid_shape((w, h), LLAVA16_PINPOINTS, 336)
        rows, cols = hf_grid_shape([h, w], hf_pinpoints(LLAVA16_PINPOINTS), 336)
        assert ours == (cols, rows)
    assert R.get_anyres_image_grid_shape((2000, 80), LLAVA16_PINPOINTS, 336) == (3, 1)
    assert R.get_anyres_image_grid_shape((60, 1500), LLAVA16_PINPOINTS, 336) == (1, 3)
    assert R.get_anyres_image_grid_shape((1100, 700), "(1x1),...,(6x6)", 336) == (4, 3)


# ------------------------------------------------------------------------------------------------
# Preprocessing
# ------------------------------------------------------------------------------------------------


def test_clip_preprocess_arithmetic_is_bit_exact():
    """clip_preprocess (resize, crop, float64 rescale -> float32, float32 normalise) == CLIPImageProcessor,
    and the usual float32 shortcuts are NOT: they differ by up to 4.8e-7."""
    processor = clip_processor()
    naive_max, naive_frac = 0.0, 0.0
    for _, image in images_under_test():
        ours = R.clip_preprocess(image, 336, (336, 336), processor.image_mean, processor.image_std)
        theirs = processor(image, return_tensors="np")["pixel_values"][0]
        assert theirs.dtype == np.float32 and ours.shape == theirs.shape == (3, 336, 336)
        assert np.array_equal(ours, theirs), max_abs(ours, theirs)
    for name in ("astronaut", "coffee", "chelsea"):
        image = photo(name)
        theirs = processor(image, return_tensors="np")["pixel_values"][0]
        w, h = R.clip_output_size(*image.size, 336)
        array = np.asarray(image.resize((w, h), Image.Resampling.BICUBIC))
        top, left = (h - 336) // 2, (w - 336) // 2
        u8 = array[top : top + 336, left : left + 336].transpose(2, 0, 1)
        mean = np.asarray(processor.image_mean, np.float32)[:, None, None]
        std = np.asarray(processor.image_std, np.float32)[:, None, None]
        true_div = (u8.astype(np.float32) / np.float32(255) - mean) / std
        # float32 u8 / 255 (true division) is the same as float64 * (1/255) -> float32
        assert np.array_equal(true_div, theirs)
        by_recip = (u8.astype(np.float32) * np.float32(1 / 255) - mean) / std
        fused = u8.astype(np.float32) * (np.float32(1 / 255) / std) - mean / std
        naive_max = max(naive_max, max_abs(by_recip, theirs), max_abs(fused, theirs))
        naive_frac = max(naive_frac, float((by_recip != theirs).mean()))
    assert 1e-7 < naive_max < 1e-6 and naive_frac > 0.3
    # all 256 byte values: float64 rescale == float32 true division, != multiplying by float32(1/255)
    x = np.arange(256, dtype=np.uint8)
    rescaled = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    assert np.array_equal(rescaled, x.astype(np.float32) / np.float32(255))
    assert int((rescaled != x.astype(np.float32) * np.float32(1 / 255)).sum()) == 126


def test_clip_output_size_floors_the_long_side():
    assert R.clip_output_size(451, 300, 336) == (505, 336)  # 336 * 451 / 300 = 505.12
    assert R.clip_output_size(300, 451, 336) == (336, 505)
    assert R.clip_output_size(2000, 80, 336) == (8400, 336)
    assert R.clip_output_size(5, 3, 336) == (560, 336)


@pytest.mark.parametrize("form", ["list", "string"])
def test_anyres_preprocessing_equals_llava_next_image_processor(form):
    """process_anyres_image (LLaVA) vs LlavaNextImageProcessor: same tiles, bit for bit, on photos and
    odd sizes; transformers needs the list form with [h, w] pinpoints."""
    processor = clip_processor()
    pins_ours = LLAVA16_PINPOINTS if form == "list" else "(1x1),...,(3x3)"
    expanded = R.expand_grid_pinpoints(pins_ours, 336)
    hf = LlavaNextImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=hf_pinpoints(expanded),
    )
    worst, tiles_seen = 0.0, 0
    for name, image in images_under_test():
        ours = R.process_anyres_image(image, processor, pins_ours)
        out = hf(image, return_tensors="pt")
        cols, rows = R.get_anyres_image_grid_shape(image.size, pins_ours, 336)
        assert ours.shape == (1 + rows * cols, 3, 336, 336), name
        assert out["image_sizes"].tolist() == [[image.height, image.width]]
        assert out["pixel_values"].shape == (1, *ours.shape), name
        worst = max(worst, max_abs(ours, out["pixel_values"][0]))
        tiles_seen += ours.shape[0]
        # the string form is the expanded list
        assert torch.equal(ours, R.process_anyres_image(image, processor, expanded))
    assert worst == 0.0
    assert tiles_seen == (46 if form == "list" else 44)


def test_anyres_base_image_is_squashed_not_padded():
    image = noise(600, 200)
    processor = clip_processor()
    tiles = R.process_anyres_image(image, processor, LLAVA16_PINPOINTS)
    squashed = processor.preprocess(image.resize((336, 336)), return_tensors="pt")["pixel_values"][0]
    assert torch.equal(tiles[0], squashed)
    # 600 x 200 (3:1) picks 672 x 336 (less waste than 1008 x 336): 2 tiles cut from the letterboxed resize
    assert R.select_best_resolution(image.size, LLAVA16_PINPOINTS) == (672, 336)
    padded = R.resize_and_pad_image(image, (672, 336))
    assert tiles.shape[0] == 3
    for k, box in enumerate([(0, 0, 336, 336), (336, 0, 672, 336)]):
        expected = processor.preprocess(padded.crop(box), return_tensors="pt")["pixel_values"][0]
        assert torch.equal(tiles[1 + k], expected)


def test_resize_and_pad_letterbox_is_black_and_centred():
    image = Image.new("RGB", (300, 100), (255, 255, 255))
    padded = np.asarray(R.resize_and_pad_image(image, (336, 672)))
    # width fills: 336 x ceil(100 * (336 / 300)) rows, and 100 * 1.12 is 112.00000000000001 in floats, so
    # the ceil gives 113 rows (transformers' get_patch_output_size has the same formula), at y = 559 // 2
    assert 100 * (336 / 300) > 112
    assert padded.shape == (672, 336, 3)
    assert (padded[:279] == 0).all() and (padded[392:] == 0).all() and (padded[279:392] == 255).all()


def test_llava_image_processor_do_pad_equals_expand2square():
    """LlavaImageProcessor(do_pad=True) == LLaVA's expand2square(image_mean*255 truncated) + CLIP: the
    same colour (122, 116, 104), the same floored centring, 0 difference."""
    processor = clip_processor()
    assert R.pad_background_color(processor) == (122, 116, 104)
    padder = LlavaImageProcessor(
        do_pad=True, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    )
    plain = LlavaImageProcessor(
        do_pad=False, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    )
    images = [image for _, image in images_under_test()] + [
        noise(451, 300, 7),
        noise(300, 451, 8),
        noise(2, 5, 9),
    ]
    ours_pad = R.process_images(images, processor, "pad")
    ours_plain = R.process_images(images, processor, None)
    assert ours_pad.shape == ours_plain.shape == (len(images), 3, 336, 336)
    assert max_abs(ours_pad, padder(images, return_tensors="pt")["pixel_values"]) == 0.0
    assert max_abs(ours_plain, plain(images, return_tensors="pt")["pixel_values"]) == 0.0
    assert torch.equal(R.process_images(images, processor, "square"), ours_plain)
    # the pad is really there: a 451x300 image padded to 451x451 then resized puts the colour at the top
    square = np.asarray(R.expand2square(noise(451, 300, 7), (122, 116, 104)))
    assert (
        square.shape == (451, 451, 3)
        and (square[:75] == (122, 116, 104)).all()
        and (square[375:] == (122, 116, 104)).all()
    )
    assert not (square[75] == (122, 116, 104)).all()


def test_process_images_anyres_stacks_only_equal_shapes():
    processor = clip_processor()
    same = R.process_images([noise(600, 400, 1), noise(610, 400, 2)], processor, "anyres", LLAVA16_PINPOINTS)
    assert torch.is_tensor(same) and same.shape == (2, 5, 3, 336, 336)
    mixed = R.process_images(
        [noise(600, 400, 1), noise(2000, 80, 2)], processor, "anyres_max_9", LLAVA16_PINPOINTS
    )
    assert isinstance(mixed, list) and [x.shape[0] for x in mixed] == [5, 4]


def test_rgba_input_llava_drops_alpha_transformers_composites_on_white():
    """LLaVA opens images with .convert('RGB') (alpha dropped); transformers 5's convert_to_rgb composites
    transparency onto WHITE. Identical once the caller converts first."""
    rng = np.random.default_rng(5)
    rgba = Image.fromarray(rng.integers(0, 256, (120, 200, 4), dtype=np.uint8))  # random alpha too
    assert rgba.mode == "RGBA"
    processor = clip_processor()
    llava = R.process_images([rgba.convert("RGB")], processor, None)
    direct = processor([rgba], return_tensors="pt")["pixel_values"]
    assert max_abs(llava, direct) > 1.0
    assert max_abs(llava, processor([rgba.convert("RGB")], return_tensors="pt")["pixel_values"]) == 0.0


# ------------------------------------------------------------------------------------------------
# Tiny models
# ------------------------------------------------------------------------------------------------


def tiny_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=TINY,
        patch_size=14,
        projection_dim=16,
    )


def tiny_text_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64,
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )


def reference_projector(hf_projector) -> torch.nn.Module:
    """build_vision_projector(mlp2x_gelu) loaded from transformers' linear_1 / linear_2 (= mm_projector.0 / .2)."""
    cfg = types.SimpleNamespace(
        mm_projector_type="mlp2x_gelu",
        mm_hidden_size=hf_projector.linear_1.in_features,
        hidden_size=hf_projector.linear_1.out_features,
    )
    projector = R.build_vision_projector(cfg)
    projector.load_state_dict(
        {
            "0.weight": hf_projector.linear_1.weight,
            "0.bias": hf_projector.linear_1.bias,
            "2.weight": hf_projector.linear_2.weight,
            "2.bias": hf_projector.linear_2.bias,
        }
    )
    return projector.eval()


@pytest.fixture(scope="module")
def tiny_next():
    torch.manual_seed(0)
    config = LlavaNextConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(),
        image_grid_pinpoints=hf_pinpoints(TINY_PINPOINTS),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_token_index=63,
    )
    return LlavaNextForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def tiny_processor():
    return clip_processor(TINY)


def test_projector_types_follow_builder():
    cfg = types.SimpleNamespace(mm_projector_type="mlp3x_gelu", mm_hidden_size=8, hidden_size=6)
    mlp3 = R.build_vision_projector(cfg)
    assert [type(m).__name__ for m in mlp3] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert sorted(mlp3.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]
    assert mlp3[1].approximate == "none"
    linear = R.build_vision_projector(types.SimpleNamespace(mm_hidden_size=8, hidden_size=6))
    assert isinstance(linear, torch.nn.Linear) and (linear.in_features, linear.out_features) == (8, 6)
    x = torch.randn(2, 3, 8)
    assert torch.equal(R.build_vision_projector(types.SimpleNamespace(mm_projector_type="identity"))(x), x)
    with pytest.raises(ValueError):
        R.build_vision_projector(
            types.SimpleNamespace(mm_projector_type="mlp2x_relu", mm_hidden_size=8, hidden_size=6)
        )


def test_hidden_states_index_semantics(tiny_processor):
    """hidden_states has num_layers + 1 entries: [0] is the embedding output AFTER pre_layrnorm, [-1] the
    last encoder layer, equal to last_hidden_state (post_layernorm is only for the pooled output)."""
    from transformers import CLIPVisionModel

    torch.manual_seed(5)
    tower = CLIPVisionModel(tiny_vision_config()).eval()
    assert [name for name, _ in tower.named_children()] == [
        "embeddings",
        "pre_layrnorm",
        "encoder",
        "post_layernorm",
    ]
    pixels = R.process_images([photo("coffee")], tiny_processor, None)
    with torch.no_grad():
        out = tower(pixels, output_hidden_states=True)
        embedded = tower.pre_layrnorm(tower.embeddings(pixels))
    assert len(out.hidden_states) == 3 + 1
    assert torch.equal(out.hidden_states[0], embedded)
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    assert max_abs(out.hidden_states[-1], tower.post_layernorm(out.last_hidden_state)) > 0.1
    assert torch.equal(R.clip_vision_tower_features(tower, pixels, 0, "cls_patch"), embedded)


@pytest.mark.parametrize(
    ("strategy", "select_feature", "tokens"), [("default", "patch", 16), ("full", "cls_patch", 17)]
)
@pytest.mark.parametrize("layer", [-2, -1, 0, 1, 3])
def test_llava_get_image_features_equals_tower_plus_projector(
    layer, strategy, select_feature, tokens, tiny_processor
):
    torch.manual_seed(1)
    config = LlavaConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(),
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        image_token_index=63,
    )
    model = LlavaForConditionalGeneration(config).eval()
    pixels = R.process_images([photo("astronaut"), photo("coffee"), noise(30, 90)], tiny_processor, "pad")
    with torch.no_grad():
        if layer == 0:
            # transformers 5 passes output_hidden_states=vision_feature_layer to the tower: 0 is falsy, no
            # hidden state is captured and get_image_features fails, unless the caller asks for them all
            with pytest.raises(TypeError):
                model.get_image_features(pixel_values=pixels)
            theirs = model.get_image_features(pixel_values=pixels, output_hidden_states=True).pooler_output
        else:
            theirs = model.get_image_features(pixel_values=pixels).pooler_output
    ours = R.encode_images(
        model.model.vision_tower,
        reference_projector(model.model.multi_modal_projector),
        pixels,
        layer,
        select_feature,
    )
    assert ours.shape == (3, tokens, 24)
    assert max_abs(ours, torch.stack(list(theirs))) == 0.0


def test_vision_feature_layer_list_concatenates_hidden_axis(tiny_processor):
    """A list of layers: transformers concatenates the selected hidden states on the LAST (hidden) axis;
    Llava drops CLS from each layer before concatenating, LlavaNext after: the same numbers, and the
    projector's linear_1 takes hidden_size * len(layers)."""
    layers = [-3, -1, 1]
    pixels = R.process_images([photo("chelsea"), noise(200, 50)], tiny_processor, None)
    torch.manual_seed(2)
    llava = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=tiny_vision_config(),
            text_config=tiny_text_config(),
            vision_feature_layer=layers,
            vision_feature_select_strategy="default",
            image_token_index=63,
        )
    ).eval()
    assert llava.model.multi_modal_projector.linear_1.in_features == 32 * 3
    tower = llava.model.vision_tower
    stacked = torch.cat(
        [R.clip_vision_tower_features(tower, pixels, layer, "patch") for layer in layers], dim=-1
    )
    assert stacked.shape == (2, 16, 96)
    assert torch.equal(stacked[..., 32:64], R.clip_vision_tower_features(tower, pixels, -1, "patch"))
    with torch.no_grad():
        theirs = torch.stack(list(llava.get_image_features(pixel_values=pixels).pooler_output))
    assert max_abs(reference_projector(llava.model.multi_modal_projector)(stacked), theirs) == 0.0

    torch.manual_seed(3)
    nxt = LlavaNextForConditionalGeneration(
        LlavaNextConfig(
            vision_config=tiny_vision_config(),
            text_config=tiny_text_config(),
            vision_feature_layer=layers,
            vision_feature_select_strategy="default",
            image_token_index=63,
            image_grid_pinpoints=hf_pinpoints(TINY_PINPOINTS),
        )
    ).eval()
    image = photo("chelsea")
    tiles = R.process_anyres_image(image, tiny_processor, TINY_PINPOINTS)
    feats = torch.cat(
        [R.clip_vision_tower_features(nxt.model.vision_tower, tiles, layer) for layer in layers], dim=-1
    )
    ours = R.pack_image_features(
        reference_projector(nxt.model.multi_modal_projector)(feats),
        image.size,
        TINY_PINPOINTS,
        TINY,
        nxt.model.image_newline,
        check_size=False,
    )
    with torch.no_grad():
        theirs = nxt.get_image_features(
            pixel_values=tiles[None], image_sizes=torch.tensor([[image.height, image.width]])
        )
    assert max_abs(ours, theirs.pooler_output[0]) == 0.0


def packing_cases():
    """(name, image) whose LLaVA unpad equals transformers' (no float rounding edge)."""
    return [(name, image) for name, image in images_under_test()] + [
        ("wide", noise(100, 60, 11)),
        ("tall", noise(60, 100, 12)),
        ("square", noise(150, 150, 13)),
        ("strip", noise(300, 40, 14)),
        ("tiny", noise(13, 7, 15)),
    ]


def test_pack_image_features_equals_llava_next(tiny_next, tiny_processor):
    """Same tile features in, same packed sequence out: pack_image_features (LLaVA) vs LlavaNextModel
    .pack_image_features; and the whole path (tiles -> tower -> projector -> pack) vs get_image_features."""
    newline = tiny_next.model.image_newline
    lengths = {}
    for name, image in packing_cases():
        tiles = R.process_anyres_image(image, tiny_processor, TINY_PINPOINTS)
        tile_features = R.encode_images(
            tiny_next.model.vision_tower, reference_projector(tiny_next.model.multi_modal_projector), tiles
        )
        ours = R.pack_image_features(
            tile_features, image.size, TINY_PINPOINTS, TINY, newline, check_size=False
        )
        sizes = torch.tensor([[image.height, image.width]])
        with torch.no_grad():
            packed, lens = tiny_next.model.pack_image_features(
                [tile_features], sizes, "default", image_newline=newline
            )
            whole = tiny_next.get_image_features(pixel_values=tiles[None], image_sizes=sizes).pooler_output[0]
        assert max_abs(ours, packed[0]) == 0.0, name
        assert max_abs(ours, whole) == 0.0, name
        assert lens.tolist() == [ours.shape[0]]
        lengths[name] = ours.shape[0]
        # layout: the base tile's 16 tokens, then rows that each end with the newline
        assert torch.equal(ours[:16], tile_features[0])
        rows = _row_count(ours[16:], newline)
        assert ours.shape[0] == 16 or torch.equal(
            ours[16:].view(rows, -1, 24)[:, -1], newline.expand(rows, 24)
        )
    # 512 x 512 -> 112 x 112: 2 x 2 tiles, an 8 x 8 map, nothing cut
    assert lengths["astronaut"] == 16 + 8 * (8 + 1)
    # 600 x 400 -> 2 x 2 tiles: int(400 * 8 / 600) = 5 rows, padding (8 - 5) // 2 = 1 cut at both ends: 6 kept
    assert lengths["coffee"] == 16 + 6 * (8 + 1)
    # 100 x 60 -> 2 x 2 tiles, int(4.8) = 4 rows kept
    assert lengths["wide"] == 16 + 4 * (8 + 1)
    # 1 x 1: exact tie, (56, 112) comes first -> 1 x 2 tiles, an 8 x 4 map, 4 rows kept
    assert lengths["noise1x1"] == 16 + 4 * (4 + 1)
    # extremes: 2000 x 80 -> 3 x 1 tiles, int(80 * 12 / 2000) = 0 rows kept: nothing but the base;
    # 60 x 1500 -> 1 x 3 tiles, 0 columns kept but the 12 rows stay: 12 lone newlines
    assert lengths["noise2000x80"] == 16
    assert lengths["noise60x1500"] == 16 + 12 * (0 + 1)


def _row_count(body: torch.Tensor, newline: torch.Tensor) -> int:
    return int((body == newline).all(dim=-1).sum())


def test_batch_of_images_with_different_tile_counts(tiny_next, tiny_processor):
    """LlavaNextImageProcessor zero-pads the tile axis to the batch's max; get_image_features slices it
    back from image_sizes. Each packed sequence equals the reference's."""
    images = [photo("astronaut"), noise(2000, 80, 3), noise(5, 3, 4)]
    hf_proc = LlavaNextImageProcessor(
        size={"shortest_edge": TINY},
        crop_size={"height": TINY, "width": TINY},
        image_grid_pinpoints=hf_pinpoints(TINY_PINPOINTS),
    )
    batch = hf_proc(images, return_tensors="pt")
    assert batch["pixel_values"].shape == (3, 5, 3, TINY, TINY)
    projector = reference_projector(tiny_next.model.multi_modal_projector)
    with torch.no_grad():
        theirs = tiny_next.get_image_features(**batch).pooler_output
    worst = 0.0
    for i, image in enumerate(images):
        tiles = R.process_anyres_image(image, tiny_processor, TINY_PINPOINTS)
        assert torch.equal(batch["pixel_values"][i, : len(tiles)], tiles)
        assert not batch["pixel_values"][i, len(tiles) :].any()
        ours = R.pack_image_features(
            R.encode_images(tiny_next.model.vision_tower, projector, tiles),
            image.size,
            TINY_PINPOINTS,
            TINY,
            tiny_next.model.image_newline,
            check_size=False,
        )
        # the batched tower call (15 tiles at once, 5 of them zero padding) rounds differently from the
        # per-image call: float32 rounding only (measured up to 4.7e-9)
        assert ours.shape == theirs[i].shape
        worst = max(worst, max_abs(ours, theirs[i]))
    assert worst < 1e-6


def test_unpad_rounding_departs_from_llava():
    """LLaVA keeps int(side * scale) rows/columns; transformers int(round(side * scale, 7)). When the exact
    value is an integer that float arithmetic puts just below, LLaVA keeps 2 fewer rows (or columns)."""
    cases = {  # (width, height): (grid (cols, rows), LLaVA [C, H, W], transformers [C, H, W]) at 24 per tile
        (656, 205): ((2, 1), (1, 14, 48), (1, 16, 48)),
        (352, 748): ((1, 3), (1, 50, 24), (1, 52, 24)),
        (110, 352): ((1, 2), (1, 48, 14), (1, 48, 16)),
    }
    assert 205 * (48 / 656) < 15 and 205 * 48 / 656 == 15.0  # the float edge, spelled out once
    for (w, h), (grid, ours_shape, theirs_shape) in cases.items():
        cols, rows = R.get_anyres_image_grid_shape((w, h), LLAVA16_PINPOINTS, 336)
        assert (cols, rows) == grid
        feature = torch.arange(rows * 24 * cols * 24, dtype=torch.float32).view(1, rows * 24, cols * 24)
        ours = R.unpad_image(feature, (w, h))
        theirs = hf_unpad_image(feature, (h, w))
        assert tuple(ours.shape) == ours_shape and tuple(theirs.shape) == theirs_shape
        # LLaVA's kept band is transformers' minus one line on each side
        if ours.shape[1] != theirs.shape[1]:
            assert torch.equal(ours, theirs[:, 1:-1])
        else:
            assert torch.equal(ours, theirs[:, :, 1:-1])
    # no departure on ordinary sizes
    for w, h in [(600, 400), (451, 300), (1024, 899), (640, 427), (2000, 80)]:
        cols, rows = R.get_anyres_image_grid_shape((w, h), LLAVA16_PINPOINTS, 336)
        feature = torch.zeros(1, rows * 24, cols * 24)
        assert R.unpad_image(feature, (w, h)).shape == hf_unpad_image(feature, (h, w)).shape


def test_packed_length_departs_on_the_rounding_edge(tiny_next, tiny_processor):
    """End to end at tiny scale: a 47 x 188 image packs 16 + 12 x (2 + 1) = 52 tokens in LLaVA, 16 + 12 x
    (4 + 1) = 76 in transformers; LLaVA's columns are transformers' middle two."""
    image = noise(47, 188, 21)
    tiles = R.process_anyres_image(image, tiny_processor, TINY_PINPOINTS)
    feats = R.encode_images(
        tiny_next.model.vision_tower, reference_projector(tiny_next.model.multi_modal_projector), tiles
    )
    newline = tiny_next.model.image_newline
    ours = R.pack_image_features(feats, image.size, TINY_PINPOINTS, TINY, newline, check_size=False)
    with torch.no_grad():
        packed, _ = tiny_next.model.pack_image_features(
            [feats], torch.tensor([[188, 47]]), "default", newline
        )
    theirs = packed[0]
    assert ours.shape == (52, 24) and theirs.shape == (76, 24)
    assert torch.equal(ours[:16], theirs[:16])
    assert torch.equal(ours[16:].view(12, 3, 24)[:, :2], theirs[16:].view(12, 5, 24)[:, 1:3])


def test_unswapped_pinpoints_change_the_grid_of_small_images(tiny_processor):
    """llava-hf configs copy LLaVA's [w, h] list unchanged into a field transformers reads as [h, w]: for
    images inside the smallest pinpoint (exact tie) the grid turns 90 degrees and the tokens differ."""
    image = noise(40, 30, 31)  # fits in 56 x 112 either way
    assert R.get_anyres_image_grid_shape(image.size, TINY_PINPOINTS, TINY, check_size=False) == (1, 2)
    rows, cols = hf_grid_shape([30, 40], TINY_PINPOINTS, TINY)  # unswapped list read as (h, w)
    assert (cols, rows) == (2, 1)
    hf_proc = LlavaNextImageProcessor(
        size={"shortest_edge": TINY},
        crop_size={"height": TINY, "width": TINY},
        image_grid_pinpoints=TINY_PINPOINTS,
    )
    theirs = hf_proc(image, return_tensors="pt")["pixel_values"][0]
    ours = R.process_anyres_image(image, tiny_processor, TINY_PINPOINTS)
    assert ours.shape == theirs.shape == (3, 3, TINY, TINY)
    assert torch.equal(ours[0], theirs[0]) and max_abs(ours[1:], theirs[1:]) > 1.0


def test_anyres_max_equals_llava_onevision_pack(tiny_processor):
    """anyres_max_N (LLaVA-NeXT llava_arch.py) vs LlavaOnevisionModel.pack_image_features: the unpadded map
    is bilinearly shrunk by sqrt(h*w / (N * side^2)) when that exceeds 1.1, then rows get the newline."""
    torch.manual_seed(4)
    grid = "(1x1),...,(3x3)"
    pins = R.expand_grid_pinpoints(grid, TINY, check_size=False)
    config = LlavaOnevisionConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(),
        image_grid_pinpoints=hf_pinpoints(pins),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_token_index=63,
        vision_aspect_ratio="anyres_max_2",
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    projector = reference_projector(model.model.multi_modal_projector)
    newline = model.model.image_newline
    shrunk = 0
    for name, image in [
        ("astronaut", photo("astronaut")),
        ("coffee", photo("coffee")),
        ("rocket", photo("rocket")),
        ("wide", noise(400, 90, 41)),
        ("tall", noise(90, 260, 42)),
        ("small", noise(40, 30, 43)),
    ]:
        tiles = R.process_anyres_image(image, tiny_processor, grid, check_size=False)
        feats = R.encode_images(model.model.vision_tower, projector, tiles)
        for n in (1, 2, 8, 9):
            ratio = f"anyres_max_{n}"
            ours = R.pack_image_features(
                feats, image.size, grid, TINY, newline, image_aspect_ratio=ratio, check_size=False
            )
            with torch.no_grad():
                theirs = model.model.pack_image_features(
                    [feats],
                    torch.tensor([[image.height, image.width]]),
                    image_newline=newline,
                    vision_aspect_ratio=ratio,
                )[0][0]
            assert max_abs(ours, theirs) == 0.0, (name, ratio)
            plain = R.pack_image_features(feats, image.size, grid, TINY, newline, check_size=False)
            shrunk += ours.shape[0] < plain.shape[0]
    astronaut = R.process_anyres_image(photo("astronaut"), tiny_processor, grid, check_size=False)
    assert astronaut.shape[0] == 10  # 3 x 3 tiles + base
    feats = R.encode_images(model.model.vision_tower, projector, astronaut)
    one = R.pack_image_features(
        feats, (512, 512), grid, TINY, newline, image_aspect_ratio="anyres_max_1", check_size=False
    )
    # 12 x 12 map, times = sqrt(144 / 16) = 3 -> 4 x 4 map + 4 newlines, after the 16 base tokens
    assert one.shape == (16 + 4 * 5, 24)
    # anyres_max_8: times = sqrt(144 / 128) = 1.06 <= 1.1, so the map is NOT resized
    eight = R.pack_image_features(
        feats, (512, 512), grid, TINY, newline, image_aspect_ratio="anyres_max_8", check_size=False
    )
    assert eight.shape == (16 + 12 * 13, 24)
    assert shrunk >= 8


def test_single_tile_and_flat_and_spatial_layouts():
    dim = 5
    newline = torch.full((dim,), -1.0)
    tiles = torch.arange(3 * 16 * dim, dtype=torch.float32).view(3, 16, dim)  # base + 1 x 2 tiles
    assert torch.equal(
        R.pack_image_features(tiles, (40, 90), TINY_PINPOINTS, TINY, newline, "flat"), tiles.flatten(0, 1)
    )
    single = R.pack_image_features(tiles[:1], (40, 90), TINY_PINPOINTS, TINY, newline, check_size=False)
    assert single.shape == (17, dim) and torch.equal(single[-1], newline)
    spatial = R.pack_image_features(
        tiles, (40, 90), TINY_PINPOINTS, TINY, newline, "spatial", check_size=False
    )
    assert torch.equal(spatial, tiles.flatten(0, 1))  # 1 column: tile after tile, each row-major
    nobase = R.pack_image_features(
        tiles, (56, 112), TINY_PINPOINTS, TINY, newline, "spatial_unpad_nobase", check_size=False
    )
    assert nobase.shape == (8 * 5, dim)  # 8 rows x (4 + newline), no base tokens
    # 2 columns: the map interleaves the tiles' rows
    wide = torch.arange(3 * 16, dtype=torch.float32).view(3, 16, 1)
    packed = R.pack_image_features(
        wide, (112, 56), TINY_PINPOINTS, TINY, torch.tensor([-1.0]), check_size=False
    )
    assert packed[16:].view(4, 9)[0].tolist() == [16, 17, 18, 19, 32, 33, 34, 35, -1]
    assert math.isclose(packed.sum().item(), wide.sum().item() - 4)


# ------------------------------------------------------------------------------------------------
# What transformers 5 writes (facts the notes rely on)
# ------------------------------------------------------------------------------------------------


def test_transformers5_save_layout(tmp_path, tiny_next):
    """save_pretrained in transformers 5: one processor_config.json with the image processor NESTED under
    "image_processor" (no preprocessor_config.json); weights under the legacy top-level names, with the
    CLIP tower WITHOUT llava-hf's "vision_model." infix, which still loads."""
    import json

    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoImageProcessor, AutoProcessor, LlavaNextProcessor, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": TINY},
        crop_size={"height": TINY, "width": TINY},
        image_grid_pinpoints=hf_pinpoints(TINY_PINPOINTS),
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token="<image>",
    )
    processor.save_pretrained(tmp_path / "proc")
    files = sorted(p.name for p in (tmp_path / "proc").iterdir())
    assert "processor_config.json" in files and "preprocessor_config.json" not in files
    saved = json.loads((tmp_path / "proc" / "processor_config.json").read_text())
    assert saved["processor_class"] == "LlavaNextProcessor" and saved["patch_size"] == 14
    nested = saved["image_processor"]
    assert nested["image_processor_type"] == "LlavaNextImageProcessor"  # "Pil" suffix stripped
    assert nested["image_grid_pinpoints"] == hf_pinpoints(TINY_PINPOINTS)
    assert nested["resample"] == 3 and nested["rescale_factor"] == 1 / 255 and nested["do_pad"] is True
    assert (
        AutoProcessor.from_pretrained(tmp_path / "proc").image_processor.image_grid_pinpoints
        == nested["image_grid_pinpoints"]
    )
    # the 4.x layout (a flat preprocessor_config.json) still loads
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "preprocessor_config.json").write_text(json.dumps(nested))
    assert AutoImageProcessor.from_pretrained(tmp_path / "legacy").size["shortest_edge"] == TINY

    tiny_next.save_pretrained(tmp_path / "model")
    weights = load_file(tmp_path / "model" / "model.safetensors")
    top = sorted(k for k in weights if ".layers." not in k)
    assert "image_newline" in top and "multi_modal_projector.linear_1.weight" in top
    assert "vision_tower.embeddings.patch_embedding.weight" in top and "language_model.lm_head.weight" in top
    assert not any(k.startswith("vision_tower.vision_model.") for k in weights)
    assert not any(k.startswith("model.") for k in weights)
    # llava-hf's hub names (vision_tower.vision_model.*) load into the same model
    legacy = {
        (f"vision_tower.vision_model.{k[len('vision_tower.') :]}" if k.startswith("vision_tower.") else k): v
        for k, v in weights.items()
    }
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "config.json").write_text((tmp_path / "model" / "config.json").read_text())
    save_file(legacy, tmp_path / "hub" / "model.safetensors", metadata={"format": "pt"})
    reloaded = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "hub")
    original = tiny_next.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in reloaded.state_dict().items())
