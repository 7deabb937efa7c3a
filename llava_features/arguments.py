"""The command line's argument types: how a flag's text becomes a value (argparse's ``type=``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["int_tuple", "key_value", "layers", "pair", "str_tuple", "width_height"]


def pair(value: str) -> tuple[int, int]:
    """``MIN,MAX`` (or ``N`` for N,N) → (MIN, MAX)."""
    parts = value.split(",")
    try:
        lo, hi = int(parts[0]), int(parts[-1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (or N), got {value!r}") from None
    return lo, hi


def int_tuple(value: str) -> tuple[int, ...]:
    """``N,N,...`` → a tuple of integers."""
    try:
        return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def layers(value: str) -> int | tuple[int, ...]:
    """``N`` or ``N,M,...`` (several hidden layers, concatenated)."""
    found = int_tuple(value)
    if not found:
        raise argparse.ArgumentTypeError(f"expected a layer index or a comma-separated list, got {value!r}")
    return found[0] if len(found) == 1 else found


def str_tuple(value: str) -> tuple[str, ...]:
    """``A,B,...`` → a tuple of strings."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


def width_height(value: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` → (width, height)."""
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {value!r}") from None
    return w, h


def key_value(value: str) -> tuple[str, Any]:
    """``KEY=VALUE`` → (key with ``-`` as ``_``, the value as JSON, else as the string it is)."""
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw
    return key.replace("-", "_"), parsed
