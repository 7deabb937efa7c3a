"""The decode guard: every bad input gives a typed error with a stable code, every good one an RGB image."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.config import DecodeConfig
from pipeline.images.decode import DecodedImage, decode_image, to_rgb
from pipeline.model.errors import DECODE_ERROR_CODES, DecodeError, ErrorCode
from tests.corpus import encode, expected_rgb, png_bytes, real_photos, write_bad_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    folder = tmp_path_factory.mktemp("bad_corpus")
    return folder, write_bad_corpus(folder)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(real_photos()["astronaut"]).resize((160, 120), Image.Resampling.BICUBIC)


def _decode(path: Path) -> DecodedImage:
    return decode_image(path.read_bytes(), name=path.name)


def _code(data: bytes, config: DecodeConfig | None = None) -> str:
    with pytest.raises(DecodeError) as info:
        decode_image(data, name="x", config=config)
    assert info.value.code in DECODE_ERROR_CODES
    return str(info.value.code)


# --------------------------------------------------------------------------------------------
# The corpus


def test_corpus_covers_every_decode_error_code(corpus):
    _, expected = corpus
    assert {code for code in expected.values() if code} == {str(c) for c in DECODE_ERROR_CODES}


def test_corpus_outcomes(corpus):
    folder, expected = corpus
    for name, code in expected.items():
        data = (folder / name).read_bytes()
        if code is None:
            result = decode_image(data, name=name)
            assert isinstance(result, DecodedImage), name
            assert result.image.mode == "RGB", name
            assert result.image.size == (result.width, result.height), name
            want = expected_rgb(name)
            if want is not None:
                np.testing.assert_array_equal(np.asarray(result.image), want, err_msg=name)
        else:
            with pytest.raises(DecodeError) as info:
                decode_image(data, name=name)
            err = info.value
            assert err.code == code, f"{name}: expected {code}, got {err.code} ({err.message})"
            assert name in err.message and len(err.message) > len(name) + 5
            assert err.to_dict() == {"error_code": code, "error_message": err.message}


def test_formats_reported(corpus):
    folder, _ = corpus
    formats = {
        "photo.jpg": "JPEG",
        "photo.png": "PNG",
        "photo.webp": "WEBP",
        "photo.bmp": "BMP",
        "animated.gif": "GIF",
        "multipage.tiff": "TIFF",
        "multi_picture.mpo": "JPEG",  # MPO counts as JPEG
    }
    for name, fmt in formats.items():
        assert _decode(folder / name).format == fmt, name


def test_exif_orientation_is_ignored_like_llava_unless_asked(corpus):
    """LLaVA and the CLIP processors encode an image as stored: so does the default; the EXIF
    orientation is applied only with ``exif_transpose`` (``decode.exif_transpose``, opt-in)."""
    folder, _ = corpus
    data = (folder / "exif_rotated.jpg").read_bytes()
    stored = Image.open(folder / "exif_rotated.jpg").convert("RGB")  # what LLaVA's loader gives
    assert stored.size == (100, 60)
    result = decode_image(data)
    assert (result.width, result.height) == (100, 60)
    np.testing.assert_array_equal(np.asarray(result.image), np.asarray(stored))
    rotated = decode_image(data, exif_transpose=True)
    assert (rotated.width, rotated.height) == (60, 100)  # the size as displayed
    # Orientation 6 = rotate 90 degrees clockwise = np.rot90 with k=-1.
    np.testing.assert_array_equal(np.asarray(rotated.image), np.rot90(np.asarray(stored), k=-1))


def test_lossy_conversions_match_pil_convert_rgb(corpus):
    """CMYK, greyscale JPEG and MPO: exactly what LLaVA's ``Image.open(f).convert("RGB")`` gives."""
    folder, _ = corpus
    for name in ("cmyk.jpg", "grey.jpg", "multi_picture.mpo", "photo.jpg"):
        reference = np.asarray(Image.open(folder / name).convert("RGB"))
        np.testing.assert_array_equal(np.asarray(_decode(folder / name).image), reference, err_msg=name)
    cmyk = np.asarray(_decode(folder / "cmyk.jpg").image).astype(int)
    red, green, grey = cmyk[16, 8], cmyk[16, 24], cmyk[16, 40]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    assert green[1] > 200 and green[0] < 60 and green[2] < 60
    assert abs(grey[0] - grey[1]) < 8 and 100 < grey[0] < 160
    grey_jpeg = np.asarray(_decode(folder / "grey.jpg").image)
    assert (grey_jpeg[..., 0] == grey_jpeg[..., 1]).all() and (grey_jpeg[..., 1] == grey_jpeg[..., 2]).all()


