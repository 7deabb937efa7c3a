"""Manifests: Parquet or CSV files of ``uri`` rows (and an optional id column), one file or many.

Planning reads each Parquet manifest's footer (row counts per row group) and streams its ``uri``
and id columns once, by record batches, to check them: every uri non-empty, valid UTF-8 and of a
supported scheme, every id non-empty and unique across all the files. Uniqueness is checked on
64-bit hashes (8 bytes of driver memory per row) and confirmed on the values themselves, so a
hash collision can never refuse a good manifest. The units are row ranges of ``job.shard_size``
rows; a decode task reads only its unit's row groups. CSV has no footer: a CSV manifest is read
whole by the driver and its rows travel in the units (prefer Parquet for large manifests).
"""

from __future__ import annotations

import logging
import os
import posixpath
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..model.errors import ConfigError, InputReadError
from .fs import format_uri, split_uri
from .read import open_input
from .units import CarriedType, InputItem, Sample, Unit, carried_types

logger = logging.getLogger(__name__)

URI_COLUMN = "uri"
"""The manifest column holding each input's location."""
ID_COLUMN = "image_id"
"""The manifest column holding each input's id, when present (``input.id_column`` names another)."""

_BATCH_ROWS = 65_536
_P = 0x100000001B3  # an odd multiplier: invertible modulo 2**64
_P_INV = pow(_P, -1, 1 << 64)
_LEN_MIX = 0x9E3779B97F4A7C15


# --------------------------------------------------------------------------------------------
# Checking rows: non-empty, UTF-8, supported schemes, unique ids
# --------------------------------------------------------------------------------------------


_SLICE_BYTES = 1 << 20
_BUCKET_BITS = 2
_BUCKETS = 1 << _BUCKET_BITS
_POWERS: list[np.ndarray] = [np.ones(0, np.uint64), np.ones(1, np.uint64)]
"""``[P^(j+1) for j < m]`` and ``[P^-(j+1) for j < m] + [1]``, grown on demand (per process)."""


def _powers(m: int) -> tuple[np.ndarray, np.ndarray]:
    if len(_POWERS[0]) < m:
        size = max(m, _SLICE_BYTES)
        with np.errstate(over="ignore"):
            _POWERS[0] = np.cumprod(np.full(size, _P, np.uint64))
            _POWERS[1] = np.concatenate([np.cumprod(np.full(size, _P_INV, np.uint64)), [np.uint64(1)]])
    return _POWERS[0], _POWERS[1]


_SCRATCH = threading.local()


