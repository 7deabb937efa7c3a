"""Output shards of the offline job: one Parquet file per shard, committed atomically.

Layout of an output folder (local path or object-store prefix)::

    <output>/part-000000-00000.parquet          unit 0, first output file
    <output>/part-000000-00001.parquet          unit 0, second output file (units may have several)
    <output>/part-000001-00000.parquet
    ...
    <output>/.part-000002-00000.parquet.<hex>.tmp   (local only: a file being written; hidden)
    <output>/_commits/unit-000000.json           unit 0 is committed: its files, rows and counts

Each file holds one row per input of its shard, in input order:

=================  ===========================  =============================================
column             type                         meaning
=================  ===========================  =============================================
``image_id``       string, not null             the input's id
``uri``            string, not null             where the input was read from
``status``         string, not null             ``ok`` or ``error``
``error_code``     string                       stable :class:`ErrorCode`; null when ok
``error_message``  string                       readable reason; null when ok
``width``          int32                        original image width; null when unknown
``height``         int32                        original image height; null when unknown
(carried columns)  string/int64/float64/bool    ``input.keep_columns``, in order; null when missing
``features``       tensor ``[tokens, dim]``     projected features; null on error rows
``tower_features`` tensor ``[tokens, dim]``     optional: vision-tower features
``pooled``         fixed_size_list<float>[D]    optional: mean over tokens, float32
=================  ===========================  =============================================

Tensor columns use :mod:`pipeline.tensors` (``binary`` or ``fixed_shape_tensor``). The file's
key-value metadata (``schema.metadata``) holds what the caller passes (the job records
``llava_features.config`` as JSON and ``llava_features.fingerprint``) plus
``llava_features.layout`` (the version of this layout).

Commit protocol: a file exists once ``part-*.parquet`` exists, and then it is complete. On a
local filesystem the file is written under a hidden temporary name, fsynced, then renamed
(``os.replace``); on object stores (S3, GCS, Azure) it is uploaded straight to its final name,
since an upload only becomes visible when it completes (a failed write deletes what a
completed partial upload left). A unit of the job is committed once its commit record
(:func:`commit_unit`, written after every file of the unit) exists; files of units without a
record are leftovers of an interrupted run, rewritten (or removed) when the job resumes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .constants import (
    COMMIT_FILE_PATTERN,
    COMMITS_DIR,
    COMPRESSIONS,
    LAYOUT_KEY,
    LAYOUT_VERSION,
    SHARD_TEMP_PATTERN,
    STATUS_ERROR,
    STATUS_OK,
    TENSOR_FORMATS,
    commit_file_name,
    shard_file_name,
    shard_piece,
)
from .constants import shard_index as parse_shard_index
from .model.errors import ConfigError
from .records import RaggedRows
from .storage import join_path, read_json, write_json
from .tensors import (
    as_numpy_tensor,
    ensure_registered,
    make_tensor_array,
    pooled_array,
    variable_tensor_column,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CARRIED_TYPES",
    "DEFAULT_ROW_GROUP_BYTES",
    "METADATA_COLUMNS",
    "OUTPUT_COLUMNS",
    "ShardRows",
    "UnitCommit",
    "build_table",
    "commit_unit",
    "committed_shards",
    "committed_units",
    "ensure_registered",
    "output_files",
    "read_commits",
    "remove_files",
    "remove_stale_temp_files",
    "shard_name",
    "write_shard",
]

shard_name = shard_file_name
GRID_COLUMNS = {
    "grid_rows": lambda grid: grid.rows,
    "grid_cols": lambda grid: grid.cols,
    "canvas_width": lambda grid: grid.canvas[0],
    "canvas_height": lambda grid: grid.canvas[1],
}
"""anyres outputs: each row's tile grid and the canvas its image was letterboxed onto (null on error rows)."""
METADATA_COLUMNS: tuple[str, ...] = (
    "image_id",
    "uri",
    "status",
    "error_code",
    "error_message",
    "width",
    "height",
)
"""The non-tensor columns of every shard, in order."""
TENSOR_COLUMNS: tuple[str, ...] = ("features", "tower_features", "pooled")
"""The feature columns a shard may have."""
OUTPUT_COLUMNS: frozenset[str] = frozenset(METADATA_COLUMNS + TENSOR_COLUMNS + tuple(GRID_COLUMNS))
"""Every column name the job writes itself (carried columns may not take one)."""
CARRIED_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
}
"""Arrow types of carried columns by name (see :data:`pipeline.storage.units.CarriedType`)."""

