"""Generated test inputs: a corpus of broken and unusual image files, and real photos.

Reused by the decode, preprocessing, offline-job and endpoint tests. Everything is generated
locally (PIL + numpy + scikit-image's bundled photos); nothing is downloaded.

- :func:`write_bad_corpus` writes files whose expected outcome is either a stable decode error
  code or a correct RGB image; :func:`expected_rgb` gives the exact pixels for the lossless ones.
- :func:`real_photos` / :func:`write_real_photos`: scikit-image's photos (they ship in the wheel).
"""

from __future__ import annotations

import io
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "BAD_CORPUS",
    "encode",
    "expected_rgb",
    "png_bytes",
    "real_photos",
    "write_bad_corpus",
    "write_real_photos",
]

# ------------------------------------------------------------------------------------------
# Real photos


@lru_cache(maxsize=1)
def _photos() -> dict[str, np.ndarray]:
    from skimage import data as skdata

    photos = {
        "astronaut": skdata.astronaut(),
        "chelsea": skdata.chelsea(),
        "coffee": skdata.coffee(),
        "rocket": skdata.rocket(),
        "motorcycle_left": skdata.stereo_motorcycle()[0],
        "hubble_deep_field": skdata.hubble_deep_field(),
        "immunohistochemistry": skdata.immunohistochemistry(),
        "retina": skdata.retina(),
        "camera": skdata.camera(),  # greyscale
        "coins": skdata.coins(),  # greyscale
        "moon": skdata.moon(),  # greyscale
    }
    for arr in photos.values():
        arr.flags.writeable = False
    return photos


def real_photos() -> dict[str, np.ndarray]:
    """scikit-image's bundled photos (no download): name -> uint8 array, (H, W, 3) RGB or (H, W) grey.

    The arrays are read-only (cached); copy before modifying.
    """
    return dict(_photos())


def write_real_photos(dir: Path, n: int | None = None, fmt: str = "jpg") -> list[Path]:
    """Write the first ``n`` (all if None) real photos to ``dir`` as ``fmt`` (jpg: quality 90; png)."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    pil_format = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}.get(fmt.lower())
    if pil_format is None:
        raise ValueError(f"unsupported fmt {fmt!r}: use jpg, png or webp")
    paths = []
    for name, arr in list(_photos().items())[:n]:
        path = dir / f"{name}.{fmt}"
        path.write_bytes(encode(Image.fromarray(arr), pil_format))
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------
# Encoders


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    """``image`` saved in format ``fmt`` (JPEG defaults to quality 90)."""
    if fmt == "JPEG":
        kwargs.setdefault("quality", 90)
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bytes(
    arr: np.ndarray | None, bit_depth: int = 8, color_type: int | None = None, *, size=None
) -> bytes:
    """A hand-written PNG (any bit depth PIL cannot write, e.g. 16-bit RGB), or, with ``size``,
    a tiny PNG whose IHDR *declares* ``size`` = (width, height) over a few bytes of data."""
    if size is not None:
        width, height = size
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        idat = zlib.compress(b"\x00" * 64)
        return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    assert arr is not None
    height, width = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    if color_type is None:
        color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    dtype = ">u2" if bit_depth == 16 else np.uint8
    raw = np.ascontiguousarray(arr.astype(dtype)).reshape(height, -1)
    rows = b"".join(b"\x00" + raw[i].tobytes() for i in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(rows))
        + _chunk(b"IEND", b"")
    )


# ------------------------------------------------------------------------------------------
# The bad (and unusual) corpus


def _gradient(height: int = 48, width: int = 64) -> np.ndarray:
    """A deterministic RGB test picture with distinct rows, columns and channels."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 4) % 256, (y * 5) % 256, (x + y * 3) % 256], axis=-1).astype(np.uint8)


def _photo(height: int = 96, width: int = 128) -> Image.Image:
    return Image.fromarray(_photos()["astronaut"]).resize((width, height), Image.Resampling.BICUBIC)


_GRAY16 = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
_PALETTE = [255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30] + [0] * (256 * 3 - 12)
_PALETTE_INDEX = (np.add.outer(np.arange(40), np.arange(50)) % 4).astype(np.uint8)
_RGBA = np.dstack([_gradient(), (np.arange(48 * 64).reshape(48, 64) % 256).astype(np.uint8)])
_LA = np.dstack([_gradient()[..., 0], _gradient()[..., 1]])
_BILEVEL = np.add.outer(np.arange(30), np.arange(40)) % 3 == 0
_FRAME_COLORS = [(200, 30, 40), (20, 180, 60), (30, 40, 220)]


