"""Read the outputs of the offline job back: metadata columns as Arrow, features as numpy/torch.

>>> fs = read_features("s3://bucket/features/")            # doctest: +SKIP
>>> fs.table.column("image_id"), fs.features.shape          # doctest: +SKIP
(<...>, (1000, 576, 4096))

An output is a folder of ``part-UUUUUU-PPPPP.parquet`` files (unit, then piece within the unit;
see :mod:`pipeline.sink`); files whose name starts with ``.`` or ``_`` (temporary files of
unfinished writes, markers, commit records) and files not ending in ``.parquet`` are ignored.
Files are read in unit and piece order, so rows come back in input order.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .constants import shard_piece
from .model.errors import ConfigError, InputReadError
from .storage import resolve_filesystem
from .tensors import (
    BFloat16As,
    TensorSpec,
    VariableSpec,
    ensure_registered,
    numpy_to_torch,
    tensor_spec,
    valid_mask,
    variable_rows,
    variable_spec,
)
from .tensors import to_numpy as _to_numpy

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = ["FeatureSet", "array_spec", "list_output_files", "read_features", "read_metadata", "resolve_path"]

_INTERNAL_KEYS = frozenset({"ARROW:schema", "pandas"})
_T = TypeVar("_T")


@dataclass
class FeatureSet:
    """What :func:`read_features` returns.

    ``table`` holds the non-tensor columns (``image_id``, ``uri``, ``status``, ...), one row per
    returned input; ``features`` is the matching ``(rows, tokens, dim)`` numpy array or torch
    tensor (contiguous, writable, owned), row ``i`` belonging to ``table`` row ``i``.
    """

    table: pa.Table
    """Non-tensor columns of the returned rows."""
    features: np.ndarray | torch.Tensor | None
    """``(rows, *shape)`` features; zeros at rows without features (see ``valid``); None if not read.
    A variable-shape column (LLaVA-NeXT) gives a list of per-row arrays (None at rows without
    features), or with ``padded=True`` a zero-padded ``(rows, max_len, *inner)`` array and ``lengths``."""
    column: str | None
    """Name of the tensor column in ``features``."""
    spec: TensorSpec | None
    """Stored dtype and per-row shape of that column (``spec.dtype`` may be ``bfloat16``)."""
    valid: np.ndarray
    """``True`` where a row has features (all rows when reading ``status="ok"``)."""
    metadata: dict[str, str] = field(default_factory=dict)
    """File-level metadata of the output (``llava_features.config``, ``llava_features.fingerprint``)."""
    files: list[str] = field(default_factory=list)
    """The shard files read, in order."""
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


def resolve_path(
    path: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None
) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path, an ``s3://``/``gs://`` URI (the same filesystems, with
    the same endpoint settings, as the job's: :func:`pipeline.storage.resolve_filesystem`), or a path
    in ``filesystem``."""
    path = os.fspath(path)
    if filesystem is not None:
        return filesystem, path
    try:
        return resolve_filesystem(path)
    except ConfigError as exc:
        raise InputReadError(f"Cannot open {path}: {exc.message}") from exc
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise InputReadError(f"Cannot open {path}: {exc}") from exc


def _sort_key(path: str) -> tuple[int, int, int, str]:
    name = path.rsplit("/", 1)[-1]
    parsed = shard_piece(name)
    return (0, *parsed, name) if parsed is not None else (1, 0, 0, name)


def list_output_files(path: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None) -> list[str]:
    """Parquet files of an output (a folder, or a single file), in shard order.

    Skips names starting with ``.`` or ``_`` and names not ending in ``.parquet``.
    Raises :class:`InputReadError` when ``path`` does not exist.
    """
    fs, p = resolve_path(path, filesystem)
    try:
        info = fs.get_file_info(p)
        if info.type == pafs.FileType.File:
            return [p]
        if info.type != pafs.FileType.Directory:
            raise InputReadError(f"No output at {path}")
        infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    except OSError as exc:
        raise InputReadError(f"Cannot list {path}: {exc}") from exc
    files = [
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and i.base_name.endswith(".parquet")
        and not i.base_name.startswith((".", "_"))
    ]
    return sorted(files, key=_sort_key)


