"""Reading a feature table back: a snapshot's rows, metadata columns as Arrow, features as numpy/torch.

>>> fs = read_features("s3://bucket/features/")            # doctest: +SKIP
>>> fs.table.column("image_id"), fs.features.shape          # doctest: +SKIP
(<...>, (1000, 576, 4096))

:func:`read_features` reads one snapshot of the table (the latest, or ``version=``): exactly the data
files its commits hold, in input order (segment, unit, piece), never a file in flight or left by an
interrupted run. Reading a table that is not complete warns once with its state
(:class:`~pipeline.model.errors.IncompleteTableWarning`), or refuses with ``complete_only=True``. A
single data file (a ``.parquet`` path) is read as it is.

Other readers see the same snapshot through the Delta log: ``deltalake.DeltaTable(uri).to_pyarrow_dataset()``
(then pandas, Polars, or DuckDB: ``duckdb.sql("select ... from ds")``), ``ray.data.read_delta(uri)``,
``polars.scan_delta(uri)``. Their tensor columns are raw bytes or float lists; the dtype and shape are in
each tensor field's metadata (:mod:`pipeline.table.tensors`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..model.errors import ConfigError, IncompleteTableWarning, InputReadError
from .layout import LEGACY_MARKERS
from .lease import live_runs
from .location import TableLocation
from .log import Snapshot, TableState, load_snapshot, table_exists
from .run import table_state
from .schema import TENSOR_COLUMNS, TableIdentity
from .tensors import (
    BFloat16As,
    TensorSpec,
    bfloat16_out,
    column_to_numpy,
    field_spec,
    numpy_to_torch,
    valid_mask,
    variable_rows,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = ["FeatureSet", "open_table", "read_column", "read_error_codes", "read_features"]

_T = TypeVar("_T")


@dataclass
class FeatureSet:
    """What :func:`read_features` returns.

    ``table`` holds the non-tensor columns (``image_id``, ``uri``, ``status``, ...), one row per returned
    input; ``features`` the matching ``(rows, *shape)`` numpy array or torch tensor (contiguous, writable,
    owned), row ``i`` belonging to ``table`` row ``i``.
    """

    table: pa.Table
    """Non-tensor columns of the returned rows."""
    features: np.ndarray | torch.Tensor | list[Any] | None
    """``(rows, *shape)`` features; zeros at rows without features (see ``valid``); None if not read.
    A variable-shape column (LLaVA-NeXT) gives a list of per-row arrays (None at rows without
    features), or with ``padded=True`` a zero-padded ``(rows, max_len, *inner)`` array and ``lengths``."""
    column: str | None
    """Name of the tensor column in ``features``."""
    spec: TensorSpec | None
    """Stored dtype and per-row shape of that column (``spec.dtype`` may be ``bfloat16``)."""
    valid: np.ndarray
    """``True`` where a row has features (all rows when reading ``status="ok"``)."""
    identity: TableIdentity | None = None
    """What the table is: its job, encoder fingerprint, options and resolved config (None for a single file)."""
    version: int | None = None
    """The snapshot read (None for a single file)."""
    state: TableState | None = None
    """The table's state when it was read."""
    files: list[str] = field(default_factory=list)
    """The data files read, in order."""
    lengths: np.ndarray | None = None
    """Variable-shape columns (LLaVA-NeXT): each row's first dimension (0 where it has none)."""

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @property
    def image_ids(self) -> list[str]:
        return self.table.column("image_id").to_pylist()


def _location(path: str | os.PathLike[str], s3_endpoint: str | None) -> TableLocation:
    from ..storage import absolute_uri, split_uri

    raw = os.fspath(path)
    try:
        scheme, _ = split_uri(raw)
    except ConfigError as exc:
        raise InputReadError(f"Cannot open {raw}: {exc.message}") from exc
    return TableLocation(absolute_uri(raw) if scheme == "local" else raw.rstrip("/"), s3_endpoint=s3_endpoint)


def open_table(
    path: str | os.PathLike[str], *, version: int | None = None, s3_endpoint: str | None = None
) -> tuple[Snapshot, TableState]:
    """The table at ``path`` (one snapshot) and its state; InputReadError when there is none (or an
    output of an earlier version, or a Delta table this product did not write)."""
    location = _location(path, s3_endpoint)
    if not table_exists(location):
        fs = location.filesystem
        try:
            legacy = [
                m for m in LEGACY_MARKERS if fs.get_file_info(location.join(m)).type != pafs.FileType.NotFound
            ]
        except OSError as exc:
            raise InputReadError(f"Cannot open {location.uri}: {exc}") from exc
        if legacy:
            raise InputReadError(
                f"{location.uri} was written by an earlier version of llava-features (the _commits/ layout, before "
                "the Delta table): read it with that version, or encode the inputs again into a new output"
            )
        raise InputReadError(f"No feature table at {location.uri} (no Delta log there)")
    snapshot = load_snapshot(location, version)
    if snapshot.identity is None:
        raise InputReadError(f"{location.uri} is a Delta table that llava-features did not write")
    latest = snapshot.latest_record()
    if version is None:
        state = table_state(latest, live_runs(location))
    else:  # a past version: what its newest record said then
        state = table_state(latest, {}) if latest is not None and latest.op == "finish" else "interrupted"
    return snapshot, state


