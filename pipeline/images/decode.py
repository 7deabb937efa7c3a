"""The decode guard: untrusted bytes in, an RGB image or a typed :class:`DecodeError` out.

Used by both the offline job and the online endpoint, so a bad input never takes either down:
:func:`decode_image` raises :class:`~pipeline.model.errors.DecodeError` and nothing else (only
``KeyboardInterrupt``/``SystemExit``-style ``BaseException`` s are left alone).

Checks, in order (each is cheap and happens before the next, costlier step):

1. ``empty``: zero bytes. ``too_large``: more than ``DecodeConfig.max_bytes``.
2. Identification from the header only (``PIL.Image.open``, restricted to the allow-list).
   Not identified: ``unsupported_format`` when another PIL plugin recognises the bytes (ICO, PCX,
   TGA, PSD, ...), ``truncated``/``corrupt`` when they carry the signature of an allowed format,
   else ``not_an_image``.
3. ``too_large`` when the size *declared by the header* exceeds ``max_image_pixels`` and
   ``too_small`` when a side is shorter than ``min_side``: refused before any pixel is decoded,
   so a decompression bomb costs a header parse. Ours is authoritative; PIL's own bomb check
   (the process-wide ``Image.MAX_IMAGE_PIXELS``: a warning above it, an error above twice it)
   is raised to our limit once, explicitly, by whoever builds a decoder
   (:func:`raise_pil_pixel_limit`, called by :class:`~pipeline.images.preprocess.Preprocessor`),
   so that the two never disagree; it is never lowered.
4. Full decode (``img.load()``) inside the guard, with ``ImageFile.LOAD_TRUNCATED_IMAGES`` left
   untouched (False): a file cut short is ``truncated``; any other decoder failure is ``corrupt``.
5. EXIF orientation, only when asked (``exif_transpose=True``; LLaVA and the CLIP processors do
   not apply it, so by default an image is encoded as stored; a broken EXIF block is ignored).
6. Conversion to RGB (:func:`to_rgb`): LLaVA's ``convert("RGB")``, or transformers' composite
   onto white for transparency (``alpha="white"``), and 16-bit images as LLaVA sees them unless
   ``sixteen_bit="high_byte"``.

Error mapping of decoder failures (:func:`_failure_code`): messages from PIL that say so
("image file is truncated", "Truncated File Read"), ``EOFError``, and any other failure of a
file whose own structure shows it ends early (JPEG without its EOI marker, PNG without IEND, GIF
without its trailer, a RIFF/WebP, BMP or TIFF header pointing past the end of the data) are
``truncated``. So PIL's "broken data stream" is ``truncated`` for a file cut short and
``corrupt`` for a complete file with garbage inside. Everything else is ``corrupt``;
``MemoryError`` and ``DecompressionBombError`` are ``too_large``.

Reported ``width``/``height`` are those of the image that is encoded: as stored, or after the EXIF
orientation when it is applied (a portrait photo stored as 4000x3000 with orientation 6 is then
3000x4000).
"""

from __future__ import annotations

import io
import logging
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..config import DecodeConfig
from ..model.errors import DecodeError, ErrorCode

logger = logging.getLogger(__name__)

__all__ = ["DecodedImage", "decode_image", "raise_pil_pixel_limit", "to_rgb"]

_DEFAULT_CONFIG = DecodeConfig()

# Formats that are read as another one: an MPO (multi-picture JPEG, from phones and cameras)
# is a baseline JPEG followed by more JPEGs, and its first frame is what every viewer shows.
_FORMAT_ALIASES = {"MPO": "JPEG"}


@dataclass(frozen=True)
class DecodedImage:
    """A decoded input: an RGB image and its size as displayed (after EXIF orientation)."""

    image: Image.Image
    """The decoded image, mode ``RGB``, fully loaded."""
    width: int
    """Width in pixels, after EXIF orientation."""
    height: int
    """Height in pixels, after EXIF orientation."""
    format: str
    """PIL format name of the input (``JPEG``, ``PNG``, ``WEBP``, ``GIF``, ``BMP``, ``TIFF``; MPO is ``JPEG``)."""