def test_sixteen_bit_clips_like_llava_unless_high_byte_is_asked(corpus):
    folder, _ = corpus
    src = Image.open(folder / "grey16.png")
    assert src.mode == "I;16"
    # LLaVA's convert("RGB") clips everything above 255 to white: the default does the same.
    clipped = np.asarray(src.convert("RGB"))
    assert (clipped == 255).mean() > 0.9
    np.testing.assert_array_equal(np.asarray(_decode(folder / "grey16.png").image), clipped)
    # Opt-in: keep the high byte, the full range survives.
    data = (folder / "grey16.png").read_bytes()
    decoded = np.asarray(decode_image(data, sixteen_bit="high_byte").image)
    assert decoded.max() > 200 and decoded.min() == 0
    # A 16-bit RGB PNG of the same picture (which PIL reads as 8-bit by keeping the high byte)
    # decodes to the same pixels.
    np.testing.assert_array_equal(decoded, np.asarray(_decode(folder / "rgb16.png").image))


def test_transparency_is_dropped_like_llava(corpus):
    """LLaVA calls convert("RGB"): alpha is dropped, not composited on white (unlike HF's convert_to_rgb)."""
    folder, _ = corpus
    for name in ("rgba.png", "la.png", "palette_transparent.png"):
        llava = np.asarray(Image.open(folder / name).convert("RGB"))
        np.testing.assert_array_equal(np.asarray(_decode(folder / name).image), llava, err_msg=name)
    palette = np.asarray(_decode(folder / "palette_transparent.png").image)
    assert tuple(palette[0, 0]) == (255, 0, 0)  # index 0 is transparent, its palette colour shows


def test_transparency_onto_white_like_transformers(corpus):
    """``alpha="white"`` (the llava-hf layout's rule): transformers' own ``convert_to_rgb``, exactly."""
    from transformers.image_transforms import convert_to_rgb

    folder, _ = corpus
    for name in ("rgba.png", "la.png", "palette_transparent.png", "photo.png", "grey.png", "cmyk.jpg"):
        image = Image.open(folder / name)
        want = convert_to_rgb(image, return_numpy=True)
        got = np.asarray(decode_image((folder / name).read_bytes(), alpha="white").image)
        np.testing.assert_array_equal(got, want, err_msg=name)
    palette = np.asarray(decode_image((folder / "palette_transparent.png").read_bytes(), alpha="white").image)
    assert tuple(palette[0, 0]) == (255, 255, 255)  # the transparent index is white now


def test_first_frame_of_animations_and_multipage(corpus):
    folder, _ = corpus
    gif = Image.open(folder / "animated.gif")
    assert getattr(gif, "n_frames", 1) == 3
    tiff = Image.open(folder / "multipage.tiff")
    assert getattr(tiff, "n_frames", 1) == 2
    np.testing.assert_array_equal(
        np.asarray(_decode(folder / "multipage.tiff").image), expected_rgb("multipage.tiff")
    )