def ordered_map(fn: Callable[[str], _T], items: Sequence[str], workers: int) -> Iterator[_T]:
    """``map`` in order with at most ``workers`` items in flight (bounded memory)."""
    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield fn(item)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read_features") as pool:
        pending: deque[Future[_T]] = deque()
        it = iter(items)
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            yield result


def file_loader(fs: pafs.FileSystem, columns: list[str]) -> Callable[[str], pa.Table]:
    def load(f: str) -> pa.Table:
        try:
            with fs.open_input_file(f) as source:
                return pq.ParquetFile(source).read(columns=columns, use_threads=True)
        except (OSError, pa.ArrowInvalid) as exc:
            raise InputReadError(f"Cannot read {f}: {exc}") from exc

    return load


def read_features(
    path: str | os.PathLike[str],
    *,
    columns: list[str] | None = None,
    column: str | None = "features",
    status: str | None = "ok",
    version: int | None = None,
    complete_only: bool = False,
    as_torch: bool = False,
    bfloat16_as: BFloat16As = "uint16",
    padded: bool = False,
    max_files_in_flight: int | None = None,
    s3_endpoint: str | None = None,
) -> FeatureSet:
    """Read a feature table (a local path or an ``s3://`` / ``gs://`` URI), or one of its data files.

    - ``columns``: the non-tensor columns to put in ``table`` (default: every column but the feature
      tensors: ``image_id``, ``uri``, ``status``, ``error_code``, ``error_message``, ``width``, ``height``,
      carried columns, grid columns, ``pooled``).
    - ``column``: the array column to load into ``features``: ``features`` or ``tower_features``, or
      ``pooled`` (``(rows, dim)`` float32); ``None`` reads none.
    - ``status``: keep only rows with this status (default ``ok``); ``None`` keeps every row, with zeros
      in ``features`` and ``valid=False`` at rows without features.
    - ``version``: read that version of the table (default: the latest). ``complete_only``: raise
      InputReadError instead of warning when the table is not complete.
    - ``as_torch``: ``features`` as a torch tensor (bfloat16 as ``torch.bfloat16``); otherwise numpy,
      bfloat16 as ``uint16`` bits unless ``bfloat16_as="float32"``.
    - ``s3_endpoint``: as the job's ``job.s3_endpoint`` (else ``AWS_ENDPOINT_URL``).

    Features are copied once, from the Parquet pages into one array; files are read
    ``max_files_in_flight`` at a time (default ``pyarrow.io_thread_count()``, at most 8).
    """
    location = _location(path, s3_endpoint)
    fs = location.filesystem
    try:
        is_file = fs.get_file_info(location.path).type == pafs.FileType.File
    except OSError as exc:
        raise InputReadError(f"Cannot open {location.uri}: {exc}") from exc
    snapshot: Snapshot | None = None
    state: TableState | None = None
    expected: list[int | None] = [None]
    """Rows of each file by the log (None: not known), to catch a file changed behind the table's back."""
    if is_file:
        files = [location.path]
        try:
            schema = pq.read_schema(files[0], filesystem=fs)
        except (OSError, pa.ArrowInvalid) as exc:
            raise InputReadError(f"Cannot read {files[0]}: {exc}") from exc
    else:
        snapshot, state = open_table(path, version=version, s3_endpoint=s3_endpoint)
        schema = snapshot.identity.spec.arrow_schema()  # type: ignore[union-attr]
        files = [location.join(f.path) for f in snapshot.ordered_files()]
        expected = [f.rows if f.name is not None else None for f in snapshot.ordered_files()]
        if state != "complete":
            message = f"{location.uri} is not complete (state: {state}) at version {snapshot.version}"
            if complete_only:
                raise InputReadError(message + "; complete_only=True refuses it")
            warnings.warn(message + ": reading its committed rows", IncompleteTableWarning, stacklevel=2)
    spec: TensorSpec | None = None
    if column is not None:
        if column not in schema.names:
            raise ConfigError(f"{location.uri} has no column {column!r}; columns: {schema.names}")
        spec = field_spec(schema.field(column))
        if spec is None:
            arrays = [f.name for f in schema if field_spec(f) is not None]
            raise ConfigError(
                f"Column {column!r} of {location.uri} is not a tensor column nor pooled (it is {schema.field(column).type}): "
                f"its values are in FeatureSet.table (columns=[...]); the columns column= reads: {arrays}"
            )
    if columns is None:
        columns = [n for n in schema.names if n not in TENSOR_COLUMNS and n != column]
    else:
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise ConfigError(f"{location.uri} has no column(s) {missing}; columns: {schema.names}")
    wanted = list(
        dict.fromkeys([*columns, *(["status"] if status is not None else []), *([column] if column else [])])
    )
    workers = max_files_in_flight or min(8, pa.io_thread_count())
    # One array for all the features, sized from the files' statistics when they tell: no second copy.
    out: np.ndarray | None = None
    if spec is not None and not spec.variable and snapshot is not None:
        active = snapshot.ordered_files()
        if status is None:
            out = np.empty((sum(f.rows for f in active), *spec.fixed_shape), spec.numpy_dtype)
        elif status == "ok" and all(f.ok is not None for f in active):
            out = np.empty((sum(int(f.ok or 0) for f in active), *spec.fixed_shape), spec.numpy_dtype)
    pos = 0
    tables: list[pa.Table] = []
    parts: list[np.ndarray] = []
    rows_out: list[np.ndarray | None] = []
    valid_parts: list[np.ndarray] = []
    for index, table in enumerate(ordered_map(file_loader(fs, wanted), files, workers)):
        if expected[index] is not None and table.num_rows != expected[index]:
            raise InputReadError(
                f"{files[index]} holds {table.num_rows} rows, the table's log says {expected[index]} (version "
                f"{snapshot.version if snapshot else '?'}): the file was changed behind the table's back"
            )
        if status is not None:
            keep = pc.equal(table.column("status"), status).fill_null(False)
            if not pc.all(keep).as_py():
                table = table.filter(keep)
        if column is not None and spec is not None:
            col = table.column(column)
            valid_parts.append(valid_mask(col) if col.null_count else np.ones(table.num_rows, bool))
            if spec.variable:
                rows_out.extend(variable_rows(col, spec))
            else:
                values = column_to_numpy(col, spec)
                if out is not None and not parts and pos + len(values) <= len(out):
                    out[pos : pos + len(values)] = values
                    pos += len(values)
                else:
                    parts.append(np.array(values))
        tables.append(table.select(columns))
    if not tables:
        tables.append(schema.empty_table().select(columns))
    result = pa.concat_tables(tables).combine_chunks() if len(tables) > 1 else tables[0].combine_chunks()
    valid = np.concatenate(valid_parts) if valid_parts else np.ones(result.num_rows, dtype=bool)

    def convert(arr: np.ndarray) -> Any:
        assert spec is not None
        if as_torch:
            return numpy_to_torch(arr, spec.dtype)
        return bfloat16_out(arr, spec.dtype, bfloat16_as)

    features: Any = None
    lengths = None
    if spec is not None and spec.variable:
        lengths = np.array([0 if r is None else len(r) for r in rows_out], dtype=np.int64)
        if padded:
            out = np.zeros((len(rows_out), int(lengths.max(initial=0)), *spec.inner_shape), spec.numpy_dtype)
            for i, r in enumerate(rows_out):
                if r is not None:
                    out[i, : len(r)] = r
            features = convert(out)
        else:
            features = [None if r is None else convert(np.array(r)) for r in rows_out]
    elif spec is not None:
        if out is not None and not parts and pos == len(out):
            arr = out
        elif out is None and len(parts) == 1:
            arr = parts[0]  # one file: its one copy
        else:  # the statistics did not tell (or were wrong): one more copy
            done = [out[:pos]] if out is not None else []
            arr = (
                np.concatenate(done + parts)
                if done + parts
                else np.zeros((0, *spec.fixed_shape), spec.numpy_dtype)
            )
        features = convert(arr)
    return FeatureSet(
        table=result,
        features=features,
        column=column,
        spec=spec,
        valid=valid,
        identity=snapshot.identity if snapshot is not None else None,
        version=snapshot.version if snapshot is not None else None,
        state=state,
        files=files,
        lengths=lengths,
    )


def read_column(snapshot: Snapshot, name: str) -> pa.ChunkedArray:
    """One small column of every data file of a snapshot (e.g. ``image_id`` for an append)."""
    location = snapshot.location
    files = [location.join(f.path) for f in snapshot.ordered_files()]
    tables = list(ordered_map(file_loader(location.filesystem, [name]), files, min(16, max(1, len(files)))))
    if not tables:
        return pa.chunked_array([], type=snapshot.schema.field(name).type)
    return pa.chunked_array(
        [c for t in tables for c in t.column(name).chunks], type=tables[0].schema.field(name).type
    )


def read_error_codes(location: TableLocation, paths: Sequence[str]) -> dict[str, int]:
    """Failed rows by error code in the data files ``paths`` (relative to the table)."""
    counts: Counter[str] = Counter()
    files = [location.join(p) for p in paths]
    for table in ordered_map(
        file_loader(location.filesystem, ["error_code"]), files, min(16, max(1, len(files)))
    ):
        for entry in pc.value_counts(table.column("error_code").drop_null()).to_pylist():
            counts[str(entry["values"])] += int(entry["counts"])
    return dict(counts)