def raise_pil_pixel_limit(max_image_pixels: int) -> None:
    """Raise PIL's process-wide decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) to at least
    ``max_image_pixels``, so that PIL never warns about or refuses an image our guard accepts.

    Our check (the declared size against ``DecodeConfig.max_image_pixels``, before decoding) is
    the authoritative one. The limit is only ever raised, never lowered, and a disabled limit
    (None) stays disabled. Call it when building a decoder, not per image.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and current < max_image_pixels:
        logger.debug("raising PIL.Image.MAX_IMAGE_PIXELS from %s to %s", current, max_image_pixels)
        Image.MAX_IMAGE_PIXELS = max_image_pixels


def decode_image(
    data: bytes | bytearray | memoryview,
    name: str | None = None,
    config: DecodeConfig | None = None,
    *,
    exif_transpose: bool = False,
    alpha: str = "drop",
    sixteen_bit: str = "llava",
) -> DecodedImage:
    """Decode untrusted ``data`` into an RGB image, or raise :class:`DecodeError`.

    ``name`` (a file name or URI) is only used in error messages. ``config`` defaults to
    ``DecodeConfig()``; ``exif_transpose``, ``alpha`` and ``sixteen_bit`` as in the module docstring
    (the defaults are LLaVA's). Never raises anything but ``DecodeError`` (for ``Exception`` s).
    """
    cfg = config if config is not None else _DEFAULT_CONFIG
    try:
        return _decode(data, name, cfg, exif_transpose, alpha, sixteen_bit)
    except DecodeError:
        raise
    except MemoryError as exc:
        logger.debug("decode of %s ran out of memory", name, exc_info=True)
        raise DecodeError(
            f"out of memory while decoding ({exc})", code=ErrorCode.TOO_LARGE, name=name
        ) from None
    except Exception as exc:  # the guard's contract: nothing else escapes
        logger.debug("unexpected failure decoding %s", name, exc_info=True)
        raise DecodeError(
            f"could not decode image ({type(exc).__name__}: {exc})", code=ErrorCode.CORRUPT, name=name
        ) from None


def _decode(
    data: bytes | bytearray | memoryview,
    name: str | None,
    cfg: DecodeConfig,
    exif_transpose: bool,
    alpha: str,
    sixteen_bit: str,
) -> DecodedImage:
    if data is None:
        raise DecodeError("no data (None)", code=ErrorCode.EMPTY, name=name)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(
            f"expected bytes, got {type(data).__name__}", code=ErrorCode.NOT_AN_IMAGE, name=name
        )
    if isinstance(data, memoryview):
        data = data.tobytes()
    size = len(data)
    if size == 0:
        raise DecodeError("empty input (0 bytes)", code=ErrorCode.EMPTY, name=name)
    if size > cfg.max_bytes:
        raise DecodeError(
            f"input is {size} bytes, more than the limit of {cfg.max_bytes} bytes",
            code=ErrorCode.TOO_LARGE,
            name=name,
        )

    allowed = _allowed_formats(tuple(cfg.allowed_formats))
    img = _open(data, name, allowed, cfg.max_image_pixels)

    fmt = _FORMAT_ALIASES.get(img.format or "", img.format or "")
    if fmt not in allowed.names:
        raise DecodeError(
            f"format {img.format} is not accepted (accepted: {', '.join(sorted(allowed.names))})",
            code=ErrorCode.UNSUPPORTED_FORMAT,
            name=name,
        )

    width, height = img.size
    if width <= 0 or height <= 0:
        raise DecodeError(f"invalid declared size {width}x{height}", code=ErrorCode.CORRUPT, name=name)
    if width * height > cfg.max_image_pixels:
        raise DecodeError(
            f"declared size {width}x{height} ({width * height} pixels) exceeds the limit of "
            f"{cfg.max_image_pixels} pixels",
            code=ErrorCode.TOO_LARGE,
            name=name,
        )
    if min(width, height) < cfg.min_side:
        raise DecodeError(
            f"image is {width}x{height}; both sides must be at least {cfg.min_side} pixels",
            code=ErrorCode.TOO_SMALL,
            name=name,
        )

    if ImageFile.LOAD_TRUNCATED_IMAGES:
        _warn_load_truncated()
    try:
        img.load()
    except Exception as exc:
        code = _failure_code(exc, data, fmt)
        logger.debug("load failed for %s: %r -> %s", name, exc, code)
        raise DecodeError(_describe(exc, code), code=code, name=name) from None

    if exif_transpose:
        img = _exif_transpose(img, name)
    rgb = to_rgb(img, name=name, alpha=alpha, sixteen_bit=sixteen_bit)
    return DecodedImage(image=rgb, width=rgb.width, height=rgb.height, format=fmt)


@lru_cache(maxsize=1)
def _warn_load_truncated() -> None:
    logger.warning(
        "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True elsewhere in this process: truncated "
        "images now decode partially instead of failing as 'truncated'"
    )


# --------------------------------------------------------------------------------------------
# Identification


@dataclass(frozen=True)
class _Allowed:
    names: frozenset[str]
    """Allowed format names as reported (aliases resolved)."""
    pil_formats: tuple[str, ...]
    """Names passed to ``Image.open(formats=...)``: the allowed formats PIL can open, common first."""


@lru_cache(maxsize=32)
def _allowed_formats(formats: tuple[str, ...]) -> _Allowed:
    names = {_FORMAT_ALIASES.get(f.upper(), f.upper()) for f in formats}
    if not names <= set(Image.OPEN):
        Image.init()  # registers every plugin (WEBP and TIFF are not pre-registered)
    unknown = sorted(names - set(Image.OPEN))
    if unknown:
        logger.warning("allowed_formats lists formats PIL cannot read, ignored: %s", unknown)
    # Most common first: Image.open tries them in order. (MPO files are opened by the JPEG
    # plugin, which returns an MpoImageFile; MPO is not a separate opener.)
    order = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]
    readable = names - set(unknown)
    pil_formats = tuple(sorted(readable, key=lambda f: (order.index(f) if f in order else 99, f)))
    return _Allowed(names=frozenset(readable), pil_formats=pil_formats)


def _open(data: bytes | bytearray, name: str | None, allowed: _Allowed, max_pixels: int) -> Image.Image:
    """``Image.open`` restricted to the allowed formats: parses the header, decodes nothing."""
    try:
        return Image.open(io.BytesIO(data), formats=list(allowed.pil_formats))
    except Image.DecompressionBombError as exc:
        raise DecodeError(
            f"declared image size exceeds the limit of {max_pixels} pixels ({exc})",
            code=ErrorCode.TOO_LARGE,
            name=name,
        ) from None
    except UnidentifiedImageError:
        pass
    except Exception as exc:  # a plugin accepted the signature, then failed on the header
        code = _failure_code(exc, data, _sniff(data, allowed.names))
        logger.debug("open failed for %s: %r -> %s", name, exc, code)
        raise DecodeError(_describe(exc, code), code=code, name=name) from None

    sniffed = _sniff(data, allowed.names)
    if sniffed is not None:
        # It starts like an accepted format, but PIL could not even parse the header.
        code = ErrorCode.TRUNCATED if _looks_truncated(data, sniffed) else ErrorCode.CORRUPT
        msg = "file ends inside its header" if code == ErrorCode.TRUNCATED else "unreadable header"
        raise DecodeError(f"{sniffed} {msg}", code=code, name=name)

    other = _identify_any(data)
    if other is not None:
        raise DecodeError(
            f"format {other} is not accepted (accepted: {', '.join(sorted(allowed.names))})",
            code=ErrorCode.UNSUPPORTED_FORMAT,
            name=name,
        )
    raise DecodeError(
        "not an image (no known image format recognised)", code=ErrorCode.NOT_AN_IMAGE, name=name
    )


def _identify_any(data: bytes | bytearray) -> str | None:
    """Name of the format any PIL plugin recognises in ``data`` (header only), or None."""
    try:
        with Image.open(io.BytesIO(data)) as other:
            return str(other.format)
    except Image.DecompressionBombError:
        return "an image format"  # a recognised (huge) image of some format
    except Exception:
        return None


_SIGNATURES: tuple[tuple[str, tuple[bytes, ...]], ...] = (
    ("JPEG", (b"\xff\xd8\xff",)),
    ("PNG", (b"\x89PNG\r\n\x1a\n",)),
    ("GIF", (b"GIF87a", b"GIF89a")),
    ("BMP", (b"BM",)),
    ("TIFF", (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")),
)


def _sniff(data: bytes | bytearray, names: Iterable[str]) -> str | None:
    """The allowed format whose magic number starts ``data``, if any."""
    names = set(names)
    head = bytes(data[:16])
    if "WEBP" in names and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for fmt, magics in _SIGNATURES:
        if fmt in names and head.startswith(magics):
            return fmt
    return None


def _looks_truncated(data: bytes | bytearray, fmt: str | None) -> bool:
    """Whether the structure of a file of format ``fmt`` shows that ``data`` ends early."""
    n = len(data)
    try:
        if fmt == "JPEG":
            return not bytes(data[-64:]).rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
        if fmt == "PNG":
            return b"IEND" not in bytes(data[-64:])
        if fmt == "GIF":
            return not bytes(data[-16:]).rstrip(b"\x00").endswith(b";")
        if fmt == "WEBP":
            return n < 12 or struct.unpack_from("<I", data, 4)[0] + 8 > n
        if fmt == "BMP":
            return n < 14 or struct.unpack_from("<I", data, 2)[0] > n
        if fmt == "TIFF":
            if n < 8:
                return True
            order = "<" if data[:2] == b"II" else ">"
            if data[2:4] in (b"+\x00", b"\x00+"):  # BigTIFF: 8-byte offset at 8
                return n < 16 or struct.unpack_from(order + "Q", data, 8)[0] + 8 > n
            return struct.unpack_from(order + "I", data, 4)[0] + 2 > n
    except (struct.error, ValueError, IndexError):
        return True
    return False


def _failure_code(exc: BaseException, data: bytes | bytearray, fmt: str | None) -> ErrorCode:
    """Error code of a failure of PIL to open or load ``data`` (format ``fmt``)."""
    if isinstance(exc, Image.DecompressionBombError | MemoryError):
        return ErrorCode.TOO_LARGE
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
        return ErrorCode.TRUNCATED
    if _looks_truncated(data, fmt):
        return ErrorCode.TRUNCATED
    return ErrorCode.CORRUPT


def _describe(exc: BaseException, code: ErrorCode) -> str:
    what = {
        ErrorCode.TRUNCATED: "image data is truncated",
        ErrorCode.TOO_LARGE: "image is too large to decode",
    }.get(code, "image data is corrupt")
    detail = str(exc) or type(exc).__name__
    return f"{what} ({detail})"


# --------------------------------------------------------------------------------------------
# Orientation and colour


def _exif_transpose(img: Image.Image, name: str | None) -> Image.Image:
    """Apply the EXIF orientation tag in place; a broken EXIF block leaves the image as stored."""
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:
        logger.debug("ignoring unreadable EXIF orientation of %s", name, exc_info=True)
    return img


_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def _has_alpha(img: Image.Image) -> bool:
    """transformers' test in ``convert_to_rgb``: an alpha band, or a transparent colour/index."""
    return "A" in img.getbands() or img.info.get("transparency") is not None


def to_rgb(
    img: Image.Image, name: str | None = None, *, alpha: str = "drop", sixteen_bit: str = "llava"
) -> Image.Image:
    """Convert a loaded PIL image of any mode to RGB.

    By default exactly as LLaVA's ``Image.open(f).convert("RGB")``:

    - ``RGB``: returned as is (no copy).
    - Every other mode: PIL's ``convert("RGB")``: ``L``, ``1`` (0/255), ``P``, ``CMYK`` (PIL's plain
      formula ``R = (255 - C) * (255 - K) / 255``, no ICC colour management), ``YCbCr``, ``LAB``,
      ``HSV``, ``RGBX``, ``F`` (rounded, clipped); transparency (``RGBA``, ``LA``, ``PA``, ``P`` with
      a transparent index, ``RGBa``) is **dropped**, not composited: fully transparent pixels show
      whatever colour they store (often black); 16-bit (``I;16*``) and 32-bit ``I`` images clip every
      value above 255 to white (a 16-bit grey PNG becomes almost all white), as in LLaVA.
    - Modes PIL cannot convert directly (premultiplied ``La``, where LLaVA's own call raises) go
      through ``RGBA`` or ``LA``; a mode that still cannot be converted raises
      ``DecodeError(unsupported_format)``.

    ``alpha="white"``: images with transparency are composited onto white first, as transformers'
    ``convert_to_rgb`` does (what llava-hf processors do with ``do_convert_rgb``).
    ``sixteen_bit="high_byte"`` (opt-in): 16-bit and ``I`` values are clipped to 0..65535 and scaled
    to 8 bits by keeping the high byte (``v >> 8``), the mapping PIL itself applies when it reads
    16-bit RGB PNGs, so the picture looks as it should.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    try:
        if sixteen_bit == "high_byte" and mode in _SIXTEEN_BIT_MODES:
            arr = np.asarray(img)
            if arr.dtype != np.uint16:
                arr = np.clip(arr, 0, 65535)
            eight = (arr.astype(np.uint16, copy=False) >> 8).astype(np.uint8)
            return Image.fromarray(eight).convert("RGB")
        if alpha == "white" and _has_alpha(img):
            rgba = img.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert(
                "RGB"
            )
        try:
            return img.convert("RGB")
        except ValueError:
            for via in ("RGBA", "LA"):  # e.g. premultiplied "La" only converts to "LA"
                try:
                    return img.convert(via).convert("RGB")
                except ValueError:
                    pass
            raise
    except ValueError as exc:
        raise DecodeError(
            f"image mode {mode} cannot be converted to RGB ({exc})",
            code=ErrorCode.UNSUPPORTED_FORMAT,
            name=name,
        ) from None
