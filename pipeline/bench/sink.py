"""Throughput of the table's data files per CPU core: ``build_batch`` + ``write_data_file``, then ``read_features``.

Run ``python -m pipeline.bench.sink`` (prints JSON). Arrow runs single-threaded during the
measurement (``pa.set_cpu_count(1)``, ``pa.set_io_thread_count(1)``), so the figures are per
core. Files go to a local temporary folder; the read follows the write, so it is served from
the page cache and measures decoding, not the disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from ..constants import COMPRESSIONS, OUTPUT_DTYPES, TENSOR_FORMATS, Compression, OutputDtype, TensorFormat
from ..measure.options import BenchOptions
from ..model.config import setting
from ..table import InputRows, TableSpec, TensorSpec, build_batch, read_features
from ..table.files import write_data_file

logger = logging.getLogger(__name__)

__all__ = ["SinkOptions", "bench_sink", "main"]


@dataclass(frozen=True)
class SinkOptions(BenchOptions):
    """Options of ``bench sink``: one data file of ``rows`` × ``(tokens, dim)`` features per tensor format."""

    SECTION: ClassVar[str] = "bench.sink"

    rows: int = setting(64, ge=1)
    """Rows of the data file."""
    tokens: int = setting(576, ge=1)
    """Tokens per row (LLaVA-1.5's 576 by default)."""
    dim: int = setting(4096, ge=1)
    """Feature width (LLaVA-1.5-7B's 4096 by default)."""
    formats: tuple[TensorFormat, ...] = TENSOR_FORMATS
    """Tensor formats measured: ``binary`` (Delta binary), ``list`` (array<float>, float32 only)."""
    dtype: OutputDtype = "float16"
    """The features' dtype."""
    compression: Compression = "none"
    """Parquet compression of the data file."""
    fsync: bool = True
    """fsync the file before it counts as written (as the job does)."""
    repeats: int = setting(3, ge=1)
    """Runs per format; the best is reported."""
    tmpdir: str | None = None
    """Where the files are written (default: the system's temporary folder)."""


def _features(rows: int, tokens: int, dim: int, dtype: str, seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((rows, tokens, dim), dtype=np.float32)
    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(data).to(torch.bfloat16)
    return data.astype(dtype)


def bench_sink(options: SinkOptions) -> dict[str, Any]:
    """Write and read one data file of ``rows`` x ``(tokens, dim)`` features in each tensor format,
    single-threaded (the file alone: the commit to the log is measured by ``bench table``).

    Returns ``{"rows", "tokens", "dim", "dtype", "row_mb", "shard_mb", "results": {format:
    {"write_mb_s", "read_mb_s", "write_s", "read_s", "file_mb"}}}``; MB are 10^6 bytes of
    feature data, times are the best of ``repeats`` runs.
    """
    rows, tokens, dim, dtype = options.rows, options.tokens, options.dim, options.dtype
    compression, fsync, repeats = options.compression, options.fsync, options.repeats
    features = _features(rows, tokens, dim, dtype)
    itemsize = 4 if dtype == "float32" else 2
    row_bytes = tokens * dim * itemsize
    data_mb = rows * row_bytes / 1e6
    shard_rows = InputRows()
    for i in range(rows):
        shard_rows.add_ok(f"img-{i:06d}", f"file:///bench/img-{i:06d}.jpg", width=336, height=336)
    fs = pafs.LocalFileSystem()
    root = Path(tempfile.mkdtemp(prefix="bench-sink-", dir=options.tmpdir))
    cpu, io = pa.cpu_count(), pa.io_thread_count()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    results: dict[str, dict[str, Any]] = {}
    try:
        for fmt in options.formats:
            if fmt == "list" and dtype != "float32":
                results[fmt] = {"skipped": "the list storage holds float32 (Delta has no 16-bit floats)"}
                continue
            out = str(root / fmt)
            spec = TableSpec(tensors=(("features", TensorSpec(dtype, (tokens, dim))),), tensor_format=fmt)
            write_s = read_s = math.inf
            for _ in range(max(1, repeats)):
                start = time.perf_counter()
                table = build_batch(shard_rows, spec, features={"features": features}, dtype=dtype)
                written = write_data_file(
                    table,
                    filesystem=fs,
                    folder=out,
                    name="part.parquet",
                    compression=compression,
                    fsync=fsync,
                )
                write_s = min(write_s, time.perf_counter() - start)
                del table
                path = f"{out}/{written.path}"
                start = time.perf_counter()
                got = read_features(path, max_files_in_flight=1)
                read_s = min(read_s, time.perf_counter() - start)
                if got.features is None or got.features.shape != (rows, tokens, dim):
                    raise RuntimeError(f"bench read back {got.features!r} for format {fmt}")
                del got
            results[fmt] = {
                "write_mb_s": round(data_mb / write_s, 1),
                "read_mb_s": round(data_mb / read_s, 1),
                "write_s": round(write_s, 3),
                "read_s": round(read_s, 3),
                "file_mb": round(fs.get_file_info(path).size / 1e6, 1),
            }
            logger.info("%s: %s", fmt, results[fmt])
    finally:
        pa.set_cpu_count(cpu)
        pa.set_io_thread_count(io)
        shutil.rmtree(root, ignore_errors=True)
    return {
        "rows": rows,
        "tokens": tokens,
        "dim": dim,
        "dtype": dtype,
        "compression": compression,
        "fsync": fsync,
        "row_mb": round(row_bytes / 1e6, 2),
        "shard_mb": round(data_mb, 1),
        "results": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.bench.sink``: the benchmark without the command line's other imports; prints JSON."""
    defaults = SinkOptions()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=defaults.rows)
    parser.add_argument("--tokens", type=int, default=defaults.tokens)
    parser.add_argument("--dim", type=int, default=defaults.dim)
    parser.add_argument("--dtype", default=defaults.dtype, choices=OUTPUT_DTYPES)
    parser.add_argument("--formats", nargs="+", default=list(defaults.formats), choices=TENSOR_FORMATS)
    parser.add_argument("--compression", default=defaults.compression, choices=COMPRESSIONS)
    parser.add_argument("--no-fsync", action="store_true")
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--tmpdir", default=None)
    args = parser.parse_args(argv)
    options = SinkOptions(
        rows=args.rows,
        tokens=args.tokens,
        dim=args.dim,
        formats=tuple(args.formats),
        dtype=args.dtype,
        compression=args.compression,
        fsync=not args.no_fsync,
        repeats=args.repeats,
        tmpdir=args.tmpdir,
    )
    print(json.dumps(bench_sink(options), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