def _hash_span(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Hashes of the strings ``data[starts[i]:ends[i]]`` (offsets relative to ``data``)."""
    m = len(data)
    powers, inverse = _powers(m)
    scratch = getattr(_SCRATCH, "buffer", None)
    if scratch is None or len(scratch) < m + 1:  # reused: no page faults per slice
        scratch = _SCRATCH.buffer = np.zeros(max(m + 1, _SLICE_BYTES + 1), np.uint64)
    prefix = scratch[: m + 1]
    prefix[0] = 0
    with np.errstate(over="ignore"):
        np.multiply(data, powers[:m], out=prefix[1:])
        np.cumsum(prefix[1:], out=prefix[1:])
        # starts == m only for empty strings at the end, whose difference is 0 anyway
        h = (prefix[ends] - prefix[starts]) * inverse[np.minimum(starts, len(inverse) - 1)]
        return h ^ ((ends - starts).astype(np.uint64) * np.uint64(_LEN_MIX))


def _offsets_data(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, data)`` of a string array as numpy views (offsets as int64, into ``data``)."""
    n = len(values)
    buffers = values.buffers()
    offset_type = np.int64 if pa.types.is_large_string(values.type) else np.int32
    offsets = np.frombuffer(buffers[1], offset_type, count=values.offset + n + 1)[values.offset :]
    offsets = offsets.astype(np.int64)
    hi = int(offsets[-1]) if n else 0
    data = np.frombuffer(buffers[2], np.uint8, count=hi) if hi > 0 else np.zeros(0, np.uint8)
    return offsets, data


def _mask(values: pa.Array) -> np.ndarray:
    """A boolean array as numpy (nulls as False), without pyarrow's conversion (which imports pandas)."""
    n = len(values)
    bits = np.unpackbits(np.frombuffer(values.buffers()[1], np.uint8), bitorder="little")
    out = bits[values.offset : values.offset + n].astype(bool)
    if values.null_count:
        valid = np.unpackbits(np.frombuffer(values.buffers()[0], np.uint8), bitorder="little")
        out &= valid[values.offset : values.offset + n].astype(bool)
    return out


_ASCII_SPACE = np.zeros(256, bool)
_ASCII_SPACE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True
_ASCII_SPACE[0x80:] = True  # a non-ASCII character: maybe Unicode white space


def _maybe_padded(values: pa.Array) -> bool:
    """Whether some string of ``values`` may start or end with white space (checked on its first and
    last bytes; non-ASCII ones count, so only plain ASCII strings skip the full trim)."""
    offsets, data = _offsets_data(values)
    nonempty = offsets[1:] > offsets[:-1]
    if not nonempty.any():
        return False
    first, last = data[offsets[:-1][nonempty]], data[offsets[1:][nonempty] - 1]
    return bool(_ASCII_SPACE[first].any() or _ASCII_SPACE[last].any())


def hash_strings(values: pa.Array) -> np.ndarray:
    """A 64-bit polynomial hash of every string of ``values`` (no nulls), vectorised over its buffers,
    about a MiB of text at a time."""
    n = len(values)
    if n == 0:
        return np.zeros(0, np.uint64)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        values = values.cast(pa.string())
    offsets, data = _offsets_data(values)
    out = np.empty(n, np.uint64)
    row = 0
    while row < n:
        base = int(offsets[row])
        stop = int(np.searchsorted(offsets, base + _SLICE_BYTES, side="right")) - 1
        stop = min(n, max(stop, row + 1))
        end = int(offsets[stop])
        out[row:stop] = _hash_span(
            data[base:end], offsets[row:stop] - base, offsets[row + 1 : stop + 1] - base
        )
        row = stop
    return out


@dataclass
class _CheckedFile:
    uri: str
    rows: int
    reread_ids: Callable[[], pa.Array]
    id_name: str | None = None


@dataclass
class RowChecker:
    """Checks manifest rows batch by batch, then the uniqueness of ids across every file (:meth:`finish`)."""

    input_uri: str
    files: list[_CheckedFile] = field(default_factory=list)
    buckets: list[list[np.ndarray]] = field(default_factory=lambda: [[] for _ in range(_BUCKETS)])
    """The hashes so far, split by their top bits: equal ids always land in one bucket."""
    pending: list[list[np.ndarray]] = field(default_factory=lambda: [[] for _ in range(_BUCKETS)])
    """The current file's hashes, per bucket and batch (joined into one array per file: few large
    allocations, which go back to the system when freed)."""

    def start_file(self, uri: str, reread_ids: Callable[[], pa.Array]) -> None:
        self._seal()
        self.files.append(_CheckedFile(uri, 0, reread_ids))

    def _seal(self) -> None:
        for bucket, chunks in zip(self.buckets, self.pending, strict=True):
            if chunks:
                bucket.append(np.concatenate(chunks))
                chunks.clear()

    def add(self, uris: pa.Array | None, ids: pa.Array | None, id_name: str) -> None:
        """One batch of the current file: ``uris`` (None for Parquet images) and ``ids`` (None: the uri)."""
        current = self.files[-1]
        first_row = current.rows + 1
        if uris is not None:
            uris = _text(uris, current.uri, URI_COLUMN)
            _check_non_empty(uris, current.uri, first_row, "uri")
            _check_schemes(uris, current.uri)
        if ids is not None:
            ids = _text(ids, current.uri, id_name)
            _check_non_empty(ids, current.uri, first_row, id_name)
        key = ids if ids is not None else uris
        assert key is not None
        current.id_name = id_name if ids is not None else None
        hashes = hash_strings(key)
        top = (hashes >> np.uint64(64 - _BUCKET_BITS)).astype(np.intp)
        for bucket, chunks in enumerate(self.pending):
            chunks.append(hashes[top == bucket])
        current.rows += len(key)

    def finish(self) -> None:
        """Raise ConfigError naming the first repeated id (and how many repeat), if any does."""
        self._seal()
        found = []
        for chunks in self.buckets:  # one bucket (a quarter of the hashes) sorted at a time
            ordered = np.concatenate(chunks) if chunks else np.zeros(0, np.uint64)
            chunks.clear()
            ordered.sort()
            found.append(np.unique(ordered[1:][ordered[1:] == ordered[:-1]]))
            del ordered
        repeated = np.concatenate(found)
        if not len(repeated):
            return
        # Candidates share a hash: read their values again and compare them.
        by_value: dict[str, list[int]] = {}
        first_row = 0
        bounds = [0]
        for checked in self.files:
            values = checked.reread_ids()
            for row in np.flatnonzero(np.isin(hash_strings(values), repeated)).tolist():
                by_value.setdefault(values[row].as_py(), []).append(first_row + row)
            first_row += checked.rows
            bounds.append(first_row)
        groups = [g for g in by_value.values() if len(g) > 1]
        if not groups:
            return  # hash collisions only
        count = sum(len(g) - 1 for g in groups)
        names = {f.id_name for f in self.files}
        what = "uri (used as image_id)" if names == {None} else names.pop() if len(names) == 1 else "id"
        first, again = min((g[0], g[1]) for g in groups if len(g) > 1)
        value = next(v for v, g in by_value.items() if len(g) > 1 and g[0] == first)

        def where(row: int) -> tuple[str, int]:
            index = int(np.searchsorted(bounds, row, side="right")) - 1
            return self.files[index].uri, row - bounds[index] + 1

        (file_a, row_a), (file_b, row_b) = where(first), where(again)
        if file_a == file_b:
            raise ConfigError(
                f"Manifest {file_a} has {count} duplicate {what} value(s), e.g. {value!r} in data rows "
                f"{row_a} and {row_b}; image ids must be unique"
            )
        raise ConfigError(
            f"The manifests of {self.input_uri} have {count} duplicate {what} value(s), e.g. {value!r} in "
            f"{file_a} data row {row_a} and {file_b} data row {row_b}; image ids must be unique"
        )


def _text(values: pa.Array | pa.ChunkedArray, uri: str, column: str) -> pa.Array:
    """``values`` as validated UTF-8 strings with surrounding whitespace removed (nulls stay null)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    try:
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            values = values.cast(pa.string())
        values.validate(full=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        kind = "not valid UTF-8 text" if "utf8" in str(exc).lower() else "not text"
        raise ConfigError(f"Manifest {uri}: the {column!r} column is {kind}: {exc}") from exc
    return pc.utf8_trim_whitespace(values) if _maybe_padded(values) else values


def _check_non_empty(values: pa.Array, uri: str, first_row: int, column: str) -> None:
    offsets, _ = _offsets_data(values)
    empty = offsets[1:] == offsets[:-1]  # a null has no bytes either
    if empty.any():
        raise ConfigError(
            f"Manifest {uri}: data row {first_row + int(np.flatnonzero(empty)[0])} has an empty {column}"
        )


def _check_schemes(uris: pa.Array, uri: str) -> None:
    remote = pc.match_substring(uris, "://")
    if not pc.any(remote).as_py():
        return
    supported = pc.starts_with(uris, "s3://")
    for prefix in ("gs://", "gcs://", "file://"):
        if pc.all(supported).as_py():
            break
        supported = pc.or_(supported, pc.starts_with(uris, prefix))
    suspects = pc.or_(pc.and_(remote, pc.invert(supported)), pc.ends_with(uris, "://"))
    for prefix in ("s3:///", "gs:///", "gcs:///"):  # no bucket
        suspects = pc.or_(suspects, pc.starts_with(uris, prefix))
    if not pc.any(suspects).as_py():
        return
    for row in np.flatnonzero(_mask(suspects)).tolist():
        split_uri(uris[row].as_py())  # raises the ConfigError that names the problem (S3:// is fine)


# --------------------------------------------------------------------------------------------
# Reading manifest files
# --------------------------------------------------------------------------------------------


def open_parquet(uri: str, timeout_s: float | None, s3_endpoint: str | None) -> Any:
    """``pyarrow.parquet.ParquetFile`` over ``uri`` (footer read; every read timed)."""
    import pyarrow.parquet as pq

    source = open_input(uri, s3_endpoint=s3_endpoint, timeout_s=timeout_s, random_access=True)
    try:
        return pq.ParquetFile(source)
    except InputReadError:
        source.close()
        raise
    except (pa.ArrowInvalid, OSError) as exc:
        source.close()
        raise ConfigError(f"{uri} is not a readable Parquet file: {exc}") from exc


def read_csv(uri: str, columns: Sequence[str], timeout_s: float | None, s3_endpoint: str | None) -> pa.Table:
    """The CSV manifest at ``uri``; ``columns`` are read as text."""
    import pyarrow.csv as pacsv

    with open_input(uri, s3_endpoint=s3_endpoint, timeout_s=timeout_s) as stream:
        try:
            return pacsv.read_csv(
                stream,
                convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.string() for c in columns}, strings_can_be_null=True
                ),
            )
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            if "utf8" in str(exc).lower():
                raise ConfigError(f"Manifest {uri} is not valid UTF-8 text: {exc}") from exc
            raise ConfigError(f"Could not parse manifest {uri}: {exc}") from exc


def resolve_manifest_uri(value: str, scheme: str, folder: str) -> str:
    """A manifest's uri as read: absolute ones as written, relative ones against the manifest's folder."""
    if "://" in value:
        split_uri(value)  # validates the scheme
        return value
    if value.startswith("/"):
        return value  # an absolute local path
    if scheme == "local":
        return os.path.normpath(os.path.join(folder, value))
    return format_uri(scheme, posixpath.normpath(posixpath.join(folder, value)))


def manifest_folder(uri: str) -> tuple[str, str]:
    """``(scheme, folder)`` relative uris of the manifest at ``uri`` resolve against."""
    scheme, path = split_uri(uri)
    return scheme, (posixpath.dirname(path) if scheme != "local" else os.path.dirname(path))


def _check_columns(names: Sequence[str], uri: str, id_column: str | None, keep: Sequence[str]) -> bool:
    """Whether the manifest has an id column; ConfigError when a needed column is missing."""
    if URI_COLUMN not in names:
        raise ConfigError(f"Manifest {uri} has no 'uri' column (columns: {list(names)})")
    if id_column is not None and id_column not in names:
        raise ConfigError(
            f"Manifest {uri} has no {id_column!r} column (input.id_column; columns: {list(names)})"
        )
    missing = [c for c in keep if c not in names]
    if missing:
        raise ConfigError(
            f"Manifest {uri} has no column(s) {missing} (input.keep_columns; columns: {list(names)})"
        )
    return (id_column or ID_COLUMN) in names


@dataclass
class ManifestFile:
    """What planning learned about one manifest file."""

    uri: str
    name: str
    stamp: str
    rows: int
    group_rows: list[int] = field(default_factory=list)
    """Rows per Parquet row group (empty for CSV)."""
    table: pa.Table | None = None
    """A CSV manifest's rows (uri, id and carried columns)."""
    id_name: str | None = None
    """The id column, when the file has one."""
    carried: dict[str, CarriedType] = field(default_factory=dict)


def inspect_manifest(
    uri: str,
    name: str,
    stamp: str,
    checker: RowChecker,
    *,
    id_column: str | None,
    keep: Sequence[str],
    timeout_s: float | None,
    s3_endpoint: str | None,
) -> ManifestFile:
    """Read one manifest's footer (Parquet) or rows (CSV) and check its rows with ``checker``."""
    id_want = id_column or ID_COLUMN
    if uri.lower().endswith(".csv"):
        table = read_csv(uri, [URI_COLUMN, id_want, *keep], timeout_s, s3_endpoint)
        has_id = _check_columns(table.column_names, uri, id_column, keep)
        columns = [URI_COLUMN, *([id_want] if has_id else []), *keep]
        table = table.select(list(dict.fromkeys(columns)))
        checker.start_file(uri, lambda: _text(table.column(id_want if has_id else URI_COLUMN), uri, "id"))
        for batch in table.to_batches(_BATCH_ROWS):
            checker.add(batch.column(URI_COLUMN), batch.column(id_want) if has_id else None, id_want)
        return ManifestFile(
            uri,
            name,
            stamp,
            table.num_rows,
            table=table,
            id_name=id_want if has_id else None,
            carried=dict.fromkeys(keep, "string"),
        )
    pf = open_parquet(uri, timeout_s, s3_endpoint)
    try:
        schema = pf.schema_arrow
        has_id = _check_columns(schema.names, uri, id_column, keep)
        carried = carried_types(schema, keep, f"Manifest {uri}")
        id_name = id_want if has_id else None
        read_columns = [URI_COLUMN, *([id_want] if has_id else [])]

        def reread() -> pa.Array:
            again = open_parquet(uri, timeout_s, s3_endpoint)
            try:
                col = again.read(columns=[id_name or URI_COLUMN]).column(0)
            finally:
                again.close()
            return _text(col, uri, "id")

        checker.start_file(uri, reread)
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=read_columns):
            checker.add(batch.column(URI_COLUMN), batch.column(id_want) if has_id else None, id_want)
        md = pf.metadata
        groups = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        return ManifestFile(uri, name, stamp, md.num_rows, groups, id_name=id_name, carried=carried)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"Could not read manifest {uri}: {exc}") from exc
    finally:
        pf.close()