def _palette_transparent_png() -> bytes:
    image = Image.fromarray(_PALETTE_INDEX, mode="P")
    image.putpalette(_PALETTE)
    return encode(image, "PNG", transparency=0)  # index 0 (red) is fully transparent


def _animated_gif() -> bytes:
    frames = []
    for color in _FRAME_COLORS:
        frame = Image.new("P", (40, 30), 0)
        frame.putpalette(list(color) + [0] * 765)
        frames.append(frame)
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _multipage_tiff() -> bytes:
    first = Image.fromarray(_gradient())
    second = Image.fromarray(255 - _gradient())
    return encode(first, "TIFF", save_all=True, append_images=[second])


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the stored picture must be turned 90 degrees clockwise
    return encode(_photo(60, 100), "JPEG", exif=exif.tobytes(), quality=95)


def _cmyk_jpeg() -> bytes:
    cmyk = np.zeros((32, 48, 4), dtype=np.uint8)
    cmyk[:, :16] = (0, 255, 255, 0)  # red
    cmyk[:, 16:32] = (255, 0, 255, 0)  # green
    cmyk[:, 32:] = (0, 0, 0, 128)  # grey
    return encode(Image.fromarray(cmyk, mode="CMYK"), "JPEG", quality=95)


def _mpo() -> bytes:
    first, second = _photo(40, 56), _photo(40, 56).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return encode(first, "MPO", save_all=True, append_images=[second])


def _huge_header_jpeg() -> bytes:
    """A small valid JPEG whose SOF marker is patched to declare 65000 x 65000 pixels."""
    data = bytearray(encode(_photo(16, 16), "JPEG"))
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 65000, 65000)
    return bytes(data)


def _corrupt_scan_jpeg() -> bytes:
    """Valid JPEG headers, then random scan data, then a proper EOI marker: complete, but corrupt."""
    data = encode(_photo(), "JPEG")
    sos = data.find(b"\xff\xda")
    header_len = struct.unpack(">H", data[sos + 2 : sos + 4])[0]
    start = sos + 2 + header_len
    rng = np.random.default_rng(5)
    garbage = rng.integers(0, 256, len(data) - start - 2, dtype=np.uint8).tobytes()
    return data[:start] + garbage + b"\xff\xd9"


def _corrupt_idat_png() -> bytes:
    """A complete PNG (IEND present) whose compressed pixel data is damaged."""
    data = bytearray(encode(_photo(), "PNG"))
    idat = data.find(b"IDAT")
    data[idat + 40 : idat + 140] = bytes(range(100))
    return bytes(data)


def _bad_crc_png() -> bytes:
    data = bytearray(encode(Image.fromarray(_gradient()), "PNG"))
    data[29] ^= 0xFF  # the IHDR chunk's CRC
    return bytes(data)


def _tga() -> bytes:
    return encode(Image.fromarray(_gradient()), "TGA")


def _random_bytes() -> bytes:
    return np.random.default_rng(1234).integers(0, 256, 4096, dtype=np.uint8).tobytes()


_HTML = b"<!DOCTYPE html>\n<html><head><title>Not an image</title></head><body>404</body></html>\n"

