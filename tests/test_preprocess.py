"""Preprocessing: bit-identical to LLaVA's process_images (CLIPImageProcessor, expand2square)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.bench.preprocess import PreprocessOptions, bench_preprocess
from pipeline.config import DecodeConfig
from pipeline.images import native
from pipeline.images.normalize import normalize
from pipeline.images.passes import expand2square
from pipeline.images.passes import hf_center_crop as _hf_center_crop
from pipeline.images.passes import pass_model as _pass_model
from pipeline.images.preprocess import PreparedImage, Preprocessor
from pipeline.images.spec import PreprocessSpec, resize_output_size
from pipeline.model.errors import ConfigError, DecodeError
from tests.corpus import encode, real_photos
from tests.llava_reference import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from tests.llava_reference import clip_image_processor as reference_processor
from tests.llava_reference import process_images as llava_reference

TOL = 1e-5


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {name: Image.fromarray(arr).convert("RGB") for name, arr in real_photos().items()}


@pytest.fixture(scope="module", params=[224, 336])
def processor(request: pytest.FixtureRequest):
    return reference_processor(request.param)


def _ours(images: list[Image.Image], spec: PreprocessSpec) -> torch.Tensor:
    pre = Preprocessor(spec)
    pixels = np.stack([pre.pixels(img) for img in images])
    return normalize(torch.from_numpy(pixels), spec)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


# --------------------------------------------------------------------------------------------
# Parity with LLaVA / CLIPImageProcessor


@pytest.mark.parametrize("aspect_ratio", ["pad", "crop", "square"])
def test_parity_on_real_photos(photos, processor, aspect_ratio):
    spec = PreprocessSpec.from_image_processor(processor, aspect_ratio)
    images = list(photos.values())
    reference = llava_reference(images, processor, aspect_ratio)
    ours = _ours(images, spec)
    assert ours.dtype == torch.float32
    assert _max_diff(ours, reference) <= TOL


def test_reference_is_llava(photos):
    """Our reference helper is LLaVA's code: expand2square with int(x*255) of the mean, then CLIP."""
    processor = reference_processor(336)
    image = photos["rocket"]  # 640 x 427, landscape
    square = expand2square(image, tuple(int(x * 255) for x in OPENAI_CLIP_MEAN))
    assert square.size == (640, 640)
    assert square.getpixel((0, 0)) == (122, 116, 104)
    assert square.getpixel((320, (640 - 427) // 2)) == image.getpixel((320, 0))
    want = processor.preprocess(square, return_tensors="pt")["pixel_values"]
    assert _max_diff(llava_reference([image], processor, "pad"), want) == 0.0


def test_parity_odd_sizes(photos, processor):
    """Tall, wide, tiny, upscaled and rounding-sensitive sizes, every aspect ratio."""
    size = processor.crop_size["height"]
    base = photos["astronaut"]
    # 999 x 337 and 337 x 999 round the long edge; 400 x 7 is very wide; 2 x 2 and 5 x 3 upscale;
    # 640 x 640 is already square.
    sizes = [(400, 7), (7, 400), (999, 337), (337, 999), (2, 2), (5, 3), (640, 640), (641, 480), (480, 641)]
    sizes += [(size + 1, size), (size, size + 1), (size - 1, 2 * size + 1), (1200, 90), (90, 1200)]
    for aspect_ratio in ("pad", "crop"):
        spec = PreprocessSpec.from_image_processor(processor, aspect_ratio)
        images = [base.resize(wh, Image.Resampling.BILINEAR) for wh in sizes]
        reference = llava_reference(images, processor, aspect_ratio)
        assert _max_diff(_ours(images, spec), reference) <= TOL, aspect_ratio


def test_resize_output_size_matches_transformers():
    from transformers.image_transforms import get_resize_output_image_size

    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = int(rng.integers(1, 5000)), int(rng.integers(1, 5000))
        size = int(rng.choice([224, 336, 384, 7]))
        want = get_resize_output_image_size(
            np.zeros((h, w, 1), np.uint8), size, default_to_square=False, input_data_format="channels_last"
        )
        assert resize_output_size(h, w, size) == tuple(want), (h, w, size)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "pillow-passes"])