DEFAULT_ROW_GROUP_BYTES = 256 * 1024 * 1024
"""Target size of a row group (about 54 rows of 576x4096 float16 features)."""

_PAGE_BYTES = 1024 * 1024
_OBJECT_STORES = frozenset({"s3", "gcs", "abfs"})

_METADATA_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error_code", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
]


@dataclass
class ShardRows:
    """The per-input (non-tensor) values of one shard, one list entry per input, in order.

    Build it with :meth:`add_ok` / :meth:`add_error`, or pass the lists directly.
    """

    image_id: list[str] = field(default_factory=list)
    uri: list[str] = field(default_factory=list)
    status: list[str] = field(default_factory=list)
    error_code: list[str | None] = field(default_factory=list)
    error_message: list[str | None] = field(default_factory=list)
    width: list[int | None] = field(default_factory=list)
    height: list[int | None] = field(default_factory=list)
    carried: dict[str, list[Any]] = field(default_factory=dict)
    """Carried columns (``input.keep_columns``): one value per input each (None where missing)."""

    @classmethod
    def from_record(cls, record: Any) -> ShardRows:
        """The rows of a :class:`~pipeline.records.DecodedShard` (width/height null where unknown)."""
        rows = cls(carried={name: list(values) for name, values in getattr(record, "carried", {}).items()})
        for i, ok in enumerate(record.ok):
            size = {"width": int(record.width[i]) or None, "height": int(record.height[i]) or None}
            if ok:
                rows.add_ok(record.image_id[i], record.uri[i], **size)
            else:
                rows.add_error(
                    record.image_id[i], record.uri[i], record.error_code[i], record.error_message[i], **size
                )
        return rows

    def add_ok(self, image_id: str, uri: str, *, width: int | None = None, height: int | None = None) -> None:
        """Append an input that was encoded."""
        self._add(image_id, uri, STATUS_OK, None, None, width, height)

    def add_error(
        self,
        image_id: str,
        uri: str,
        code: str,
        message: str,
        *,
        width: int | None = None,
        height: int | None = None,
    ) -> None:
        """Append an input that failed with an error ``code`` (an :class:`ErrorCode` value)."""
        self._add(image_id, uri, STATUS_ERROR, str(code), message, width, height)

    def _add(
        self,
        image_id: str,
        uri: str,
        status: str,
        code: str | None,
        message: str | None,
        width: int | None,
        height: int | None,
    ) -> None:
        self.image_id.append(image_id)
        self.uri.append(uri)
        self.status.append(status)
        self.error_code.append(code)
        self.error_message.append(message)
        self.width.append(width)
        self.height.append(height)

    def __len__(self) -> int:
        return len(self.image_id)

    @property
    def ok_mask(self) -> np.ndarray:
        """Boolean array, ``True`` for ``ok`` rows."""
        return np.fromiter((s == STATUS_OK for s in self.status), dtype=bool, count=len(self.status))

    @property
    def num_ok(self) -> int:
        return int(self.ok_mask.sum())

    def validate(self) -> None:
        """Raise ``ValueError`` unless the lists line up and statuses/error fields are consistent."""
        n = len(self.image_id)
        for name in METADATA_COLUMNS:
            if len(getattr(self, name)) != n:
                raise ValueError(f"ShardRows.{name} has {len(getattr(self, name))} entries, image_id has {n}")
        for name, values in self.carried.items():
            if len(values) != n:
                raise ValueError(f"carried column {name!r} has {len(values)} entries, image_id has {n}")
        for i, (status, code) in enumerate(zip(self.status, self.error_code, strict=True)):
            if status == STATUS_OK:
                if code is not None:
                    raise ValueError(f"row {i} ({self.image_id[i]!r}) is ok but has error_code {code!r}")
            elif status == STATUS_ERROR:
                if not code:
                    raise ValueError(f"row {i} ({self.image_id[i]!r}) is an error without error_code")
            else:
                raise ValueError(f"row {i} has status {status!r}; expected {STATUS_OK!r} or {STATUS_ERROR!r}")


# --------------------------------------------------------------------------------------------
# Building a shard table
# --------------------------------------------------------------------------------------------


