"""Names that are not UTF-8: a POSIX file name or a tar member name is bytes, and may not decode.

Python reads such a name as text with ``surrogateescape`` (each byte that is not UTF-8 becomes a
lone surrogate, ``b"bad\\xff"`` → ``"bad\\udcff"``): it opens the file again exactly, but Arrow,
Parquet and JSON take UTF-8 only. Two forms, both lossless:

- :func:`name_text`, for the feature table (``image_id``, ``uri``, messages): the name unchanged when
  it is UTF-8 (nearly always); otherwise each byte that is not UTF-8 written ``\\xNN`` and each
  backslash ``\\\\``, so that :func:`name_bytes` (``codecs.escape_decode``) gives the name's bytes back.
- :func:`to_hop` / :func:`from_hop`, for the plan's rows crossing the Ray hop: a strict round trip
  of any Python string (a name that is not UTF-8 travels as ``"\\0"`` + its text form; no name
  starts with NUL).
"""

from __future__ import annotations

import codecs
import os

__all__ = ["from_hop", "name_bytes", "name_text", "to_hop"]

_HOP_MARK = "\0"


def _is_utf8(name: str) -> bool:
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def name_text(name: str) -> str:
    """``name`` as UTF-8 text: unchanged when it is UTF-8, else escaped (see the module docstring)."""
    if _is_utf8(name):
        return name
    raw = name.encode("utf-8", "surrogateescape").replace(b"\\", b"\\\\")
    return raw.decode("utf-8", "backslashreplace")


def name_bytes(text: str) -> bytes:
    """The bytes of a name stored by :func:`name_text` in its escaped form (``\\xNN``, ``\\\\``)."""
    return codecs.escape_decode(text.encode("utf-8"))[0]  # type: ignore[no-any-return]


def to_hop(value: str) -> str:
    """``value`` as UTF-8 text that :func:`from_hop` turns back into exactly ``value``."""
    return value if _is_utf8(value) else _HOP_MARK + name_text(value)


def from_hop(value: str) -> str:
    """The string :func:`to_hop` was given."""
    if not value.startswith(_HOP_MARK):
        return value
    return os.fsdecode(name_bytes(value[len(_HOP_MARK) :]))
