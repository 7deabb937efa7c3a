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
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from ..table import InputRows, TableSpec, TensorSpec, build_batch, read_features
from ..table.files import write_data_file

logger = logging.getLogger(__name__)

__all__ = ["bench_sink", "main"]


def _features(rows: int, tokens: int, dim: int, dtype: str, seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((rows, tokens, dim), dtype=np.float32)
    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(data).to(torch.bfloat16)
    return data.astype(dtype)


def bench_sink(
    rows: int = 64,
    tokens: int = 576,
    dim: int = 4096,
    formats: Sequence[str] = ("binary", "list"),
    dtype: str = "float16",
    tmpdir: str | None = None,
    *,
    compression: str = "none",
    fsync: bool = True,
    repeats: int = 3,
) -> dict[str, Any]:
    """Write and read one data file of ``rows`` x ``(tokens, dim)`` features in each tensor format,
    single-threaded (the file alone: the commit to the log is measured by ``bench table``).

    Returns ``{"rows", "tokens", "dim", "dtype", "row_mb", "shard_mb", "results": {format:
    {"write_mb_s", "read_mb_s", "write_s", "read_s", "file_mb"}}}``; MB are 10^6 bytes of
    feature data, times are the best of ``repeats`` runs.
    """
    features = _features(rows, tokens, dim, dtype)
    itemsize = 4 if dtype == "float32" else 2
    row_bytes = tokens * dim * itemsize
    data_mb = rows * row_bytes / 1e6
    shard_rows = InputRows()
    for i in range(rows):
        shard_rows.add_ok(f"img-{i:06d}", f"file:///bench/img-{i:06d}.jpg", width=336, height=336)
    fs = pafs.LocalFileSystem()
    root = Path(tempfile.mkdtemp(prefix="bench-sink-", dir=tmpdir))
    cpu, io = pa.cpu_count(), pa.io_thread_count()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    results: dict[str, dict[str, Any]] = {}
    try:
        for fmt in formats:
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=576)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    parser.add_argument("--formats", nargs="+", default=["binary", "list"])
    parser.add_argument("--compression", default="none")
    parser.add_argument("--no-fsync", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmpdir", default=None)
    args = parser.parse_args(argv)
    figures = bench_sink(
        args.rows,
        args.tokens,
        args.dim,
        tuple(args.formats),
        args.dtype,
        args.tmpdir,
        compression=args.compression,
        fsync=not args.no_fsync,
        repeats=args.repeats,
    )
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