def test_to_rgb_every_mode():
    for mode in (
        "1",
        "L",
        "P",
        "PA",
        "LA",
        "La",
        "RGBA",
        "RGBa",
        "RGBX",
        "CMYK",
        "YCbCr",
        "LAB",
        "HSV",
        "I",
        "F",
    ):
        image = Image.new(mode, (4, 3))
        out = to_rgb(image)
        assert out.mode == "RGB" and out.size == (4, 3), mode
    for mode in ("I;16", "I;16B", "I;16L"):
        image = Image.new(mode, (4, 3), 40000)
        assert np.asarray(to_rgb(image))[0, 0].tolist() == [255] * 3, mode  # LLaVA's convert("RGB")
        assert np.asarray(to_rgb(image, sixteen_bit="high_byte"))[0, 0].tolist() == [40000 >> 8] * 3, mode
    big = Image.fromarray(np.array([[-5, 70000, 256 * 100]], dtype=np.int32))
    assert np.asarray(to_rgb(big))[0, :, 0].tolist() == np.asarray(big.convert("RGB"))[0, :, 0].tolist()
    assert np.asarray(to_rgb(big, sixteen_bit="high_byte"))[0, :, 0].tolist() == [0, 255, 100]
    rgb = Image.new("RGB", (2, 2))
    assert to_rgb(rgb) is rgb


# --------------------------------------------------------------------------------------------
# Limits