def _scatter_tensor(
    values: Any, ok: np.ndarray, tensor_format: str, name: str, stored_dtype: str | None = None
) -> pa.ChunkedArray:
    """Full-length tensor column: ``values`` (ok rows only) at the ok rows, zeroed nulls elsewhere.

    Zero-copy: every run of consecutive ok rows is one chunk viewing ``values``; runs of error
    rows are null chunks over zeros.
    """
    data, dtype = as_numpy_tensor(values, stored_dtype)
    if data.ndim < 2:
        raise ValueError(f"{name} must be an (ok_rows, *shape) array, got shape {data.shape}")
    if data.shape[0] != int(ok.sum()):
        raise ValueError(f"{name} has {data.shape[0]} rows but the shard has {int(ok.sum())} ok rows")
    shape = data.shape[1:]
    typ = make_tensor_array(data[:0], tensor_format=tensor_format, dtype=dtype).type
    if len(ok) == 0:
        return pa.chunked_array([], type=typ)
    bounds = [0, *(np.flatnonzero(np.diff(ok.view(np.int8))) + 1).tolist(), len(ok)]
    chunks: list[pa.Array] = []
    j = 0
    zeros: np.ndarray | None = None
    for start, stop in itertools.pairwise(bounds):
        k = stop - start
        if ok[start]:
            chunks.append(make_tensor_array(data[j : j + k], tensor_format=tensor_format, dtype=dtype))
            j += k
        else:
            if zeros is None or len(zeros) < k:
                zeros = np.zeros((k, *shape), dtype=data.dtype)
            mask = np.ones(k, dtype=bool)
            chunks.append(make_tensor_array(zeros[:k], mask, tensor_format=tensor_format, dtype=dtype))
    return pa.chunked_array(chunks, type=typ)


def _scatter_pooled(values: Any, ok: np.ndarray) -> pa.Array:
    data = np.asarray(values, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"pooled must be an (ok_rows, D) array, got shape {data.shape}")
    if data.shape[0] != int(ok.sum()):
        raise ValueError(f"pooled has {data.shape[0]} rows but the shard has {int(ok.sum())} ok rows")
    if ok.all():
        return pooled_array(data)
    full = np.zeros((len(ok), data.shape[1]), dtype=np.float32)
    full[ok] = data
    return pooled_array(full, ~ok)