# name -> (builder, expected error code or None for "decodes to a correct RGB image")
BAD_CORPUS: dict[str, tuple[object, str | None]] = {
    "empty.jpg": (lambda: b"", "empty"),
    "random_bytes.jpg": (_random_bytes, "not_an_image"),
    "page.png": (lambda: _HTML, "not_an_image"),
    "truncated.jpg": (lambda: (d := encode(_photo(), "JPEG"))[: len(d) // 2], "truncated"),
    "truncated_header.jpg": (lambda: encode(_photo(), "JPEG")[:200], "truncated"),
    "truncated.png": (lambda: (d := encode(_photo(), "PNG"))[: len(d) * 2 // 3], "truncated"),
    "truncated_header.png": (lambda: encode(_photo(), "PNG")[:40], "truncated"),
    "truncated.webp": (lambda: (d := encode(_photo(), "WEBP", quality=80))[: len(d) // 2], "truncated"),
    "truncated.gif": (lambda: (d := encode(_photo().convert("P"), "GIF"))[: len(d) // 2], "truncated"),
    "corrupt_scan.jpg": (_corrupt_scan_jpeg, "corrupt"),
    "corrupt_idat.png": (_corrupt_idat_png, "corrupt"),
    "bad_crc.png": (_bad_crc_png, "corrupt"),
    "one_pixel.png": (lambda: encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), "too_small"),
    "one_row.png": (lambda: encode(Image.new("RGB", (300, 1), (1, 2, 3)), "PNG"), "too_small"),
    "huge_header.png": (lambda: png_bytes(None, size=(100_000, 100_000)), "too_large"),
    "huge_header.jpg": (_huge_header_jpeg, "too_large"),
    "icon.ico": (lambda: encode(Image.fromarray(_gradient(32, 32)), "ICO"), "unsupported_format"),
    "picture.pcx": (lambda: encode(Image.fromarray(_gradient()), "PCX"), "unsupported_format"),
    "picture.tga": (_tga, "unsupported_format"),
    # Inputs that must decode, with a defined RGB result.
    "photo.jpg": (lambda: encode(_photo(), "JPEG"), None),
    "photo.png": (lambda: encode(Image.fromarray(_gradient()), "PNG"), None),
    "photo.webp": (lambda: encode(Image.fromarray(_gradient()), "WEBP", lossless=True), None),
    "photo.bmp": (lambda: encode(Image.fromarray(_gradient()), "BMP"), None),
    "grey.png": (lambda: encode(Image.fromarray(_gradient()[..., 0]), "PNG"), None),
    "grey.jpg": (lambda: encode(Image.fromarray(np.asarray(_photo().convert("L"))), "JPEG"), None),
    "bilevel.png": (lambda: encode(Image.fromarray(_BILEVEL), "PNG"), None),
    "cmyk.jpg": (_cmyk_jpeg, None),
    "grey16.png": (lambda: png_bytes(_GRAY16, bit_depth=16), None),
    "grey16.tiff": (lambda: encode(Image.fromarray(_GRAY16), "TIFF"), None),
    "rgb16.png": (lambda: png_bytes(_GRAY16[..., None].repeat(3, axis=2), bit_depth=16), None),
    "palette_transparent.png": (_palette_transparent_png, None),
    "rgba.png": (lambda: encode(Image.fromarray(_RGBA, mode="RGBA"), "PNG"), None),
    "la.png": (lambda: encode(Image.fromarray(_LA, mode="LA"), "PNG"), None),
    "animated.gif": (_animated_gif, None),
    "multipage.tiff": (_multipage_tiff, None),
    "exif_rotated.jpg": (_exif_rotated_jpeg, None),
    "multi_picture.mpo": (_mpo, None),
}


def write_bad_corpus(dir: Path) -> dict[str, str | None]:
    """Write the corpus into ``dir``; returns {file name: expected error code, or None when the
    file must decode to a correct RGB image (see :func:`expected_rgb`)}."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}
    for name, (build, code) in BAD_CORPUS.items():
        (dir / name).write_bytes(build())  # type: ignore[operator]
        expected[name] = code
    return expected


def expected_rgb(name: str) -> np.ndarray | None:
    """The exact (H, W, 3) uint8 pixels a lossless corpus file must decode to, else None.

    Documents LLaVA's conversion semantics (``Image.open(f).convert("RGB")``), the default: alpha is
    dropped (not composited), palette transparency shows the palette colour, 16-bit grey clips to
    white above 255 (a 16-bit RGB PNG is read as 8-bit by PIL: its high byte), 1-bit is 0/255,
    animated/multi-page files give their first frame.
    """

    def grey(arr: np.ndarray) -> np.ndarray:
        return np.repeat(arr[..., None], 3, axis=2)

    table = {
        "photo.png": lambda: _gradient(),
        "photo.webp": lambda: _gradient(),
        "photo.bmp": lambda: _gradient(),
        "grey.png": lambda: grey(_gradient()[..., 0]),
        "bilevel.png": lambda: grey(np.where(_BILEVEL, 255, 0).astype(np.uint8)),
        "grey16.png": lambda: grey(np.minimum(_GRAY16, 255).astype(np.uint8)),
        "grey16.tiff": lambda: grey(np.minimum(_GRAY16, 255).astype(np.uint8)),
        "rgb16.png": lambda: grey((_GRAY16 >> 8).astype(np.uint8)),
        "palette_transparent.png": lambda: np.asarray(_PALETTE, dtype=np.uint8).reshape(256, 3)[
            _PALETTE_INDEX
        ],
        "rgba.png": lambda: _RGBA[..., :3],
        "la.png": lambda: grey(_LA[..., 0]),
        "animated.gif": lambda: np.broadcast_to(np.asarray(_FRAME_COLORS[0], np.uint8), (30, 40, 3)),
        "multipage.tiff": lambda: _gradient(),
    }
    build = table.get(name)
    return None if build is None else np.ascontiguousarray(build())