def test_fast_routes_are_bit_identical_to_plain_pil(compiled, monkeypatch):
    """Every route (the compiled resampler, or PIL's passes called one at a time) gives exactly PIL's
    resize + crop for many geometries and filters."""
    assert _pass_model(3) is not None  # the installed Pillow passed the probe: fast routes are on
    if not compiled:
        monkeypatch.setattr(native, "compiled_resampler", lambda resample: None)
    else:
        assert native.resampler_name(3).startswith("compiled")
    rng = np.random.default_rng(42)
    noise = Image.fromarray(rng.integers(0, 256, (700, 700, 3), dtype=np.uint8))
    for trial in range(120):
        w, h = int(rng.integers(2, 700)), int(rng.integers(2, 700))
        if trial % 3 == 1:
            h = max(2, w // int(rng.integers(2, 12)))
        elif trial % 3 == 2:
            w = max(2, h // int(rng.integers(2, 12)))
        size = int(rng.choice([224, 336, 64, 37]))
        crop_h, crop_w = size, size if trial % 4 else max(1, size - 9)
        spec = PreprocessSpec(
            size=size,
            crop_height=crop_h,
            crop_width=crop_w,
            aspect_ratio=("pad", "crop")[trial % 2],
            resample=(3, 3, 2, 1, 4, 5, 0)[trial % 7],
            do_center_crop=trial % 7 != 0,
        )
        image = noise.crop((0, 0, w, h))
        square = expand2square(image, spec.background) if spec.aspect_ratio == "pad" else image
        new_h, new_w = resize_output_size(square.height, square.width, size)
        plain = np.asarray(square.resize((new_w, new_h), spec.resample))
        if spec.do_center_crop:
            plain = _hf_center_crop(plain, crop_h, crop_w)
        got = Preprocessor(spec).pixels(image)
        np.testing.assert_array_equal(got, plain.transpose(2, 0, 1), err_msg=f"{w}x{h} {spec}")


def test_plain_route_when_pillow_is_not_decomposable(photos, monkeypatch):
    """If the probe fails on some Pillow build, every image takes the plain (reference) route."""
    import pipeline.images.preprocess as images_preprocess

    monkeypatch.setattr(images_preprocess, "pass_model", lambda resample: None)
    monkeypatch.setattr(native, "compiled_resampler", lambda resample: None)
    processor = reference_processor(224)
    images = [photos["rocket"], photos["coins"], photos["astronaut"].resize((300, 500))]
    for aspect_ratio in ("pad", "crop"):
        spec = PreprocessSpec.from_image_processor(processor, aspect_ratio)
        reference = llava_reference(images, processor, aspect_ratio)
        assert _max_diff(_ours(images, spec), reference) <= TOL


def test_crop_larger_than_image_pads_like_hf():
    processor = reference_processor(64, crop_size=80)
    spec = PreprocessSpec.from_image_processor(processor, "crop")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 90, 3), dtype=np.uint8))
    reference = processor(image, return_tensors="pt").pixel_values
    assert _max_diff(_ours([image], spec), reference) <= TOL


def test_hf_center_crop_matches_transformers():
    from transformers.image_transforms import center_crop

    rng = np.random.default_rng(3)
    for _ in range(50):
        arr = rng.integers(0, 256, (int(rng.integers(1, 40)), int(rng.integers(1, 40)), 3), dtype=np.uint8)
        ch, cw = int(rng.integers(1, 45)), int(rng.integers(1, 45))
        want = center_crop(arr, (ch, cw), input_data_format="channels_last")
        np.testing.assert_array_equal(_hf_center_crop(arr, ch, cw), want)


# --------------------------------------------------------------------------------------------
# Pixels, normalize, Preprocessor


def test_pixels_layout(photos):
    spec = PreprocessSpec()
    pixels = Preprocessor(spec).pixels(photos["coffee"])
    assert pixels.dtype == np.uint8 and pixels.shape == (3, 336, 336) and pixels.flags.c_contiguous
    grey = Preprocessor(spec).pixels(photos["camera"].convert("L"))  # non-RGB input is converted
    assert grey.shape == (3, 336, 336) and (grey[0] == grey[1]).all()
    free = PreprocessSpec(aspect_ratio="crop", do_center_crop=False)
    assert Preprocessor(free).pixels(photos["coffee"]).shape == (3, 336, 504)  # 600 x 400 photo
    assert free.output_size is None and spec.output_size == (336, 336)


def test_normalize_matches_clip_formula():
    spec = PreprocessSpec()
    pixels = torch.arange(256, dtype=torch.uint8).repeat(3, 2, 1)  # (3, 2, 256)
    out = normalize(pixels, spec)
    assert out.shape == (3, 2, 256) and out.dtype == torch.float32
    x = np.arange(256, dtype=np.float64)
    for c in range(3):
        want = (x * (1 / 255) - OPENAI_CLIP_MEAN[c]) / OPENAI_CLIP_STD[c]
        assert np.abs(out[c, 0].numpy() - want).max() <= TOL
    batch = pixels[None].repeat(4, 1, 1, 1)
    assert torch.equal(normalize(batch, spec)[2], out)
    assert torch.equal(normalize(pixels.numpy(), spec), out)
    half = normalize(batch, spec, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), normalize(batch, spec), atol=0.02)
    with pytest.raises(TypeError):
        normalize(pixels.float(), spec)
    with pytest.raises(ValueError):
        normalize(torch.zeros(4, 4, dtype=torch.uint8), spec)