def build_table(
    rows: ShardRows,
    *,
    features: Any | None,
    tower_features: Any | None = None,
    pooled: Any | None = None,
    dtype: str | None = None,
    tensor_format: str = "binary",
    metadata: Mapping[str, str] | None = None,
    grids: Sequence[Any] | None = None,
    carried_types: Mapping[str, str] | None = None,
) -> pa.Table:
    """The Arrow table of one shard (schema in this module's docstring).

    ``features``, ``tower_features`` (``(ok_rows, tokens, dim)``) and ``pooled``
    (``(ok_rows, D)``) hold only the ok rows, in order; they are numpy arrays (float16/float32,
    or uint16 bits with ``dtype="bfloat16"``, as the encoder returns them) or torch tensors
    (bfloat16 too, with ``tensor_format="binary"``); ``dtype`` names the stored dtype when the
    arrays alone do not say it. They are scattered into
    full-length columns that are null on error rows, without copying the feature data, so the
    arrays must stay unchanged until the table is written. A column passed as ``None`` is left
    out; for a shard with no ok row pass an empty ``(0, tokens, dim)`` array so that every shard
    has the same schema. ``metadata`` goes to ``schema.metadata`` (the file's key-value metadata).

    LLaVA-NeXT (anyres) features vary in their first dimension: pass them as
    :class:`~pipeline.records.RaggedRows` (a variable-shape tensor column, see
    :func:`pipeline.tensors.variable_tensor_column`), with ``grids``, the ok rows' tile grids
    (``grid_rows``, ``grid_cols``, ``canvas_width``, ``canvas_height`` int32 columns).
    ``carried_types`` (``{column: "string" | "int64" | "float64" | "bool"}``, in order) fixes the
    carried columns and their types, so that every shard of a job has the same schema; ``rows.carried``
    must hold exactly those columns.
    """
    if tensor_format not in TENSOR_FORMATS:
        raise ConfigError(f"Unknown tensor_format {tensor_format!r}; expected one of {list(TENSOR_FORMATS)}")
    ensure_registered()
    rows.validate()
    ok = rows.ok_mask
    arrays: list[pa.Array | pa.ChunkedArray] = [
        pa.array(rows.image_id, pa.string()),
        pa.array(rows.uri, pa.string()),
        pa.array(rows.status, pa.string()),
        pa.array(rows.error_code, pa.string()),
        pa.array(rows.error_message, pa.string()),
        pa.array(rows.width, pa.int32()),
        pa.array(rows.height, pa.int32()),
    ]
    fields = list(_METADATA_FIELDS)
    carried_types = dict(carried_types or {})
    if set(carried_types) != set(rows.carried):
        raise ValueError(f"carried columns {sorted(rows.carried)} do not match {sorted(carried_types)}")
    for name, kind in carried_types.items():
        if name in OUTPUT_COLUMNS:
            raise ConfigError(f"Carried column {name!r} would replace the output column of that name")
        if kind not in CARRIED_TYPES:
            raise ConfigError(f"Unknown carried column type {kind!r}; expected one of {list(CARRIED_TYPES)}")
        try:
            arrays.append(pa.array(rows.carried[name], CARRIED_TYPES[kind]))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ValueError(f"carried column {name!r} does not fit {kind}: {exc}") from exc
        fields.append(pa.field(name, CARRIED_TYPES[kind]))
    for name, values in (("features", features), ("tower_features", tower_features)):
        if isinstance(values, RaggedRows):
            col, field_metadata = variable_tensor_column(
                values.data, values.offsets, ok, tensor_format=tensor_format, dtype=dtype
            )
            arrays.append(col)
            fields.append(pa.field(name, col.type, metadata=field_metadata))
        elif values is not None:
            col = _scatter_tensor(values, ok, tensor_format, name, dtype)
            arrays.append(col)
            fields.append(pa.field(name, col.type))
    if grids is not None:
        if len(grids) != int(ok.sum()):
            raise ValueError(f"{len(grids)} grids for {int(ok.sum())} ok rows")
        for name, value in GRID_COLUMNS.items():
            full: list[int | None] = [None] * len(ok)
            for row, grid in zip(np.flatnonzero(ok), grids, strict=True):
                full[row] = int(value(grid))
            arrays.append(pa.array(full, pa.int32()))
            fields.append(pa.field(name, pa.int32()))
    if pooled is not None:
        col = _scatter_pooled(pooled, ok)
        arrays.append(col)
        fields.append(pa.field("pooled", col.type))
    md = {str(k): str(v) for k, v in (metadata or {}).items()}
    md.setdefault(LAYOUT_KEY, LAYOUT_VERSION)
    schema = pa.schema(fields, metadata=md)
    columns = [a if isinstance(a, pa.ChunkedArray) else pa.chunked_array([a], type=a.type) for a in arrays]
    return pa.Table.from_arrays(columns, schema=schema)


# --------------------------------------------------------------------------------------------
# Writing a shard
# --------------------------------------------------------------------------------------------


