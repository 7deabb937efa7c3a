"""The process's memory, for both front doors: hand the allocator's free memory back to the system,
and read the resident set size and its peak; how an amount of bytes reads in a message
(:func:`human_bytes`). Pure Python (ctypes, ``/proc``); no import of ours."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


def release_free_memory() -> bool:
    """Hand the allocator's free memory back to the system (glibc ``malloc_trim(0)``: every arena).

    Decoding a large image allocates hundreds of MB in blocks that glibc keeps in its per-thread
    arenas once freed (its mmap threshold grows after the first large free), and planning a large
    job leaves its heap behind the same way: without this the process keeps holding it
    (docs/benchmarks.md). False where there is no ``malloc_trim``."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def rss_bytes() -> int | None:
    """This process's resident set size (Linux ``/proc/self/statm``), or None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, in MiB: ``VmHWM`` (Linux; reset by ``exec``, unlike
    ``ru_maxrss``, which a child started by ``fork`` + ``exec`` inherits from its parent), else
    ``ru_maxrss``; None where neither exists."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # pragma: no cover - not a Unix
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def human_bytes(n: int | float | None) -> str:
    """Bytes in decimal units: ``4.7 MB`` (whole bytes below 1 kB)."""
    value = float(n or 0)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")
