"""Data files of the feature table: one file's columns, its Parquet bytes, what its add action says.

Tasks write files, the driver commits them. :func:`build_batch` turns one data file's inputs
(:class:`~pipeline.table.rows.InputRows`) and the encoder's arrays into a table of the table's schema
(:class:`~pipeline.table.schema.TableSpec`); :func:`write_data_file` writes it under its final name
and returns a :class:`DataFile`, the small typed record the driver turns into the Delta ``add``
action of the commit that makes the file part of the table.

A file exists under its final name only once complete: on a local filesystem it is written under a
hidden temporary name (:func:`pipeline.table.layout.temp_name`), fsynced and renamed; on object
stores (S3, GCS) it is uploaded to its final name, which becomes visible only when the upload
completes (a failed write deletes what a partial upload left). Writing a file again (a retried task)
replaces it with the same rows.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..constants import COMPRESSIONS
from ..model.errors import ConfigError
from ..storage import join_path
from .layout import temp_name
from .rows import InputRows
from .schema import CARRIED_TYPES, GRID_COLUMNS, METADATA_COLUMNS, POOLED_COLUMN, TableSpec
from .tensors import RaggedRows, pooled_column, tensor_column, variable_column

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_ROW_GROUP_BYTES", "DataFile", "build_batch", "write_data_file"]

DEFAULT_ROW_GROUP_BYTES = 256 * 1024 * 1024
"""Target size of a row group (about 54 rows of 576x4096 float16 features)."""
_PAGE_BYTES = 1024 * 1024
_OBJECT_STORES = frozenset({"s3", "gcs", "abfs"})


@dataclass(frozen=True)
class DataFile:
    """A written data file, as its Delta ``add`` action needs it (no feature crosses to the driver)."""

    path: str
    """Path relative to the table (its name)."""
    size: int
    """Bytes."""
    rows: int
    null_counts: dict[str, int] = field(default_factory=dict)
    """Nulls of each column the statistics cover (``error_code``'s are the file's ok rows)."""
    text_bounds: dict[str, tuple[str, str]] = field(default_factory=dict)
    """``(min, max)`` of the covered text columns that hold a value."""
    int_bounds: dict[str, tuple[int, int]] = field(default_factory=dict)
    """``(min, max)`` of the covered integer columns that hold a value."""
    modified_ms: int = 0
    """When it was written (milliseconds since the epoch)."""

    @property
    def ok(self) -> int:
        """Rows whose status is ok (those without an error code)."""
        return int(self.null_counts.get("error_code", self.rows))

    def stats(self) -> dict[str, Any]:
        """Delta's per-file statistics: ``numRecords``, and ``nullCount``, ``minValues``, ``maxValues`` of the
        text and integer columns (readers skip files by them, so they are exact and complete: a column
        with a null count but no bounds would read as "no value matches" to delta-rs's datasets)."""
        bounds = {**self.text_bounds, **self.int_bounds}
        return {
            "numRecords": self.rows,
            "nullCount": dict(self.null_counts),
            "minValues": {name: low for name, (low, _) in bounds.items()},
            "maxValues": {name: high for name, (_, high) in bounds.items()},
        }

    # -- across the Ray hop: natural columns, no JSON ------------------------------------------

    def to_row(self, prefix: str = "file_") -> dict[str, Any]:
        names = sorted(self.null_counts)
        texts = sorted(self.text_bounds)
        ints = sorted(self.int_bounds)
        return {
            f"{prefix}path": self.path,
            f"{prefix}size": int(self.size),
            f"{prefix}rows": int(self.rows),
            f"{prefix}null_columns": names,
            f"{prefix}null_counts": [int(self.null_counts[n]) for n in names],
            f"{prefix}text_columns": texts,
            f"{prefix}text_min": [self.text_bounds[n][0] for n in texts],
            f"{prefix}text_max": [self.text_bounds[n][1] for n in texts],
            f"{prefix}int_columns": ints,
            f"{prefix}int_min": [int(self.int_bounds[n][0]) for n in ints],
            f"{prefix}int_max": [int(self.int_bounds[n][1]) for n in ints],
            f"{prefix}modified_ms": int(self.modified_ms),
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any], prefix: str = "file_") -> DataFile | None:
        """The file of a row written by :meth:`to_row` (None when the row's path is empty: no file)."""
        path = str(row[f"{prefix}path"])
        if not path:
            return None

        def pairs(names: str, lows: str, highs: str, kind: type) -> dict[str, tuple[Any, Any]]:
            return {
                str(n): (kind(lo), kind(hi))
                for n, lo, hi in zip(
                    row[prefix + names], row[prefix + lows], row[prefix + highs], strict=True
                )
            }

        return cls(
            path=path,
            size=int(row[f"{prefix}size"]),
            rows=int(row[f"{prefix}rows"]),
            null_counts={
                str(n): int(c)
                for n, c in zip(row[f"{prefix}null_columns"], row[f"{prefix}null_counts"], strict=True)
            },
            text_bounds=pairs("text_columns", "text_min", "text_max", str),
            int_bounds=pairs("int_columns", "int_min", "int_max", int),
            modified_ms=int(row[f"{prefix}modified_ms"]),
        )

    @staticmethod
    def empty_row(prefix: str = "file_") -> dict[str, Any]:
        """The :meth:`to_row` columns of "no file"."""
        return DataFile("", 0, 0).to_row(prefix)