def test_bomb_is_refused_from_the_header_without_decoding(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    before = Image.MAX_IMAGE_PIXELS
    loads: list[object] = []
    original = ImageFile.ImageFile.load

    def spy(self):
        loads.append(self)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # Above twice the limit (PIL raises), and between the limit and twice it (PIL only warns).
        for size in [(100_000, 100_000), (30_000, 20_000), (12_000, 10_000)]:
            start = time.perf_counter()
            assert _code(png_bytes(None, size=size)) == "too_large"
            assert time.perf_counter() - start < 0.5
    assert loads == []
    # Between the limit and twice it PIL only warns; our check refuses it, before any decode.
    config = DecodeConfig(max_image_pixels=1000)
    data = encode(Image.new("RGB", (40, 40)), "PNG")  # 1600 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert _code(data, config) == "too_large"
    assert loads == []
    assert before == Image.MAX_IMAGE_PIXELS  # decoding never writes PIL's process-wide limit
    decode_image(encode(Image.new("RGB", (40, 20)), "PNG"), config=config)  # 800 pixels: fine
    assert len({id(image) for image in loads}) == 1


def test_pil_limit_is_raised_once_explicitly_never_per_decode(monkeypatch):
    """PIL's process-wide bomb check never disagrees with ours: building a decoder (a Preprocessor)
    raises it to the guard's limit, once; decoding itself never writes it; it is never lowered."""
    from pipeline.images.preprocess import Preprocessor
    from pipeline.images.spec import PreprocessSpec

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # PIL's default; restored afterwards
    decode_image(encode(Image.new("RGB", (8, 8)), "PNG"), config=DecodeConfig(max_image_pixels=123_456_789))
    assert Image.MAX_IMAGE_PIXELS == 89_478_485
    Preprocessor(PreprocessSpec(), DecodeConfig(max_image_pixels=123_456_789))
    assert Image.MAX_IMAGE_PIXELS == 123_456_789
    Preprocessor(PreprocessSpec(), DecodeConfig(max_image_pixels=1000))  # a stricter guard: ours refuses
    assert Image.MAX_IMAGE_PIXELS == 123_456_789
    Preprocessor(PreprocessSpec())
    assert DecodeConfig().max_image_pixels <= Image.MAX_IMAGE_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_max_bytes_and_min_side(photo):
    data = encode(photo, "JPEG")
    assert _code(data, DecodeConfig(max_bytes=len(data) - 1)) == "too_large"
    assert decode_image(data, config=DecodeConfig(max_bytes=len(data))).width == 160
    assert _code(data, DecodeConfig(min_side=121)) == "too_small"
    assert decode_image(data, config=DecodeConfig(min_side=120)).height == 120


def test_allowed_formats(photo):
    png = encode(photo, "PNG")
    only_jpeg = DecodeConfig(allowed_formats=("JPEG",))
    assert _code(png, only_jpeg) == "unsupported_format"
    assert decode_image(encode(photo, "JPEG"), config=only_jpeg).format == "JPEG"
    mpo = encode(photo, "MPO", save_all=True, append_images=[photo])
    assert decode_image(mpo, config=only_jpeg).format == "JPEG"
    assert decode_image(png, config=DecodeConfig(allowed_formats=("png",))).format == "PNG"


def test_not_bytes_and_empty():
    assert _code(b"") == "empty"
    assert _code(None) == "empty"  # type: ignore[arg-type]
    assert _code("not bytes") == "not_an_image"  # type: ignore[arg-type]
    assert _code(b"\x00") == "not_an_image"
    data = encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG")
    assert decode_image(bytearray(data)).image.getpixel((0, 0)) == (1, 2, 3)
    assert decode_image(memoryview(data)).image.getpixel((0, 0)) == (1, 2, 3)


def test_unexpected_exceptions_become_corrupt(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("plugin bug")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    with pytest.raises(DecodeError) as info:
        decode_image(encode(Image.new("RGB", (8, 8)), "PNG"), name="bug.png")
    assert info.value.code == ErrorCode.CORRUPT
    assert "plugin bug" in info.value.message


def test_broken_exif_is_ignored(photo, monkeypatch):
    from PIL import ImageOps

    def broken(*args, **kwargs):
        raise ValueError("bad EXIF")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    result = decode_image(encode(photo, "JPEG"))
    assert (result.width, result.height) == (160, 120)


# --------------------------------------------------------------------------------------------
# Fuzzing: nothing but DecodedImage or DecodeError, ever


def _mutations(data: bytes, rng: np.random.Generator, count: int) -> list[bytes]:
    out = []
    for i in range(count):
        buf = bytearray(data)
        kind = i % 6
        if kind == 0:  # truncate anywhere
            out.append(bytes(buf[: int(rng.integers(0, len(buf)))]))
            continue
        if kind == 1:  # flip random bytes
            for _ in range(int(rng.integers(1, 20))):
                buf[int(rng.integers(0, len(buf)))] = int(rng.integers(0, 256))
        elif kind == 2:  # damage the header
            at = int(rng.integers(0, min(len(buf), 300)))
            buf[at : at + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        elif kind == 3:  # drop a slice
            at = int(rng.integers(0, len(buf)))
            del buf[at : at + int(rng.integers(1, 500))]
        elif kind == 4:  # insert garbage
            at = int(rng.integers(0, len(buf)))
            buf[at:at] = rng.integers(0, 256, int(rng.integers(1, 300)), dtype=np.uint8).tobytes()
        else:  # flip one bit early on
            at = int(rng.integers(0, min(len(buf), 64)))
            buf[at] ^= 1 << int(rng.integers(0, 8))
        out.append(bytes(buf))
    return out


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"])
def test_fuzz_never_raises_anything_else(photo, fmt):
    image = photo.convert("P") if fmt == "GIF" else photo
    data = encode(image, fmt, **({"compression": "tiff_lzw"} if fmt == "TIFF" else {}))
    rng = np.random.default_rng(sum(map(ord, fmt)))
    count = 200 if fmt in ("JPEG", "PNG") else 60
    outcomes = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mutated in _mutations(data, rng, count):
            try:
                result = decode_image(mutated, name=f"fuzz.{fmt.lower()}")
            except DecodeError as err:
                assert err.code in DECODE_ERROR_CODES
                outcomes.add(str(err.code))
            else:
                assert isinstance(result, DecodedImage) and result.image.mode == "RGB"
                outcomes.add("ok")
    assert "truncated" in outcomes or "corrupt" in outcomes