def _decode_metadata(md: dict[bytes, bytes] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (md or {}).items():
        key = k.decode("utf-8", "replace")
        if key not in _INTERNAL_KEYS:
            out[key] = v.decode("utf-8", "replace")
    return out


def read_metadata(
    path: str | os.PathLike[str], *, filesystem: pafs.FileSystem | None = None
) -> dict[str, str]:
    """File-level key-value metadata recorded in an output (of its first shard).

    Holds ``llava_features.config`` (JSON), ``llava_features.fingerprint`` and
    ``llava_features.layout`` for outputs of the job. Raises :class:`InputReadError` when the
    output has no shard.
    """
    fs, p = resolve_path(path, filesystem)
    files = list_output_files(p, fs)
    if not files:
        raise InputReadError(f"No Parquet shard in {path}")
    try:
        schema = pq.read_schema(files[0], filesystem=fs)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputReadError(f"Cannot read {files[0]}: {exc}") from exc
    return _decode_metadata(schema.metadata)


def _ordered_map(fn: Callable[[str], _T], items: Sequence[str], workers: int) -> Iterator[_T]:
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


def read_features(
    path: str | os.PathLike[str],
    *,
    columns: list[str] | None = None,
    column: str | None = "features",
    as_torch: bool = False,
    filesystem: pafs.FileSystem | None = None,
    status: str | None = "ok",
    bfloat16_as: BFloat16As = "uint16",
    max_files_in_flight: int | None = None,
    padded: bool = False,
) -> FeatureSet:
    """Read an output (folder or single shard; local path or ``s3://``, ``gs://`` URI).

    - ``columns``: the non-tensor columns to put in ``table`` (default: every non-tensor column:
      ``image_id``, ``uri``, ``status``, ``error_code``, ``error_message``, ``width``, ``height``,
      ``pooled`` when present).
    - ``column``: the array column to load into ``features``: ``features`` or ``tower_features``
      (``(rows, tokens, dim)``), or ``pooled`` (``(rows, dim)`` float32); ``None`` reads none.
    - ``status``: keep only rows with this status (default ``ok``); ``None`` keeps every row,
      with zeros in ``features`` and ``valid=False`` at rows without features.
    - ``as_torch``: return ``features`` as a torch tensor (bfloat16 as ``torch.bfloat16``);
      otherwise numpy, with bfloat16 as ``uint16`` bits unless ``bfloat16_as="float32"``.
    - ``filesystem``: a ``pyarrow.fs`` filesystem, ``path`` then being a path in it.

    Features are copied once, from the Parquet pages into one preallocated array; files are
    read ``max_files_in_flight`` at a time (default ``pyarrow.io_thread_count()``, at most 8).
    """
    ensure_registered()
    fs, p = resolve_path(path, filesystem)
    files = list_output_files(p, fs)
    if not files:
        raise InputReadError(f"No Parquet shard in {path}")
    workers = max_files_in_flight or min(8, pa.io_thread_count())

    def footer(f: str) -> pq.FileMetaData:
        try:
            return pq.read_metadata(f, filesystem=fs)
        except (OSError, pa.ArrowInvalid) as exc:
            raise InputReadError(f"Cannot read the footer of {f}: {exc}") from exc

    footers = list(_ordered_map(footer, files, workers))
    try:
        schema = pq.read_schema(files[0], filesystem=fs)  # with extension types and metadata
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputReadError(f"Cannot read {files[0]}: {exc}") from exc
    metadata = _decode_metadata(schema.metadata)

    spec: TensorSpec | None = None
    if column is not None:
        if column not in schema.names:
            raise ConfigError(f"Output {path} has no column {column!r}; columns: {schema.names}")
        variable = variable_spec(schema.field(column))
        if variable is not None:
            return _read_variable(
                fs,
                files,
                footers,
                schema,
                column,
                variable,
                columns,
                status,
                as_torch,
                bfloat16_as,
                padded,
                workers,
            )
        spec = array_spec(schema.field(column))
        if spec is None:
            arrays = [f.name for f in schema if array_spec(f) is not None or variable_spec(f) is not None]
            raise ConfigError(
                f"Column {column!r} of {path} is not a tensor column nor pooled (it is "
                f"{schema.field(column).type}): its values are in FeatureSet.table (columns=[...]); "
                f"the columns column= reads: {arrays}"
            )
    if columns is None:
        columns = [f.name for f in schema if not _is_tensor_field(f) and f.name != column]
    else:
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise ConfigError(f"Output {path} has no column(s) {missing}; columns: {schema.names}")
    wanted = list(dict.fromkeys([*columns, *(["status"] if status is not None else [])]))
    if column is not None and column not in wanted:
        wanted.append(column)

    total = sum(md.num_rows for md in footers)
    out = np.empty((total, *spec.shape), dtype=spec.numpy_dtype) if spec is not None else None
    valid_parts: list[np.ndarray] = []
    tables: list[pa.Table] = []
    pos = 0

    load = _shard_loader(fs, files, footers, wanted)
    for f, table in zip(files, _ordered_map(load, files, workers), strict=True):
        if status is not None:
            keep = np.asarray(
                pc.equal(table.column("status"), status).fill_null(False).to_numpy(), dtype=bool
            )
            all_kept = bool(keep.all())
        else:
            keep, all_kept = np.ones(table.num_rows, dtype=bool), True
        if out is not None and spec is not None:
            col = table.column(column)
            chunk_pos = 0
            for chunk in col.chunks:
                n = len(chunk)
                view = _to_numpy(chunk, dtype=spec.dtype, shape=spec.shape, zero_nulls=False)
                k = keep[chunk_pos : chunk_pos + n]
                if all_kept or k.all():
                    out[pos : pos + n] = view
                    m = n
                else:
                    m = int(k.sum())
                    out[pos : pos + m] = view[k]
                if chunk.null_count:
                    v = valid_mask(chunk)[k]
                    out[pos : pos + m][~v] = 0
                    valid_parts.append(v)
                else:
                    valid_parts.append(np.ones(m, dtype=bool))
                pos += m
                chunk_pos += n
        meta = table.select(columns)
        tables.append(meta if all_kept else meta.filter(pa.array(keep)))
        del table
        logger.debug("read %s", f)

    result_table = (
        pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    ).combine_chunks()
    rows = result_table.num_rows
    valid = np.concatenate(valid_parts) if valid_parts else np.ones(rows, dtype=bool)
    features: Any = None
    if out is not None and spec is not None:
        if pos != rows:  # pragma: no cover - guarded by construction
            raise InputReadError(f"Read {pos} feature rows for {rows} table rows in {path}")
        arr = out[:pos] if pos < total else out
        if pos < total // 2:
            arr = arr.copy()  # do not keep a mostly unused allocation alive
        if as_torch:
            features = numpy_to_torch(arr, spec.dtype)
        elif spec.dtype == "bfloat16" and bfloat16_as == "float32":
            features = (arr.astype(np.uint32) << 16).view(np.float32)
        else:
            features = arr
    return FeatureSet(
        table=result_table,
        features=features,
        column=column,
        spec=spec,
        valid=valid,
        metadata=metadata,
        files=files,
    )


def _is_tensor_field(f: pa.Field) -> bool:
    if variable_spec(f) is not None:
        return True
    try:
        tensor_spec(f)
    except ConfigError:
        return False
    return True


def array_spec(f: pa.Field) -> TensorSpec | None:
    """dtype and per-row shape of a column :func:`read_features` can load as an array: a tensor
    column (``features``, ``tower_features``: ``(tokens, dim)``) or ``pooled``
    (``fixed_size_list<float32>[dim]``: ``(dim,)``); None for any other column, and for
    variable-shape tensor columns (their per-row shapes differ: :func:`~pipeline.tensors.variable_spec`)."""
    if variable_spec(f) is not None:
        return None
    if _is_tensor_field(f):
        return tensor_spec(f)
    t = f.type
    if pa.types.is_fixed_size_list(t) and t.value_type == pa.float32():
        return TensorSpec("float32", (t.list_size,))
    return None


def _shard_loader(
    fs: pafs.FileSystem, files: list[str], footers: list[pq.FileMetaData], wanted: list[str]
) -> Callable[[str], pa.Table]:
    """``load(file)``: the ``wanted`` columns of one shard, reusing its already-read footer."""
    footer_of = dict(zip(files, footers, strict=True))

    def load(f: str) -> pa.Table:
        try:
            with fs.open_input_file(f) as source:
                return pq.ParquetFile(source, metadata=footer_of[f]).read(columns=wanted, use_threads=True)
        except (OSError, pa.ArrowInvalid) as exc:
            raise InputReadError(f"Cannot read {f}: {exc}") from exc

    return load


def _read_variable(
    fs: pafs.FileSystem,
    files: list[str],
    footers: list[pq.FileMetaData],
    schema: pa.Schema,
    column: str,
    spec: VariableSpec,
    columns: list[str] | None,
    status: str | None,
    as_torch: bool,
    bfloat16_as: BFloat16As,
    padded: bool,
    workers: int,
) -> FeatureSet:
    """:func:`read_features` of a variable-shape tensor column: per-row arrays (or padded + lengths)."""
    if columns is None:
        columns = [f.name for f in schema if not _is_tensor_field(f)]
    wanted = list(dict.fromkeys([*columns, *(["status"] if status is not None else []), column]))
    load = _shard_loader(fs, files, footers, wanted)
    rows: list[np.ndarray | None] = []
    tables: list[pa.Table] = []
    for table in _ordered_map(load, files, workers):
        if status is not None:
            keep = pc.equal(table.column("status"), status).fill_null(False)
            table = table.filter(keep)
        rows.extend(variable_rows(table.column(column), spec))
        tables.append(table.select(columns))
    result = (
        pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    ).combine_chunks()
    valid = np.array([r is not None for r in rows], dtype=bool)
    lengths = np.array([0 if r is None else len(r) for r in rows], dtype=np.int64)

    def convert(arr: np.ndarray) -> Any:
        if as_torch:
            return numpy_to_torch(arr, spec.dtype)
        if spec.dtype == "bfloat16" and bfloat16_as == "float32":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr

    features: Any
    if padded:
        out = np.zeros((len(rows), int(lengths.max(initial=0)), *spec.inner_shape), spec.numpy_dtype)
        for i, r in enumerate(rows):
            if r is not None:
                out[i, : len(r)] = r
        features = convert(out)
    else:
        features = [None if r is None else convert(r) for r in rows]
    return FeatureSet(
        table=result,
        features=features,
        column=column,
        spec=None,
        valid=valid,
        metadata=_decode_metadata(schema.metadata),
        files=files,
        lengths=lengths,
    )
