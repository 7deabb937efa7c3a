"""Tensor columns of the feature table, in the types a Delta Lake table holds.

Delta's type system has no Arrow extension types and no 16-bit floats, so a tensor column is a
plain column whose field metadata says what its values are: the key
:data:`TENSOR_METADATA_KEY` holds ``{"dtype": "float16", "shape": [576, 4096]}`` (``null`` for a
first dimension that varies from row to row: LLaVA-NeXT). Delta keeps field metadata in its schema,
and Parquet keeps it in the Arrow schema stored with every data file, so a reader without this
package still finds it (``pq.read_schema(f).field("features").metadata``).

Two storages, selected by ``job.tensor_format`` (:data:`pipeline.constants.TensorFormat`):

``binary`` (default: fast, every dtype)
    Fixed shape: Delta ``binary`` (Arrow ``binary``): each row's tensor as raw little-endian,
    C-order bytes (bfloat16 as its uint16 bit pattern). Parquet writes and reads it at memcpy speed.
    Variable first dimension: Delta ``struct<shape: array<int>, data: binary>``.
``list`` (float32 only: Delta has no half-precision floats)
    Fixed shape: Delta ``array<float>``, the row's values flattened in C order — arrays that Spark,
    DuckDB and Polars read natively. Variable: ``struct<shape: array<int>, data: array<float>>``.

``pooled`` is always ``array<float>`` (float32, ``shape`` ``[dim]``).

Conventions: a null row (an input that failed) has no value and no bytes; columns built here put
the ok rows' bytes one after the other, so the data buffer of a column is exactly the encoder's
array of ok rows (no copy on write, and a zero-copy view on read when every row is ok).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

from ..constants import OUTPUT_DTYPES, TENSOR_FORMATS
from ..model.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "TENSOR_METADATA_KEY",
    "BFloat16As",
    "RaggedRows",
    "TensorSpec",
    "as_numpy_tensor",
    "column_to_numpy",
    "field_spec",
    "numpy_to_torch",
    "pooled_column",
    "tensor_column",
    "tensor_field",
    "valid_mask",
    "variable_column",
    "variable_rows",
]

TENSOR_METADATA_KEY = b"llava_features.tensor"
"""Field metadata key of a tensor column: JSON ``{"dtype": ..., "shape": [...]}``."""

BFloat16As = Literal["uint16", "float32"]
"""How numpy receives bfloat16 values: their raw bits (lossless, zero-copy) or converted to float32."""

# Little-endian numpy dtype of the stored elements (bfloat16: its raw bits).
_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "bfloat16": np.dtype("<u2"),
}
_LIST_DTYPES = ("float32",)
"""Dtypes the ``list`` storage holds (Delta's ``float``)."""
# Arrow's binary arrays address their bytes with int32 offsets: build chunks below that.
_MAX_CHUNK_BYTES = 1 << 30


@dataclass(frozen=True)
class TensorSpec:
    """dtype and per-row shape of a tensor column; ``shape[0]`` is None when rows differ in it."""

    dtype: str
    shape: tuple[int | None, ...]

    def __post_init__(self) -> None:
        if self.dtype not in OUTPUT_DTYPES:
            raise ConfigError(f"Unsupported tensor dtype {self.dtype!r}; supported: {list(OUTPUT_DTYPES)}")
        dims = tuple(None if d is None else int(d) for d in self.shape)
        if not dims or any(d is not None and d <= 0 for d in dims) or None in dims[1:]:
            raise ConfigError(
                f"Tensor shape must be non-empty with positive dimensions, got {list(self.shape)}"
            )
        object.__setattr__(self, "shape", dims)

    @property
    def variable(self) -> bool:
        """Whether rows differ in their first dimension (LLaVA-NeXT)."""
        return self.shape[0] is None

    @property
    def inner_shape(self) -> tuple[int, ...]:
        """The shape after the first dimension (what every row shares)."""
        return tuple(int(d) for d in self.shape[1:])  # type: ignore[arg-type]

    @property
    def fixed_shape(self) -> tuple[int, ...]:
        """The per-row shape of a fixed-shape column."""
        if self.variable:
            raise ValueError(f"{self} has no fixed shape")
        return tuple(int(d) for d in self.shape)  # type: ignore[arg-type]

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        """Stored element dtype in numpy (``uint16`` bits for bfloat16)."""
        return _NUMPY_DTYPES[self.dtype]

    @property
    def row_bytes(self) -> int | None:
        """Bytes of one row's values (None when rows differ in shape)."""
        return None if self.variable else math.prod(self.fixed_shape) * self.numpy_dtype.itemsize

    def to_json(self) -> str:
        return json.dumps({"dtype": self.dtype, "shape": list(self.shape)}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> TensorSpec:
        value = json.loads(text)
        return cls(str(value["dtype"]), tuple(value["shape"]))


def check_tensor_format(tensor_format: str, dtype: str) -> None:
    """ConfigError when ``tensor_format`` cannot store ``dtype`` (the ``list`` storage is float32 only)."""
    if tensor_format not in TENSOR_FORMATS:
        raise ConfigError(f"Unknown tensor_format {tensor_format!r}; expected one of {list(TENSOR_FORMATS)}")
    if tensor_format == "list" and dtype not in _LIST_DTYPES:
        raise ConfigError(
            f"job.tensor_format 'list' stores float32 arrays (Delta Lake has no 16-bit float type), and the "
            f"features are {dtype} (encoder.output_dtype): set encoder.output_dtype to float32, or use "
            "job.tensor_format 'binary'"
        )


def _value_type(spec: TensorSpec, tensor_format: str) -> pa.DataType:
    flat = pa.binary() if tensor_format == "binary" else pa.list_(pa.float32())
    if not spec.variable:
        return flat
    return pa.struct([pa.field("shape", pa.list_(pa.int32())), pa.field("data", flat)])


def tensor_field(name: str, spec: TensorSpec, tensor_format: str) -> pa.Field:
    """The schema field of a tensor column (its storage type and its metadata)."""
    check_tensor_format(tensor_format, spec.dtype)
    return pa.field(name, _value_type(spec, tensor_format), metadata={TENSOR_METADATA_KEY: spec.to_json()})


def pooled_field(name: str, dim: int) -> pa.Field:
    """The schema field of ``pooled``: float32 ``array<float>`` of ``dim`` values per row."""
    return pa.field(
        name, pa.list_(pa.float32()), metadata={TENSOR_METADATA_KEY: TensorSpec("float32", (dim,)).to_json()}
    )


def field_spec(field: pa.Field) -> TensorSpec | None:
    """The :class:`TensorSpec` a field's metadata records; None for a column that is not a tensor."""
    raw = (field.metadata or {}).get(TENSOR_METADATA_KEY)
    return TensorSpec.from_json(raw) if raw is not None else None


# --------------------------------------------------------------------------------------------
# Building columns
# --------------------------------------------------------------------------------------------


def as_numpy_tensor(arr: Any, dtype: str | None = None) -> tuple[np.ndarray, str]:
    """C-contiguous little-endian numpy array of ``arr`` and its stored dtype name.

    Accepts numpy arrays (float16/float32, or uint16 bits with ``dtype="bfloat16"``) and torch
    tensors on any device (bfloat16 becomes uint16 bits). No copy when ``arr`` already fits.
    """
    if type(arr).__module__.startswith("torch"):
        import torch

        t = arr.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            if dtype not in (None, "bfloat16"):
                raise ConfigError(f"A bfloat16 tensor cannot be stored as {dtype!r}; convert it first")
            return t.view(torch.int16).numpy().view(np.uint16), "bfloat16"
        arr = t.numpy()
    arr = np.asarray(arr)
    if dtype is None:
        if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4):
            raise ConfigError(
                f"Cannot store numpy dtype {arr.dtype} as a tensor: use float16 or float32 "
                "(or uint16 bits with dtype='bfloat16')"
            )
        dtype = "float16" if arr.dtype.itemsize == 2 else "float32"
    elif dtype not in _NUMPY_DTYPES:
        raise ConfigError(f"Unsupported tensor dtype {dtype!r}; supported: {list(OUTPUT_DTYPES)}")
    want = _NUMPY_DTYPES[dtype]
    if arr.dtype != want:
        kinds = "ui" if dtype == "bfloat16" else "f"
        if arr.dtype.kind not in kinds or arr.dtype.itemsize != want.itemsize:
            hint = (
                " (bfloat16 expects its raw bits as uint16, or a torch tensor)" if dtype == "bfloat16" else ""
            )
            raise ConfigError(f"Array of dtype {arr.dtype} cannot be stored as {dtype!r}{hint}")
        arr = arr.astype(want)  # byte swap, or int16 -> uint16 (same bits)
    return np.ascontiguousarray(arr), dtype


def _validity(ok: np.ndarray) -> tuple[pa.Buffer | None, int]:
    nulls = int(len(ok) - ok.sum())
    return (None, 0) if nulls == 0 else (pa.py_buffer(np.packbits(ok, bitorder="little")), nulls)


def _flat_column(values: np.ndarray, lengths: np.ndarray, ok: np.ndarray, tensor_format: str) -> pa.Array:
    """One column over ``values`` (the ok rows' elements one after the other): row ``i`` holds
    ``lengths[i]`` elements (0 and null where ``ok`` is False). Zero-copy over ``values``."""
    validity, nulls = _validity(ok)
    if tensor_format == "binary":
        offsets = np.zeros(len(ok) + 1, np.int64)
        np.cumsum(lengths * values.itemsize, out=offsets[1:])
        if offsets[-1] >= 2**31:
            raise ValueError("a binary chunk must stay under 2 GiB")
        return pa.Array.from_buffers(
            pa.binary(),
            len(ok),
            [validity, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(values)],
            null_count=nulls,
        )
    if values.dtype != np.dtype("<f4"):
        raise ConfigError(f"the list storage holds float32, not {values.dtype}")
    offsets = np.zeros(len(ok) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("a list chunk must stay under 2**31 values")
    flat = pa.Array.from_buffers(pa.float32(), int(offsets[-1]), [None, pa.py_buffer(values)])
    return pa.ListArray.from_buffers(
        pa.list_(pa.float32()),
        len(ok),
        [validity, pa.py_buffer(offsets.astype(np.int32))],
        null_count=nulls,
        children=[flat],
    )


def _chunks_of(row_bytes: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges whose bytes stay under Arrow's 2 GiB offset limit."""
    if len(row_bytes) == 0:
        return [(0, 0)]
    ranges, start, total = [], 0, 0
    for i, size in enumerate(row_bytes.tolist()):
        if i > start and total + size > _MAX_CHUNK_BYTES:
            ranges.append((start, i))
            start, total = i, 0
        total += size
    ranges.append((start, len(row_bytes)))
    return ranges


def tensor_column(
    data: Any, ok: np.ndarray, *, tensor_format: str, dtype: str | None = None
) -> pa.ChunkedArray:
    """A full-length fixed-shape tensor column: ``data`` (``(ok_rows, *shape)``) at the rows where ``ok``
    is True, null elsewhere. Zero-copy over ``data`` (keep it unchanged until the column is written)."""
    values, dtype = as_numpy_tensor(data, dtype)
    ok = np.asarray(ok, dtype=bool)
    if values.ndim < 2 or values.shape[0] != int(ok.sum()):
        raise ValueError(f"expected ({int(ok.sum())}, *shape) values for the ok rows, got {values.shape}")
    check_tensor_format(tensor_format, dtype)
    per_row = math.prod(values.shape[1:])
    lengths = np.where(ok, per_row, 0).astype(np.int64)
    flat = values.reshape(-1)
    chunks, pos = [], 0
    for start, stop in _chunks_of(lengths * values.itemsize):
        n = int(lengths[start:stop].sum())
        chunks.append(_flat_column(flat[pos : pos + n], lengths[start:stop], ok[start:stop], tensor_format))
        pos += n
    return pa.chunked_array(chunks, type=_value_type(TensorSpec(dtype, values.shape[1:]), tensor_format))


def variable_column(
    data: Any, offsets: np.ndarray, ok: np.ndarray, *, tensor_format: str, dtype: str | None = None
) -> pa.ChunkedArray:
    """A full-length variable-shape tensor column: ``data`` (``(sum n_i, *inner)``) with ``offsets``
    (``(k + 1,)``) holds the ``k`` ok rows in order (row ``j``: ``data[offsets[j]:offsets[j+1]]``),
    placed where ``ok`` is True; the other rows are null. Zero-copy over ``data``."""
    values, dtype = as_numpy_tensor(data, dtype)
    ok = np.asarray(ok, dtype=bool)
    offsets = np.asarray(offsets, dtype=np.int64)
    if len(offsets) != int(ok.sum()) + 1 or offsets[-1] != len(values):
        raise ValueError(f"{len(offsets) - 1} rows of values for {int(ok.sum())} ok rows")
    check_tensor_format(tensor_format, dtype)
    inner = values.shape[1:]
    first = np.zeros(len(ok), np.int64)
    first[ok] = np.diff(offsets)
    lengths = first * math.prod(inner)
    shapes = np.zeros((len(ok), 1 + len(inner)), np.int32)
    shapes[ok, 0] = first[ok]
    shapes[ok, 1:] = inner
    spec = TensorSpec(dtype, (None, *inner))
    typ = _value_type(spec, tensor_format)
    flat = values.reshape(-1)
    chunks, pos = [], 0
    for start, stop in _chunks_of(lengths * values.itemsize):
        n = int(lengths[start:stop].sum())
        mask = ok[start:stop]
        data_col = _flat_column(flat[pos : pos + n], lengths[start:stop], mask, tensor_format)
        shape_col = pa.ListArray.from_arrays(
            pa.array(np.arange(0, (stop - start + 1) * shapes.shape[1], shapes.shape[1], dtype=np.int32)),
            pa.array(shapes[start:stop].reshape(-1)),
        )
        struct = pa.StructArray.from_arrays(
            [shape_col, data_col], fields=list(typ), mask=pa.array(~mask) if not mask.all() else None
        )
        chunks.append(struct)
        pos += n
    return pa.chunked_array(chunks, type=typ)


def pooled_column(data: Any, ok: np.ndarray) -> pa.ChunkedArray:
    """The full-length ``pooled`` column: ``data`` (``(ok_rows, dim)``, made float32) at the ok rows."""
    values = np.ascontiguousarray(np.asarray(data), dtype="<f4")
    ok = np.asarray(ok, dtype=bool)
    if values.ndim != 2 or values.shape[0] != int(ok.sum()):
        raise ValueError(f"expected ({int(ok.sum())}, dim) pooled values for the ok rows, got {values.shape}")
    lengths = np.where(ok, values.shape[1], 0).astype(np.int64)
    return pa.chunked_array([_flat_column(values.reshape(-1), lengths, ok, "list")])


# --------------------------------------------------------------------------------------------
# Reading columns
# --------------------------------------------------------------------------------------------


def valid_mask(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Boolean numpy array: ``True`` where the row holds a value, ``False`` where it is null."""
    return np.asarray(column.is_valid().to_numpy(zero_copy_only=False), dtype=bool)


def _chunks(column: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    if isinstance(column, pa.ChunkedArray):
        return [c for c in column.chunks if len(c)]
    return [column]


def _flat_values(chunk: pa.Array, dtype: np.dtype[Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(values, offsets)`` of a binary or list chunk: its elements as one array (zero-copy) and each
    row's start in it (in elements), relative to the chunk."""
    if pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type):
        width = 8 if pa.types.is_large_binary(chunk.type) else 4
        buffers = chunk.buffers()
        offsets = np.frombuffer(
            buffers[1],
            np.int32 if width == 4 else np.int64,
            count=len(chunk) + 1,
            offset=chunk.offset * width,
        ).astype(np.int64)
        if buffers[2] is None or offsets[-1] == offsets[0]:
            return np.zeros(0, dtype), np.zeros(len(chunk) + 1, np.int64)
        if ((offsets - offsets[0]) % dtype.itemsize).any():
            raise ConfigError(f"tensor bytes are not a whole number of {dtype} values")
        values = np.frombuffer(
            buffers[2], dtype, count=int(offsets[-1] - offsets[0]) // dtype.itemsize, offset=int(offsets[0])
        )
        return values, (offsets - offsets[0]) // dtype.itemsize
    if pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
        offsets = np.asarray(chunk.offsets.to_numpy(), np.int64)
        values = chunk.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        if values.null_count:
            raise ConfigError("a tensor list holds null values")
        if values.type != pa.float32():
            values = values.cast(pa.float32())
        return values.to_numpy(zero_copy_only=False).astype(dtype, copy=False), offsets - offsets[0]
    raise ConfigError(f"Column of type {chunk.type} is not a tensor column")


def column_to_numpy(
    column: pa.Array | pa.ChunkedArray, spec: TensorSpec, *, bfloat16_as: BFloat16As = "uint16"
) -> np.ndarray:
    """``(rows, *shape)`` numpy array of a fixed-shape tensor column (binary or list storage).

    Null rows are zeros (see :func:`valid_mask`). A column of one chunk without nulls gives a read-only
    zero-copy view of its buffer; anything else one copy. bfloat16 comes back as ``uint16`` bits, or as
    float32 (a copy) with ``bfloat16_as="float32"``.
    """
    shape = spec.fixed_shape
    per_row = math.prod(shape)
    chunks = _chunks(column)
    parts: list[np.ndarray] = []
    for chunk in chunks:
        values, offsets = _flat_values(chunk, spec.numpy_dtype)
        lengths = np.diff(offsets)
        valid = valid_mask(chunk)
        if np.any(lengths[valid] != per_row) or np.any(lengths[~valid] != 0):
            raise ConfigError(f"tensor rows do not all hold {per_row} values of {spec}")
        if valid.all():
            view = values.reshape((len(chunk), *shape))
        else:
            view = np.zeros((len(chunk), *shape), spec.numpy_dtype)
            view[valid] = values.reshape((-1, *shape))
        parts.append(view)
    if not parts:
        out = np.zeros((0, *shape), spec.numpy_dtype)
    elif len(parts) == 1:
        out = parts[0]
    else:
        out = np.concatenate(parts)
    return bfloat16_out(out, spec.dtype, bfloat16_as)


def variable_rows(column: pa.Array | pa.ChunkedArray, spec: TensorSpec) -> list[np.ndarray | None]:
    """Each row of a variable-shape tensor column as an array of its own shape (None where null);
    read-only zero-copy views of the column's buffer (binary storage)."""
    out: list[np.ndarray | None] = []
    for chunk in _chunks(column):
        valid = valid_mask(chunk)
        shapes = chunk.field("shape")
        data = chunk.field("data")
        values, offsets = _flat_values(data, spec.numpy_dtype)
        for i in range(len(chunk)):
            if not valid[i]:
                out.append(None)
                continue
            shape = tuple(int(d) for d in shapes[i].as_py())
            out.append(values[offsets[i] : offsets[i + 1]].reshape(shape))
    return out


def bfloat16_out(out: np.ndarray, dtype: str, bfloat16_as: BFloat16As) -> np.ndarray:
    """``out`` as the caller asked for bfloat16 values (uint16 bits as they are, or float32)."""
    if dtype != "bfloat16" or bfloat16_as == "uint16":
        return out
    if bfloat16_as == "float32":
        return (out.astype(np.uint32) << 16).view(np.float32)
    raise ValueError(f"bfloat16_as must be 'uint16' or 'float32', got {bfloat16_as!r}")


def numpy_to_torch(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """Torch view of an array as returned by :func:`column_to_numpy` (bfloat16 bits become
    ``torch.bfloat16``). Shares memory with ``arr``; a read-only ``arr`` must not be written through it."""
    import torch

    if dtype == "bfloat16" and arr.dtype == np.uint16:
        arr = arr.view(np.int16)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "bfloat16" and t.dtype == torch.int16 else t


def shapes_of(rows: Sequence[np.ndarray | None]) -> np.ndarray:
    """Each row's first dimension (0 where None)."""
    return np.array([0 if r is None else len(r) for r in rows], dtype=np.int64)


@dataclass
class RaggedRows:
    """Rows of different shapes held in one array: row ``i`` is ``data[offsets[i]:offsets[i+1]]``, of shape
    ``(offsets[i+1] - offsets[i], *data.shape[1:])`` — LLaVA-NeXT's features (tiles ``[1 + n, tokens,
    dim]``, packed ``[tokens, dim]``), which vary in their first dimension from image to image."""

    data: np.ndarray
    """The rows concatenated along their first dimension."""
    offsets: np.ndarray
    """(rows + 1,) int64 start of each row in ``data``, then its length."""

    def __post_init__(self) -> None:
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        if (
            self.offsets.ndim != 1
            or self.offsets.size < 1
            or self.offsets[0] != 0
            or self.offsets[-1] != len(self.data)
        ):
            raise ValueError(f"offsets {self.offsets.tolist()} do not cover {len(self.data)} values")
        if np.any(np.diff(self.offsets) < 0):
            raise ValueError(f"offsets {self.offsets.tolist()} decrease")

    @classmethod
    def from_rows(cls, rows: Sequence[np.ndarray], like: np.ndarray | None = None) -> RaggedRows:
        """Concatenate ``rows`` (all of one dtype and trailing shape; ``like`` gives them when there is none)."""
        if not rows:
            assert like is not None, "an empty RaggedRows needs a `like` array for its dtype and shape"
            return cls(np.zeros((0, *like.shape[1:]), like.dtype), np.zeros(1, np.int64))
        lengths = [len(r) for r in rows]
        return cls(
            np.concatenate(rows) if len(rows) > 1 else rows[0], np.concatenate([[0], np.cumsum(lengths)])
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        return self.data[self.offsets[index] : self.offsets[index + 1]]

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def inner_shape(self) -> tuple[int, ...]:
        """The shape every row shares after its first dimension."""
        return tuple(self.data.shape[1:])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)