def test_extreme_aspect_ratios_are_refused_not_allocated():
    """LLaVA would build a 20000 x 20000 square (pad) or a 67-million-pixel-wide resize (crop)."""
    pre_pad = Preprocessor(PreprocessSpec(aspect_ratio="pad"))
    pre_crop = Preprocessor(PreprocessSpec(aspect_ratio="crop"))
    for pre, size in [(pre_pad, (2, 20_000)), (pre_pad, (400_000, 2)), (pre_crop, (400_000, 2))]:
        with pytest.raises(DecodeError) as info:
            pre.pixels(Image.new("RGB", size))
        assert info.value.code == "too_large"
    data = encode(Image.new("RGB", (400_000, 2)), "PNG")
    with pytest.raises(DecodeError) as info:
        pre_crop(data, name="strip.png")
    assert info.value.code == "too_large" and "strip.png" in info.value.message
    # Wide but reasonable panoramas go through the exact fast route without building the square.
    assert pre_pad.pixels(Image.new("RGB", (12_000, 900), (9, 8, 7))).shape == (3, 336, 336)


def test_preprocessor_call(photos):
    spec = PreprocessSpec(size=224, crop_height=224, crop_width=224)
    pre = Preprocessor(spec, DecodeConfig())
    data = encode(photos["chelsea"], "JPEG")
    prepared = pre(data, name="chelsea.jpg")
    assert isinstance(prepared, PreparedImage)
    assert (prepared.width, prepared.height, prepared.format) == (451, 300, "JPEG")
    assert prepared.pixels.shape == (3, 224, 224) and prepared.pixels.dtype == np.uint8
    np.testing.assert_array_equal(prepared.pixels, pre.pixels(Image.open(__import__("io").BytesIO(data))))
    with pytest.raises(DecodeError) as info:
        pre(data[: len(data) // 2], name="cut.jpg")
    assert info.value.code == "truncated"
    with pytest.raises(DecodeError) as info:
        Preprocessor(spec, DecodeConfig(min_side=500))(data)
    assert info.value.code == "too_small"


# --------------------------------------------------------------------------------------------
# PreprocessSpec


def test_spec_from_processor_forms(tmp_path):
    processor = reference_processor(336)
    spec = PreprocessSpec.from_image_processor(processor, "pad")
    assert spec == PreprocessSpec()  # the defaults are LLaVA-1.5's
    assert PreprocessSpec.from_image_processor(processor.to_dict(), "pad") == spec
    # The original openai/clip-vit-large-patch14-336 preprocessor_config.json (integer sizes).
    legacy = {
        "crop_size": 336,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "resample": 3,
        "size": 336,
    }
    assert PreprocessSpec.from_image_processor(legacy, "pad") == spec
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    assert PreprocessSpec.from_image_processor(tmp_path, "pad") == spec
    assert PreprocessSpec.from_image_processor(str(tmp_path / "preprocessor_config.json"), "pad") == spec
    small = PreprocessSpec.from_image_processor(reference_processor(224), "crop")
    assert (small.size, small.crop_height, small.crop_width, small.aspect_ratio) == (224, 224, 224, "crop")
    assert math.isclose(small.rescale_factor, 1 / 255)
    nulls = {"size": 336, "crop_size": 336, "image_mean": None, "image_std": None, "resample": None}
    assert PreprocessSpec.from_image_processor(nulls, "pad") == spec  # null means the CLIP default
    assert spec.background == (122, 116, 104)


def test_spec_to_dict_round_trip():
    spec = PreprocessSpec(size=224, crop_height=200, crop_width=210, aspect_ratio="square")
    data = spec.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert PreprocessSpec(**data) == spec


@pytest.mark.parametrize(
    ("kwargs", "processor"),
    [
        ({"aspect_ratio": "anyres"}, None),
        ({"size": 0}, None),
        ({"image_std": (1.0, 0.0, 1.0)}, None),
        ({"resample": 9}, None),
        ({}, {"size": {"height": 224, "width": 224}}),
        ({}, {"size": {"shortest_edge": 224, "longest_edge": 300}}),  # not implemented: refused
        ({}, {"use_square_size": True}),
        ({}, {"do_thumbnail": True}),  # a field not known to leave pixels alone
        ({}, {"crop_size": "big"}),
        ({}, {"image_mean": ["a", 0, 0]}),
        ({}, "/nonexistent/preprocessor_config.json"),
        ({}, 42),
    ],
)
def test_spec_errors(kwargs, processor):
    with pytest.raises(ConfigError):
        if processor is None:
            PreprocessSpec(**kwargs)
        else:
            PreprocessSpec.from_image_processor(processor, "pad")


# --------------------------------------------------------------------------------------------
# Benchmark (smoke test only: no speed assertion)


def test_bench_preprocess_smoke():
    result = bench_preprocess(PreprocessOptions(size=224, aspect_ratio="pad", seconds=0.2))
    for key in (
        "ours_images_per_s",
        "hf_images_per_s",
        "speedup",
        "ours_uint8_images_per_s",
        "speedup_uint8",
        "decode_only_images_per_s",
        "pil_decode_only_images_per_s",
        "pixels_only_images_per_s",
    ):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert 0 <= result["max_abs_diff"] <= TOL
    assert result["threads"] == 1