# --------------------------------------------------------------------------------------------
# Building a data file's table
# --------------------------------------------------------------------------------------------


def build_batch(
    rows: InputRows,
    spec: TableSpec,
    *,
    features: Mapping[str, Any],
    dtype: str | None = None,
    pooled: Any | None = None,
    grids: Sequence[tuple[int, int, int, int]] | None = None,
) -> pa.Table:
    """The Arrow table of one data file, in the table's schema.

    ``features`` maps each tensor column of ``spec`` to the ok rows' values, in order: an
    ``(ok_rows, *shape)`` array (numpy float16/float32, uint16 bits with ``dtype="bfloat16"``, or a
    torch tensor), or :class:`~pipeline.table.tensors.RaggedRows` for a variable-shape column. ``pooled`` is ``(ok_rows, dim)``.
    ``grids`` (anyres) holds each ok row's ``(rows, cols, canvas_width, canvas_height)``. Feature arrays
    are not copied: keep them unchanged until the table is written.
    """
    rows.validate()
    schema = spec.arrow_schema()
    ok = rows.ok_mask
    n = len(rows)
    columns: dict[str, pa.Array | pa.ChunkedArray] = {
        "image_id": pa.array(rows.image_id, pa.string()),
        "uri": pa.array(rows.uri, pa.string()),
        "status": pa.array(rows.statuses(), pa.string()),
        "error_code": pa.array(rows.error_code, pa.string()),
        "error_message": pa.array(rows.error_message, pa.string()),
        "width": pa.array([w or None for w in rows.width], pa.int32()),
        "height": pa.array([h or None for h in rows.height], pa.int32()),
    }
    if set(rows.carried) != {name for name, _ in spec.carried}:
        raise ValueError(
            f"carried columns {sorted(rows.carried)} are not the table's {[c for c, _ in spec.carried]}"
        )
    for name, kind in spec.carried:
        try:
            columns[name] = pa.array(rows.carried[name], CARRIED_TYPES[kind])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ValueError(f"carried column {name!r} does not fit {kind}: {exc}") from exc
    if set(features) != {name for name, _ in spec.tensors}:
        raise ValueError(
            f"feature columns {sorted(features)} are not the table's {[c for c, _ in spec.tensors]}"
        )
    for name, tensor in spec.tensors:
        values = features[name]
        if tensor.variable:
            if not isinstance(values, RaggedRows):
                raise ValueError(f"{name} is a variable-shape column: pass RaggedRows")
            col = variable_column(
                values.data, values.offsets, ok, tensor_format=spec.tensor_format, dtype=dtype
            )
        else:
            col = tensor_column(values, ok, tensor_format=spec.tensor_format, dtype=dtype)
        if col.type != schema.field(name).type:
            raise ValueError(f"{name}: {col.type} does not fit the table's {schema.field(name).type}")
        columns[name] = col
        declared = tensor.shape
        got = _ok_shape(values)
        if got is not None and tuple(got) != tuple(declared[1:] if tensor.variable else declared):
            raise ValueError(f"{name}: rows of shape {list(got)}, the table's are {list(declared)}")
    if spec.grids:
        if grids is None or len(grids) != int(ok.sum()):
            raise ValueError(f"anyres tables need one grid per ok row ({int(ok.sum())})")
        for i, name in enumerate(GRID_COLUMNS):
            full: list[int | None] = [None] * n
            for row, grid in zip(np.flatnonzero(ok), grids, strict=True):
                full[row] = int(grid[i])
            columns[name] = pa.array(full, pa.int32())
    if spec.pooled_dim is not None:
        if pooled is None:
            raise ValueError("the table has a pooled column: pass pooled")
        columns[POOLED_COLUMN] = pooled_column(pooled, ok)
    arrays = [
        c if isinstance(c, pa.ChunkedArray) else pa.chunked_array([c], type=c.type)
        for c in (columns[name] for name in schema.names)
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def _ok_shape(values: Any) -> tuple[int, ...] | None:
    """The per-row shape of the ok rows' values (after the first dimension for RaggedRows)."""
    data = values.data if isinstance(values, RaggedRows) else values
    shape = tuple(getattr(data, "shape", ()))
    return shape[1:] if len(shape) >= 2 else None


# --------------------------------------------------------------------------------------------
# Writing it
# --------------------------------------------------------------------------------------------


def _writer_options(table: pa.Table, compression: str, row_group_bytes: int) -> tuple[dict[str, Any], int]:
    if compression not in COMPRESSIONS:
        raise ConfigError(f"Unknown compression {compression!r}; expected one of {list(COMPRESSIONS)}")
    names = table.schema.names
    options: dict[str, Any] = {
        "compression": "NONE" if compression == "none" else compression.upper(),
        # Dictionary encoding only pays for repetitive strings; tensors are written PLAIN.
        "use_dictionary": [n for n in ("status", "error_code") if n in names],
        # Min/max statistics of tensor bytes are useless (and cost a pass over the data).
        "write_statistics": [n for n in names if n in METADATA_COLUMNS],
        "store_schema": True,  # keeps the tensor columns' field metadata in the file
    }
    rows = table.num_rows
    # Pages of about 1 MiB, or one tensor each: the writer checks the page size only every
    # write_batch_size values, which would otherwise make one page of a whole row group.
    widest = max(1, table.nbytes // max(1, rows)) if rows else 1
    options["write_batch_size"] = int(min(1024, max(1, _PAGE_BYTES // widest)))
    groups = max(1, math.ceil(table.nbytes / max(1, row_group_bytes)))
    row_group_size = max(1, math.ceil(rows / groups)) if rows else 1
    return options, row_group_size


def _write_parquet(
    table: pa.Table, path: str, filesystem: pafs.FileSystem, *, compression: str, row_group_bytes: int
) -> int:
    """Write ``table`` to ``path``; returns the bytes written."""
    options, row_group_size = _writer_options(table, compression, row_group_bytes)
    stream = filesystem.open_output_stream(path)
    writer: pq.ParquetWriter | None = None
    try:
        writer = pq.ParquetWriter(stream, table.schema, **options)
        writer.write_table(table, row_group_size=row_group_size)
        writer.close()
        size = int(stream.tell())
    except BaseException:
        # Never let the writer add a footer after a failure (its destructor would), so a
        # failed write never looks like a complete file: close the stream under it first.
        if writer is not None:
            writer.is_open = False
        with contextlib.suppress(Exception):
            stream.close()
        raise
    stream.close()
    return size


def _fsync(path: str, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_stats(
    table: pa.Table,
) -> tuple[dict[str, int], dict[str, tuple[str, str]], dict[str, tuple[int, int]]]:
    """``(null counts, text bounds, integer bounds)`` of a data file's text and integer columns (the
    others, tensors, floats and booleans, are left out of its statistics)."""
    nulls: dict[str, int] = {}
    texts: dict[str, tuple[str, str]] = {}
    ints: dict[str, tuple[int, int]] = {}
    for f in table.schema:
        text = pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
        if not (text or pa.types.is_integer(f.type)):
            continue
        column = table.column(f.name)
        nulls[f.name] = int(column.null_count)
        if column.null_count == len(column):
            continue  # no value: its null count says so, and no bound exists
        bounds = pc.min_max(column)
        low, high = bounds["min"].as_py(), bounds["max"].as_py()
        if text:
            texts[f.name] = (low, high)
        else:
            ints[f.name] = (int(low), int(high))
    return nulls, texts, ints


def write_data_file(
    table: pa.Table,
    *,
    filesystem: pafs.FileSystem,
    folder: str,
    name: str,
    compression: str = "none",
    row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
    fsync: bool = True,
) -> DataFile:
    """Write ``table`` as ``<folder>/<name>`` (``folder``: the table's path in ``filesystem``) so that the
    file exists only once complete (see the module docstring); return what its add action needs.
    ``compression`` (``none`` by default) applies to every column; row groups hold about
    ``row_group_bytes``."""
    final = join_path(folder, name)
    kind = filesystem.type_name
    start = time.perf_counter()
    if kind in _OBJECT_STORES:
        try:
            size = _write_parquet(
                table, final, filesystem, compression=compression, row_group_bytes=row_group_bytes
            )
        except BaseException:
            with contextlib.suppress(Exception):
                filesystem.delete_file(final)
            raise
    else:
        filesystem.create_dir(folder, recursive=True)
        tmp = join_path(folder, temp_name(name, uuid.uuid4().hex))
        try:
            size = _write_parquet(
                table, tmp, filesystem, compression=compression, row_group_bytes=row_group_bytes
            )
            if kind == "local":
                if fsync:
                    _fsync(tmp)
                os.replace(tmp, final)
                if fsync:
                    _fsync(folder, directory=True)
            else:
                filesystem.move(tmp, final)
        except BaseException:
            with contextlib.suppress(Exception):
                filesystem.delete_file(tmp)
            raise
    nulls, texts, ints = file_stats(table)
    logger.debug(
        "wrote %s (%d rows, %.1f MB) in %.2fs", final, table.num_rows, size / 1e6, time.perf_counter() - start
    )
    return DataFile(
        path=name,
        size=size,
        rows=table.num_rows,
        null_counts=nulls,
        text_bounds=texts,
        int_bounds=ints,
        modified_ms=int(time.time() * 1000),
    )
