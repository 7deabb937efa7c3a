"""``llava-features bench profile``: a per-op profile of :meth:`FeatureEncoder.encode_core`.

Random weights of the configured architecture (as in ``bench encoder``), one variant (``fast`` by
default; ``--compile`` for ``compiled``, ``--no-fast`` for ``plain``), one batch size: after
warm-up calls, ``torch.profiler`` records ``batches`` calls (CPU and, on a GPU, CUDA activity).

Returned (and written with ``--table`` / ``--trace``): the operator table sorted by self device
time (self CPU time on a CPU), the device time by kind of kernel — GEMM, attention, and the rest
(normalisation, activations, copies, element-wise) — with its share, and optionally a Chrome
trace (``.json``, or gzip-compressed when the path ends in ``.gz``), left out when it is larger
than ``max_trace_mb`` compressed.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..measure.environment import environment
from ..measure.options import BenchOptions
from ..measure.timing import synchronize
from ..model.config import setting
from ..model.constants import CompileMode, ComputeDtype
from .arch import bench_arch
from .encoder import Variant, make_bench_encoder, random_pixels
from .models import random_modules

if TYPE_CHECKING:
    from ..config import Config

logger = logging.getLogger(__name__)

KERNEL_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "attn", "cudnn_sdpa", "sdpa")),
    (
        "gemm",
        (
            "gemm",
            "cutlass",
            "xmma",
            "nvjet",
            "cublas",
            "sm90_",
            "sm80_",
            "ampere_",
            "triton_tem",
            "addmm",
            "matmul",
        ),
    ),
)
"""Substrings (lower case) of kernel names by kind, tried in order; anything else is ``other``
(``triton_tem``: inductor's GEMM templates under ``max-autotune``). A classification by name: an
element-wise kernel named after the attention it feeds counts as attention."""


def kernel_kind(name: str) -> str:
    """``attention``, ``gemm`` or ``other`` for a kernel (or operator) name."""
    lowered = name.lower()
    for kind, needles in KERNEL_KINDS:
        if any(n in lowered for n in needles):
            return kind
    return "other"


def _self_time_us(event: Any, cuda: bool) -> float:
    """Self device time (CUDA) or self CPU time of a profiler average, in microseconds."""
    if not cuda:
        return float(getattr(event, "self_cpu_time_total", 0.0))
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


@dataclass(frozen=True)
class ProfileOptions(BenchOptions):
    """Options of ``bench profile``."""

    SECTION: ClassVar[str] = "bench.profile"

    tiny: bool = False
    """Profile the tiny test architecture (56 px, 3 layers) instead of the config's."""
    device: str | None = None
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (default: the config's ``model.device``)."""
    dtype: ComputeDtype | None = None
    """Compute dtype (default: the config's ``model.dtype``)."""
    batch_size: int | None = setting(None, ge=1)
    """Images per call (default 256 on a GPU, 8 for the tiny one on a CPU, else 2)."""
    batches: int = setting(3, ge=1)
    """Calls recorded by the profiler."""
    warmup: int = setting(2, ge=0)
    """Calls before the profiler starts (at least one runs)."""
    variant: Variant = "fast"
    """The encoder variant profiled: ``plain``, ``fast`` or ``compiled``."""
    compile_mode: CompileMode | None = None
    """``torch.compile`` mode of the compiled variant (null: torch's default)."""
    table: str | None = None
    """Write the operator table here (text)."""
    trace: str | None = None
    """Write the Chrome trace here (``.json``, or gzip-compressed when it ends in ``.gz``)."""
    row_limit: int = setting(40, ge=1)
    """Rows of the operator table and of the top operators."""
    max_trace_mb: float = setting(12.0, gt=0)
    """A trace larger than this (MB, as written) is not kept."""


def bench_profile(config: Config | None, options: ProfileOptions) -> dict[str, Any]:
    """Profile ``batches`` :meth:`~pipeline.encoder.FeatureEncoder.encode_core` calls on uint8 pixels
    already on the device; returns the table, the top operators and the time by kernel kind."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from ..config import Config
    from ..model import resolve_device, resolve_dtype

    config = config if config is not None else Config()
    dev = resolve_device(options.device or config.model.device)
    cuda = dev.type == "cuda"
    arch = bench_arch(None if options.tiny else config, tiny=options.tiny)
    compute = resolve_dtype(options.dtype or config.model.dtype, dev)
    batch = int(options.batch_size or (256 if cuda else (8 if arch.source == "tiny" else 2)))
    batches, variant, row_limit = options.batches, options.variant, options.row_limit
    encoder = make_bench_encoder(
        config,
        arch,
        random_modules(arch),
        device=dev,
        dtype=compute,
        variant=variant,
        batch_sizes=(batch,),
        compile_mode=options.compile_mode,
    )
    pixels = random_pixels(batch, arch, dev, seed=0)
    with torch.inference_mode():
        for _ in range(max(1, options.warmup)):
            encoder.encode_core(pixels)
        synchronize(dev)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        started = time.perf_counter()
        with profile(activities=activities) as prof:
            for i in range(batches):
                with record_function(f"encode_core#{i}"):
                    encoder.encode_core(pixels)
            synchronize(dev)
        wall = time.perf_counter() - started
    averages = prof.key_averages()
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    text = averages.table(sort_by=sort_by, row_limit=row_limit)
    # Kernels (device events) on a GPU, operators on a CPU; the record_function ranges are left out.
    events = [e for e in averages if not e.key.startswith("encode_core#")]
    if cuda:  # the kernels themselves (an operator's self device time repeats its kernels')
        kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        events = kernels or events
    else:
        events = [e for e in events if not e.key.startswith("ProfilerStep")]
    total_us = sum(_self_time_us(e, cuda) for e in events) or 1.0
    by_kind: dict[str, float] = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for e in events:
        by_kind[kernel_kind(e.key)] += _self_time_us(e, cuda)
    top = sorted(events, key=lambda e: _self_time_us(e, cuda), reverse=True)[:row_limit]
    result: dict[str, Any] = {
        "bench": "profile",
        "env": environment(dev),
        "device": str(dev),
        "arch": arch.describe(),
        "dtype": str(compute).removeprefix("torch."),
        "variant": variant,
        "compile_mode": options.compile_mode,
        "batch_size": batch,
        "batches": batches,
        "sorted_by": sort_by,
        "wall_ms_per_batch": 1e3 * wall / batches,
        "profiled_ms_per_batch": total_us / 1e3 / batches,
        "kinds": {
            kind: {"ms_per_batch": us / 1e3 / batches, "share": us / total_us} for kind, us in by_kind.items()
        },
        "top": [
            {
                "name": e.key,
                "calls": int(e.count),
                "self_ms_per_batch": _self_time_us(e, cuda) / 1e3 / batches,
                "share": _self_time_us(e, cuda) / total_us,
                "kind": kernel_kind(e.key),
            }
            for e in top
        ],
        "table": text,
        "trace": None,
    }
    if options.table:
        Path(options.table).parent.mkdir(parents=True, exist_ok=True)
        Path(options.table).write_text(text + "\n")
        result["table_path"] = options.table
    if options.trace:
        result["trace"] = _export_trace(prof, Path(options.trace), options.max_trace_mb)
    encoder.close()
    return result


def _export_trace(prof: Any, path: Path, max_mb: float) -> dict[str, Any]:
    """Write the Chrome trace to ``path`` (gzip when it ends in ``.gz``) unless it is over ``max_mb``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, raw = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(raw)
        raw_mb = os.path.getsize(raw) / 1e6
        if path.suffix == ".gz":
            with open(raw, "rb") as src, gzip.open(path, "wb", compresslevel=6) as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copyfile(raw, path)
    finally:
        os.unlink(raw)
    size_mb = path.stat().st_size / 1e6
    if size_mb > max_mb:
        path.unlink()
        logger.warning("chrome trace of %.1f MB is over %.1f MB: not kept", size_mb, max_mb)
        return {"path": None, "mb": size_mb, "raw_mb": raw_mb, "dropped": True}
    return {"path": str(path), "mb": size_mb, "raw_mb": raw_mb, "dropped": False}


def format_profile_report(result: dict[str, Any]) -> str:
    """The profile table and the time by kernel kind."""
    kinds = ", ".join(
        f"{kind} {v['ms_per_batch']:.2f} ms ({v['share']:.0%})" for kind, v in result["kinds"].items()
    )
    return "\n".join(
        [
            f"profile: encode_core of {result['arch']['name']} ({result['variant']}, {result['dtype']}), "
            f"batch {result['batch_size']} × {result['batches']} on {result['env'].get('device_name')} "
            f"({result['device']}), sorted by {result['sorted_by']}",
            result["table"],
            f"per batch: {result['profiled_ms_per_batch']:.2f} ms profiled ({kinds})",
        ]
    )