# --------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------


def covering_groups(group_rows: Sequence[int], start: int, stop: int) -> tuple[int, ...]:
    """The row groups (indices) holding rows ``start..stop`` of a file whose groups hold ``group_rows``."""
    out, first = [], 0
    for index, n in enumerate(group_rows):
        if first < stop and first + n > start:
            out.append(index)
        first += n
    return tuple(out)


def manifest_units(
    manifest: ManifestFile, first_index: int, shard_size: int, budget: int | None
) -> list[Unit]:
    """Units of ``shard_size`` rows of one manifest (at most ``budget`` rows in all)."""
    rows = manifest.rows if budget is None else min(manifest.rows, budget)
    units: list[Unit] = []
    if manifest.table is not None:  # CSV: the rows travel in the units
        scheme, folder = manifest_folder(manifest.uri)
        table = manifest.table.slice(0, rows)
        uris = [resolve_manifest_uri(u.strip(), scheme, folder) for u in table.column(URI_COLUMN).to_pylist()]
        id_col = manifest.id_name
        raw_ids = table.column(id_col).to_pylist() if id_col else table.column(URI_COLUMN).to_pylist()
        ids = [v.strip() for v in raw_ids]
        carried = {c: table.column(c).to_pylist() for c in manifest.carried}
        for start in range(0, rows, shard_size):
            stop = min(rows, start + shard_size)
            units.append(
                Unit(
                    index=first_index + len(units),
                    kind="items",
                    source=manifest.uri,
                    name=manifest.name,
                    stamp=manifest.stamp,
                    start=start,
                    stop=stop,
                    items=tuple(
                        InputItem(i, u) for i, u in zip(ids[start:stop], uris[start:stop], strict=True)
                    ),
                    columns=tuple((c, tuple(v[start:stop])) for c, v in carried.items()),
                )
            )
        return units
    for start in range(0, rows, shard_size):
        stop = min(rows, start + shard_size)
        units.append(
            Unit(
                index=first_index + len(units),
                kind="manifest",
                source=manifest.uri,
                name=manifest.name,
                stamp=manifest.stamp,
                start=start,
                stop=stop,
                row_groups=covering_groups(manifest.group_rows, start, stop),
            )
        )
    return units