def _row_bytes(typ: pa.DataType) -> int:
    """Bytes per value of fixed-width tensor/list columns, a page for variable-shape tensors (0 for others)."""
    if isinstance(typ, pa.BaseExtensionType):
        typ = typ.storage_type
    if pa.types.is_struct(typ):  # a variable-shape tensor: rows of megabytes, one page each
        return _PAGE_BYTES
    if pa.types.is_fixed_size_binary(typ):
        return int(typ.byte_width)
    if pa.types.is_fixed_size_list(typ) and pa.types.is_primitive(typ.value_type):
        return int(typ.list_size * typ.value_type.bit_width // 8)
    return 0


def _writer_options(table: pa.Table, compression: str, row_group_bytes: int) -> tuple[dict[str, Any], int]:
    if compression not in COMPRESSIONS:
        raise ConfigError(f"Unknown compression {compression!r}; expected one of {list(COMPRESSIONS)}")
    names = table.schema.names
    small = [n for n in names if n in METADATA_COLUMNS]
    options: dict[str, Any] = {
        "compression": "NONE" if compression == "none" else compression.upper(),
        # Dictionary encoding only pays for repetitive strings; tensors are written PLAIN.
        "use_dictionary": [n for n in ("status", "error_code") if n in names],
        # Min/max statistics of tensor bytes are useless (and cost a pass over the data).
        "write_statistics": small,
        "store_schema": True,
    }
    rows = table.num_rows
    # Pages of about 1 MiB, or one tensor each: the writer checks the page size only every
    # write_batch_size values, which would otherwise make one page of a whole row group.
    widest = max((_row_bytes(table.schema.field(n).type) for n in names), default=1)
    options["write_batch_size"] = int(min(1024, max(1, _PAGE_BYTES // max(1, widest))))
    groups = max(1, math.ceil(table.nbytes / max(1, row_group_bytes)))
    row_group_size = max(1, math.ceil(rows / groups)) if rows else 1
    return options, row_group_size


def _write_parquet(
    table: pa.Table, path: str, filesystem: pafs.FileSystem, compression: str, row_group_bytes: int
) -> None:
    options, row_group_size = _writer_options(table, compression, row_group_bytes)
    stream = filesystem.open_output_stream(path)
    writer: pq.ParquetWriter | None = None
    try:
        writer = pq.ParquetWriter(stream, table.schema, **options)
        writer.write_table(table, row_group_size=row_group_size)
        writer.close()
    except BaseException:
        # Never let the writer add a footer after a failure (its destructor would), so a
        # failed write never looks like a complete file: close the stream under it first.
        if writer is not None:
            writer.is_open = False
        with contextlib.suppress(Exception):
            stream.close()
        raise
    stream.close()


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


def write_shard(
    table: pa.Table,
    output: str,
    shard_index: int,
    *,
    filesystem: pafs.FileSystem,
    compression: str = "none",
    row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
    fsync: bool = True,
    piece: int | None = None,
) -> str:
    """Write ``table`` as ``<output>/part-{shard_index:06d}.parquet`` (with ``piece``:
    ``part-{shard_index:06d}-{piece:05d}.parquet``) atomically; return its path.

    ``output`` is a path in ``filesystem`` (no scheme, as from ``pyarrow.fs.FileSystem.from_uri``).
    Local filesystems: written to ``.part-NNNNNN.parquet.<hex>.tmp`` in the same folder,
    fsynced (unless ``fsync=False``), then renamed over the final name. Object stores: written to
    the final name, visible only once the upload completes; deleted again if the write fails.
    Other filesystems (HDFS, ``SubTreeFileSystem``, ...): temporary name, then ``move``.
    An existing shard of the same index is replaced. Row groups hold about ``row_group_bytes``;
    ``compression`` (``none`` by default) applies to every column.
    """
    name = shard_name(shard_index, piece)
    final = join_path(output, name)
    kind = filesystem.type_name
    start = time.perf_counter()
    if kind in _OBJECT_STORES:
        try:
            _write_parquet(table, final, filesystem, compression, row_group_bytes)
        except BaseException:
            with contextlib.suppress(Exception):
                filesystem.delete_file(final)
            raise
    else:
        filesystem.create_dir(output, recursive=True)
        tmp = join_path(output, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            _write_parquet(table, tmp, filesystem, compression, row_group_bytes)
            if kind == "local":
                if fsync:
                    _fsync(tmp)
                os.replace(tmp, final)
                if fsync:
                    _fsync(output, directory=True)
            else:
                filesystem.move(tmp, final)
        except BaseException:
            with contextlib.suppress(Exception):
                filesystem.delete_file(tmp)
            raise
    logger.debug(
        "wrote %s (%d rows, %.1f MB) in %.2fs",
        final,
        table.num_rows,
        table.nbytes / 1e6,
        time.perf_counter() - start,
    )
    return final


# --------------------------------------------------------------------------------------------
# Inspecting an output folder
# --------------------------------------------------------------------------------------------


def _list(output: str, filesystem: pafs.FileSystem) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(output, allow_not_found=True, recursive=False)
    return [info for info in filesystem.get_file_info(selector) if info.type == pafs.FileType.File]


def committed_shards(output: str, filesystem: pafs.FileSystem) -> set[int]:
    """Unit (shard) indices of the output files (``part-*.parquet``) in ``output``; temp files are ignored.

    An output folder that does not exist has none. (The job's units are committed by their
    commit records: :func:`committed_units`.)
    """
    found: set[int] = set()
    for info in _list(output, filesystem):
        index = parse_shard_index(info.base_name)
        if index is not None:
            found.add(index)
    return found


def remove_stale_temp_files(
    output: str, filesystem: pafs.FileSystem, *, older_than_s: float | None = None
) -> list[str]:
    """Delete temporary output files (``.part-*.parquet.*.tmp``) left by interrupted writers.

    Call it before any writer starts (e.g. when a job resumes): a temp file of a shard being
    written right now would be removed too, unless ``older_than_s`` spares recent ones.
    Returns the deleted paths.
    """
    now = time.time()
    removed: list[str] = []
    for info in _list(output, filesystem):
        if not SHARD_TEMP_PATTERN.match(info.base_name):
            continue
        if (
            older_than_s is not None
            and info.mtime is not None
            and now - info.mtime.timestamp() < older_than_s
        ):
            continue
        try:
            filesystem.delete_file(info.path)
        except (OSError, FileNotFoundError) as exc:
            logger.warning("could not remove stale temp file %s: %s", info.path, exc)
            continue
        removed.append(info.path)
    if removed:
        logger.info("removed %d stale temp file(s) from %s", len(removed), output)
    return removed


# --------------------------------------------------------------------------------------------
# Commit records
# --------------------------------------------------------------------------------------------


@dataclass
class UnitCommit:
    """A unit's commit record: its files and what they hold. Written after all of them."""

    unit: int
    rows: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    """Error rows by error code."""
    files: list[tuple[str, int]] = field(default_factory=list)
    """``(file name, rows)`` of each of the unit's output files, in order."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "rows": self.rows,
            "ok": self.ok,
            "errors": dict(sorted(self.errors.items())),
            "files": [[name, rows] for name, rows in self.files],
        }

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> UnitCommit:
        return cls(
            unit=int(value["unit"]),
            rows=int(value["rows"]),
            ok=int(value["ok"]),
            errors={str(k): int(v) for k, v in dict(value.get("errors") or {}).items()},
            files=[(str(name), int(rows)) for name, rows in value.get("files") or []],
        )


def commit_unit(output: str, filesystem: pafs.FileSystem, commit: UnitCommit) -> str:
    """Write ``commit`` as ``<output>/_commits/unit-NNNNNN.json`` (atomically); return its path.

    Call it only once every file the record names is written.
    """
    path = join_path(join_path(output, COMMITS_DIR), commit_file_name(commit.unit))
    write_json(filesystem, path, commit.to_dict())
    return path


def committed_units(output: str, filesystem: pafs.FileSystem) -> set[int]:
    """Indices of the units of ``output`` that have a commit record (one listing)."""
    found: set[int] = set()
    for info in _list(join_path(output, COMMITS_DIR), filesystem):
        match = COMMIT_FILE_PATTERN.match(info.base_name)
        if match:
            found.add(int(match.group(1)))
    return found


def read_commits(
    output: str, filesystem: pafs.FileSystem, units: Iterable[int], *, threads: int = 16
) -> dict[int, UnitCommit]:
    """The commit records of ``units`` (read ``threads`` at a time); a missing one is left out."""
    folder = join_path(output, COMMITS_DIR)

    def one(unit: int) -> tuple[int, UnitCommit | None]:
        value = read_json(filesystem, join_path(folder, commit_file_name(unit)))
        return unit, UnitCommit.from_dict(value) if value is not None else None

    wanted = sorted(set(units))
    if len(wanted) <= 1:
        pairs = [one(u) for u in wanted]
    else:
        with ThreadPoolExecutor(max_workers=min(threads, len(wanted)), thread_name_prefix="commits") as pool:
            pairs = list(pool.map(one, wanted))
    return {unit: commit for unit, commit in pairs if commit is not None}


def output_files(output: str, filesystem: pafs.FileSystem) -> dict[str, tuple[int, int]]:
    """``{file name: (unit, piece)}`` of every output file (``part-*.parquet``) in ``output`` (one listing)."""
    out: dict[str, tuple[int, int]] = {}
    for info in _list(output, filesystem):
        parsed = shard_piece(info.base_name)
        if parsed is not None:
            out[info.base_name] = parsed
    return out


def remove_files(output: str, filesystem: pafs.FileSystem, names: Iterable[str]) -> list[str]:
    """Delete the files ``names`` of ``output`` (output files of uncommitted units); returns their paths."""
    removed = []
    for name in sorted(names):
        path = join_path(output, name)
        try:
            filesystem.delete_file(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("could not remove %s: %s", path, exc)
            continue
        removed.append(path)
    if removed:
        logger.info("removed %d output file(s) of uncommitted units from %s", len(removed), output)
    return removed