def manifest_samples(
    unit: Unit,
    *,
    id_column: str | None,
    keep: Sequence[str],
    timeout_s: float | None,
    s3_endpoint: str | None,
) -> Iterator[Sample]:
    """The inputs of a Parquet manifest unit (without their bytes), read from its row groups."""
    pf = open_parquet(unit.source, timeout_s, s3_endpoint)
    try:
        names = pf.schema_arrow.names
        id_name = (id_column or ID_COLUMN) if (id_column or ID_COLUMN) in names else None
        columns = list(dict.fromkeys([URI_COLUMN, *([id_name] if id_name else []), *keep]))
        table = pf.read_row_groups(list(unit.row_groups), columns=columns)
        md = pf.metadata
        first = sum(md.row_group(i).num_rows for i in range(unit.row_groups[0])) if unit.row_groups else 0
    finally:
        pf.close()
    stop = unit.stop if unit.stop is not None else unit.start
    table = table.slice(unit.start - first, stop - unit.start)
    scheme, folder = manifest_folder(unit.source)
    uris = _text(table.column(URI_COLUMN), unit.source, URI_COLUMN).to_pylist()
    ids = _text(table.column(id_name), unit.source, id_name).to_pylist() if id_name else uris
    carried = {c: table.column(c).to_pylist() for c in keep}
    for row, (image_id, value) in enumerate(zip(ids, uris, strict=True)):
        yield Sample(
            image_id=image_id,
            uri=resolve_manifest_uri(value, scheme, folder),
            carried={c: v[row] for c, v in carried.items()},
        )
