"""Arrow columns of fixed-shape tensors: the storage format of every feature column.

Two encodings are supported, selected by ``JobConfig.tensor_format``:

``binary`` (default, fast)
    Our extension type ``llava_features.tensor`` (:class:`TensorType`). Its storage is a
    ``fixed_size_binary(itemsize * prod(shape))`` column holding each row's tensor as raw
    little-endian C-order bytes; the extension metadata is the JSON
    ``{"dtype": "float16", "shape": [576, 4096]}``. Parquet writes and reads such a column at
    memcpy-like speed (no per-element work). Readers without this package (DuckDB, Spark,
    plain pyarrow) see an ordinary ``fixed_size_binary`` column; the dtype and shape remain
    readable from the Arrow field metadata (``ARROW:extension:metadata``).

``fixed_shape_tensor`` (canonical, slow)
    Arrow's canonical ``arrow.fixed_shape_tensor`` extension over
    ``fixed_size_list<float16|float32>[prod(shape)]``. Understood natively by other Arrow
    implementations, but Parquet writes it element by element (~8x slower).

Conventions shared by every function here:

- Arrays are little-endian and C-contiguous; row ``i`` of an ``(N, *shape)`` array is one
  Arrow value.
- ``mask`` follows pyarrow's convention: ``True`` marks a **null** row.
- Null rows keep their fixed stride: their bytes are present in the data buffer, and the
  arrays built here (and so the shards written by :mod:`pipeline.sink`) hold zeros there.
  Parquet does not store the bytes of null values, and pyarrow's reader leaves *other rows'
  bytes* in those slots, so zero-copy views (:meth:`TensorArray.to_numpy_ndarray`) of data read
  back show unspecified values at null rows; :func:`to_numpy` zeroes them by default (copying
  only when the column has nulls). Use :func:`valid_mask` to tell null rows apart.
- ``bfloat16``: numpy has no bfloat16, so numpy access returns the raw bits as ``uint16``
  (lossless and zero-copy); pass ``bfloat16_as="float32"`` to :func:`to_numpy` for an exact
  float32 copy, or use :func:`to_torch` for a real ``torch.bfloat16`` tensor. Arrow has no
  bfloat16 either, so ``fixed_shape_tensor`` does not support it.

The extension type must be registered in every process that should see it as a tensor
column; :func:`ensure_registered` does that idempotently and every function of the storage
layer calls it. Nothing is registered at import time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

from .constants import OUTPUT_DTYPES, TENSOR_FORMATS
from .model.errors import ConfigError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "EXTENSION_NAME",
    "SUPPORTED_DTYPES",
    "TENSOR_FORMATS",
    "TensorArray",
    "TensorScalar",
    "TensorSpec",
    "TensorType",
    "as_numpy_tensor",
    "ensure_registered",
    "fixed_shape_tensor_array",
    "is_tensor_type",
    "make_tensor_array",
    "numpy_to_torch",
    "pooled_array",
    "tensor_array",
    "tensor_spec",
    "to_numpy",
    "to_torch",
    "valid_mask",
]

EXTENSION_NAME = "llava_features.tensor"
"""Arrow extension name of :class:`TensorType` (stored in ``ARROW:extension:name``)."""

SUPPORTED_DTYPES: tuple[str, ...] = OUTPUT_DTYPES
"""dtypes a tensor column may hold (the encoder's output dtypes)."""

# Little-endian numpy dtype of the stored elements (bfloat16: its raw bits).
_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "bfloat16": np.dtype("<u2"),
}
_ARROW_VALUE_TYPES: dict[str, pa.DataType] = {"float16": pa.float16(), "float32": pa.float32()}

BFloat16As = Literal["uint16", "float32"]


# --------------------------------------------------------------------------------------------
# The extension type
# --------------------------------------------------------------------------------------------


def _check_spec(dtype: str, shape: Sequence[int]) -> tuple[str, tuple[int, ...]]:
    if dtype not in SUPPORTED_DTYPES:
        raise ConfigError(f"Unsupported tensor dtype {dtype!r}; supported: {list(SUPPORTED_DTYPES)}")
    dims = tuple(int(d) for d in shape)
    if not dims or any(d <= 0 for d in dims):
        raise ConfigError(f"Tensor shape must be non-empty with positive dimensions, got {list(shape)}")
    return dtype, dims


class TensorSpec:
    """dtype and shape of one tensor value (immutable, hashable)."""

    __slots__ = ("dtype", "shape")

    def __init__(self, dtype: str, shape: Sequence[int]) -> None:
        self.dtype, self.shape = _check_spec(dtype, shape)

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        """Stored element dtype in numpy (``uint16`` bits for bfloat16)."""
        return _NUMPY_DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.numpy_dtype.itemsize

    @property
    def size(self) -> int:
        """Elements per value."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes per value (the ``fixed_size_binary`` width)."""
        return self.itemsize * self.size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TensorSpec) and (self.dtype, self.shape) == (other.dtype, other.shape)

    def __hash__(self) -> int:
        return hash((self.dtype, self.shape))

    def __repr__(self) -> str:
        return f"TensorSpec(dtype={self.dtype!r}, shape={list(self.shape)})"


class TensorType(pa.ExtensionType):
    """``llava_features.tensor``: fixed-shape tensors stored as ``fixed_size_binary`` rows."""

    def __init__(self, dtype: str, shape: Sequence[int]) -> None:
        self._spec = TensorSpec(dtype, shape)
        super().__init__(pa.binary(self._spec.nbytes), EXTENSION_NAME)

    @property
    def spec(self) -> TensorSpec:
        return self._spec

    @property
    def dtype(self) -> str:
        """``float16``, ``float32`` or ``bfloat16``."""
        return self._spec.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one value, e.g. ``(576, 4096)``."""
        return self._spec.shape

    def __arrow_ext_serialize__(self) -> bytes:
        return json.dumps(
            {"dtype": self.dtype, "shape": list(self.shape)}, sort_keys=True, separators=(",", ":")
        ).encode()

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type: pa.DataType, serialized: bytes) -> TensorType:
        meta = json.loads(serialized.decode())
        out = cls(meta["dtype"], meta["shape"])
        if storage_type != out.storage_type:
            raise TypeError(
                f"{EXTENSION_NAME} metadata {meta} needs storage {out.storage_type}, got {storage_type}"
            )
        return out

    def __hash__(self) -> int:
        return hash((EXTENSION_NAME, self._spec))

    def __arrow_ext_class__(self) -> type[pa.ExtensionArray]:
        return TensorArray

    def __arrow_ext_scalar_class__(self) -> type[pa.ExtensionScalar]:
        return TensorScalar


class TensorArray(pa.ExtensionArray):
    """Array of :class:`TensorType`; :meth:`to_numpy_ndarray` is a zero-copy view."""

    def to_numpy_ndarray(self, *, bfloat16_as: BFloat16As = "uint16") -> np.ndarray:
        """``(len, *shape)`` view of the stored bytes, without copying.

        The view is read-only (it aliases the Arrow buffer). Null rows hold whatever bytes the
        buffer has at their place: zeros in arrays built by this package, unspecified bytes
        after a Parquet round trip (see :func:`valid_mask`, or :func:`to_numpy` which zeroes
        them). bfloat16 comes back as ``uint16`` bits unless ``bfloat16_as="float32"`` (then it
        is a converted copy).
        """
        return to_numpy(self, bfloat16_as=bfloat16_as, zero_nulls=False)

    def to_torch(self) -> torch.Tensor:
        """``(len, *shape)`` torch tensor sharing memory with the Arrow buffer (see :func:`to_torch`)."""
        return to_torch(self)

    @classmethod
    def from_numpy(cls, arr: Any, mask: np.ndarray | None = None, *, dtype: str | None = None) -> pa.Array:
        """Same as :func:`tensor_array`."""
        return tensor_array(arr, mask, dtype=dtype)


class TensorScalar(pa.ExtensionScalar):
    """One value of :class:`TensorType`."""

    def to_numpy(self, *, bfloat16_as: BFloat16As = "uint16") -> np.ndarray | None:
        """The value as a ``shape`` array (zero-copy, read-only), or ``None`` when null."""
        if not self.is_valid:
            return None
        spec: TensorSpec = self.type.spec
        out = np.frombuffer(self.value.as_buffer(), dtype=spec.numpy_dtype).reshape(spec.shape)
        return _bf16_out(out, spec, bfloat16_as)


def ensure_registered() -> None:
    """Register :class:`TensorType` and :class:`VariableTensorType` with pyarrow in this process;
    idempotent and cheap.

    Needed before reading Parquet/IPC data so that the column comes back as a
    :class:`TensorArray` (otherwise it is plain ``fixed_size_binary``). Safe when another copy
    of this module (e.g. in a Ray worker) registered it first.
    """
    for typ in (TensorType("float16", (1,)), VariableTensorType("float16", (1,))):
        with contextlib.suppress(pa.ArrowKeyError):  # already registered
            pa.register_extension_type(typ)


# --------------------------------------------------------------------------------------------
# Building arrays
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
    elif dtype not in SUPPORTED_DTYPES:
        raise ConfigError(f"Unsupported tensor dtype {dtype!r}; supported: {list(SUPPORTED_DTYPES)}")
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


def _validity_buffer(mask: np.ndarray | None, n: int) -> tuple[pa.Buffer | None, int]:
    if mask is None:
        return None, 0
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (n,):
        raise ValueError(f"mask must have shape ({n},), got {mask.shape}")
    nulls = int(mask.sum())
    if nulls == 0:
        return None, 0
    return pa.py_buffer(np.packbits(~mask, bitorder="little")), nulls


def tensor_array(arr: Any, mask: np.ndarray | None = None, *, dtype: str | None = None) -> pa.ExtensionArray:
    """:class:`TensorArray` of ``arr`` (``(N, *shape)``), zero-copy when it is C-contiguous.

    ``arr`` is a numpy array of float16/float32, a uint16 array of bfloat16 bits with
    ``dtype="bfloat16"``, or a torch tensor (any device; bfloat16 kept as bfloat16). ``mask``
    (``True`` = null) marks null rows; their bytes are stored as they are in ``arr`` (pass
    zeros there to keep files deterministic, as :func:`pipeline.sink.build_table` does). The
    returned array keeps ``arr`` alive and aliases its memory: do not modify ``arr`` afterwards.
    """
    ensure_registered()
    data, dtype = as_numpy_tensor(arr, dtype)
    if data.ndim < 2:
        raise ValueError(f"tensor_array needs an (N, *shape) array, got shape {data.shape}")
    typ = TensorType(dtype, data.shape[1:])
    n = data.shape[0]
    validity, nulls = _validity_buffer(mask, n)
    storage = pa.Array.from_buffers(typ.storage_type, n, [validity, pa.py_buffer(data)], null_count=nulls)
    return pa.ExtensionArray.from_storage(typ, storage)


def fixed_shape_tensor_array(
    arr: Any, mask: np.ndarray | None = None, *, dtype: str | None = None
) -> pa.ExtensionArray:
    """Canonical ``arrow.fixed_shape_tensor`` array of ``arr`` (``(N, *shape)`` float16/float32).

    Zero-copy like :func:`tensor_array`; ``mask`` (``True`` = null) marks null rows. bfloat16 is
    not supported: Arrow has no bfloat16 value type.
    """
    data, dtype = as_numpy_tensor(arr, dtype)
    if dtype not in _ARROW_VALUE_TYPES:
        raise ConfigError("tensor_format 'fixed_shape_tensor' does not support bfloat16; use 'binary'")
    if data.ndim < 2:
        raise ValueError(f"fixed_shape_tensor_array needs an (N, *shape) array, got shape {data.shape}")
    n, shape = data.shape[0], data.shape[1:]
    value_type = _ARROW_VALUE_TYPES[dtype]
    size = math.prod(shape)
    values = pa.Array.from_buffers(value_type, n * size, [None, pa.py_buffer(data)])
    validity, nulls = _validity_buffer(mask, n)
    storage = pa.Array.from_buffers(
        pa.list_(value_type, size), n, [validity], null_count=nulls, children=[values]
    )
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(value_type, list(shape)), storage)


def make_tensor_array(
    arr: Any, mask: np.ndarray | None = None, *, tensor_format: str = "binary", dtype: str | None = None
) -> pa.Array:
    """:func:`tensor_array` or :func:`fixed_shape_tensor_array` according to ``tensor_format``."""
    if tensor_format == "binary":
        return tensor_array(arr, mask, dtype=dtype)
    if tensor_format == "fixed_shape_tensor":
        return fixed_shape_tensor_array(arr, mask, dtype=dtype)
    raise ConfigError(f"Unknown tensor_format {tensor_format!r}; expected one of {list(TENSOR_FORMATS)}")


def pooled_array(arr: Any, mask: np.ndarray | None = None) -> pa.FixedSizeListArray:
    """``fixed_size_list<float32>[D]`` array of ``arr`` (``(N, D)``), readable as arrays by DuckDB/Polars.

    ``arr`` is converted to float32 (zero-copy when it already is and C-contiguous); ``mask``
    (``True`` = null) marks null rows.
    """
    data = np.ascontiguousarray(np.asarray(arr), dtype="<f4")
    if data.ndim != 2:
        raise ValueError(f"pooled_array needs an (N, D) array, got shape {data.shape}")
    n, d = data.shape
    values = pa.Array.from_buffers(pa.float32(), n * d, [None, pa.py_buffer(data)])
    validity, nulls = _validity_buffer(mask, n)
    return pa.Array.from_buffers(
        pa.list_(pa.float32(), d), n, [validity], null_count=nulls, children=[values]
    )


# --------------------------------------------------------------------------------------------
# Reading arrays
# --------------------------------------------------------------------------------------------


def is_tensor_type(typ: pa.DataType) -> bool:
    """Whether ``typ`` is a tensor column type (ours, registered or not, or fixed_shape_tensor)."""
    return isinstance(typ, pa.BaseExtensionType) and typ.extension_name in (
        EXTENSION_NAME,
        "arrow.fixed_shape_tensor",
    )


def tensor_spec(
    typ: pa.DataType | pa.Field, *, dtype: str | None = None, shape: Sequence[int] | None = None
) -> TensorSpec:
    """:class:`TensorSpec` of a tensor column type, or of a field/type with explicit or recorded metadata.

    Works for :class:`TensorType` (also when another copy of the class was registered),
    ``arrow.fixed_shape_tensor``, and a plain ``fixed_size_binary`` field read without our type
    registered (its ``ARROW:extension:metadata`` field metadata is used), or explicit
    ``dtype``/``shape``.
    """
    if dtype is not None and shape is not None:
        return TensorSpec(dtype, shape)
    field = typ if isinstance(typ, pa.Field) else None
    t = field.type if field is not None else typ
    if isinstance(t, pa.BaseExtensionType):
        if t.extension_name == EXTENSION_NAME:
            meta = json.loads(t.__arrow_ext_serialize__().decode())
            return TensorSpec(meta["dtype"], meta["shape"])
        if t.extension_name == "arrow.fixed_shape_tensor":
            vt = t.value_type
            for name, at in _ARROW_VALUE_TYPES.items():
                if vt == at:
                    return TensorSpec(name, t.shape)
            raise ConfigError(f"Unsupported fixed_shape_tensor value type {vt}")
    md = (field.metadata or {}) if field is not None else {}
    if md.get(b"ARROW:extension:name") == EXTENSION_NAME.encode():
        meta = json.loads(md[b"ARROW:extension:metadata"].decode())
        return TensorSpec(dtype or meta["dtype"], shape or meta["shape"])
    raise ConfigError(
        f"Column of type {t} is not a tensor column; pass dtype= and shape= to read raw fixed_size_binary"
    )


def _bf16_out(out: np.ndarray, spec: TensorSpec, bfloat16_as: BFloat16As) -> np.ndarray:
    if spec.dtype != "bfloat16" or bfloat16_as == "uint16":
        return out
    if bfloat16_as == "float32":
        return (out.astype(np.uint32) << 16).view(np.float32)
    raise ValueError(f"bfloat16_as must be 'uint16' or 'float32', got {bfloat16_as!r}")


def _chunk_view(chunk: pa.Array, spec: TensorSpec) -> np.ndarray:
    """Zero-copy ``(len, *shape)`` view of one chunk's data buffer."""
    storage = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
    n = len(storage)
    if pa.types.is_fixed_size_binary(storage.type):
        if storage.type.byte_width != spec.nbytes:
            raise ConfigError(f"fixed_size_binary[{storage.type.byte_width}] does not hold {spec}")
        buf = storage.buffers()[1]
        if n == 0 or buf is None:  # empty, or all-null without a data buffer
            return np.zeros((n, *spec.shape), dtype=spec.numpy_dtype)
        flat = np.frombuffer(
            buf, dtype=spec.numpy_dtype, count=n * spec.size, offset=storage.offset * spec.nbytes
        )
        out = flat.reshape((n, *spec.shape))
        out.flags.writeable = False  # Arrow arrays are immutable, even over mutable buffers
        return out
    if pa.types.is_fixed_size_list(storage.type):
        if storage.type.list_size != spec.size:
            raise ConfigError(f"{storage.type} does not hold {spec}")
        values = storage.values.slice(storage.offset * spec.size, n * spec.size)
        if values.null_count:
            return values.fill_null(0).to_numpy(zero_copy_only=False).reshape((n, *spec.shape))
        out = values.to_numpy(zero_copy_only=True).reshape((n, *spec.shape))
        out.flags.writeable = False
        return out
    raise ConfigError(f"Column of type {chunk.type} is not a tensor column")


def _chunks(column: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    if isinstance(column, pa.ChunkedArray):
        return [c for c in column.chunks if len(c)]
    return [column]


def to_numpy(
    column: pa.Array | pa.ChunkedArray,
    *,
    dtype: str | None = None,
    shape: Sequence[int] | None = None,
    bfloat16_as: BFloat16As = "uint16",
    zero_nulls: bool = True,
) -> np.ndarray:
    """``(rows, *shape)`` numpy array of a tensor column (either format, or raw fixed_size_binary).

    - One chunk (a :class:`pa.Array` or a single-chunk :class:`pa.ChunkedArray`) without null
      rows: a read-only, zero-copy view of the Arrow buffer.
    - Several chunks: one copy into a new contiguous, writable array.
    - Null rows are zeroed (``zero_nulls=True``, the default; a single-chunk column with nulls
      is then copied). ``zero_nulls=False`` keeps the view zero-copy, with unspecified values
      at null rows. See :func:`valid_mask`.
    - A plain ``fixed_size_binary`` column (read where the type was not registered, or by
      another tool) needs ``dtype`` and ``shape`` unless its field metadata is passed through
      :func:`tensor_spec`.
    - bfloat16 is returned as ``uint16`` bits, or as float32 (a copy) with
      ``bfloat16_as="float32"``.
    """
    ensure_registered()
    spec = tensor_spec(column.type, dtype=dtype, shape=shape)
    chunks = _chunks(column)
    if not chunks:
        out = np.zeros((0, *spec.shape), dtype=spec.numpy_dtype)
    elif len(chunks) == 1:
        out = _chunk_view(chunks[0], spec)
    else:
        total = sum(len(c) for c in chunks)
        out = np.empty((total, *spec.shape), dtype=spec.numpy_dtype)
        pos = 0
        for chunk in chunks:
            out[pos : pos + len(chunk)] = _chunk_view(chunk, spec)
            pos += len(chunk)
    if zero_nulls and column.null_count:
        if not out.flags.writeable:
            out = out.copy()
        out[~valid_mask(column)] = 0
    return _bf16_out(out, spec, bfloat16_as)


def valid_mask(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Boolean numpy array: ``True`` where the row holds a value, ``False`` where it is null."""
    return np.asarray(column.is_valid().to_numpy(zero_copy_only=False), dtype=bool)


def numpy_to_torch(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """Torch view of an array as returned by :func:`to_numpy` (bfloat16 bits become ``torch.bfloat16``).

    Shares memory with ``arr``; when ``arr`` is read-only (a zero-copy view of an Arrow buffer)
    the tensor must not be written to.
    """
    import torch

    if dtype == "bfloat16" and arr.dtype == np.uint16:
        arr = arr.view(np.int16)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "bfloat16" and t.dtype == torch.int16 else t


def to_torch(
    column: pa.Array | pa.ChunkedArray, *, dtype: str | None = None, shape: Sequence[int] | None = None
) -> torch.Tensor:
    """``(rows, *shape)`` torch tensor of a tensor column (bfloat16 as ``torch.bfloat16``).

    Same copy rules as :func:`to_numpy`: a single chunk gives a tensor that shares (read-only)
    memory with the Arrow buffer, so ``.clone()`` it before writing in place.
    """
    spec = tensor_spec(column.type, dtype=dtype, shape=shape)
    return numpy_to_torch(to_numpy(column, dtype=spec.dtype, shape=spec.shape), spec.dtype)


# --------------------------------------------------------------------------------------------
# Variable-shape tensors (LLaVA-NeXT: rows differ in their first dimension)
# --------------------------------------------------------------------------------------------

VARIABLE_EXTENSION_NAME = "llava_features.variable_tensor"
"""Arrow extension name of :class:`VariableTensorType`."""
CANONICAL_VARIABLE_NAME = "arrow.variable_shape_tensor"
"""Arrow's canonical variable-shape tensor extension (written with ``tensor_format: fixed_shape_tensor``)."""


class VariableTensorType(pa.ExtensionType):
    """``llava_features.variable_tensor``: tensors ``[n_i, *inner_shape]`` whose first dimension varies.

    Storage: ``struct<shape: fixed_size_list<int32>[ndim], data: large_binary>``: each row's own shape
    and its raw little-endian C-order bytes, so a row is a zero-copy view, and readers without this
    package see a plain struct of a shape and a blob. Metadata: ``{"dtype", "inner_shape"}``.
    """

    def __init__(self, dtype: str, inner_shape: Sequence[int]) -> None:
        self._dtype, self._inner = (
            _check_spec(dtype, (1, *inner_shape))[0],
            tuple(int(d) for d in inner_shape),
        )
        storage = pa.struct(
            [
                pa.field("shape", pa.list_(pa.int32(), 1 + len(self._inner))),
                pa.field("data", pa.large_binary()),
            ]
        )
        super().__init__(storage, VARIABLE_EXTENSION_NAME)

    @property
    def dtype(self) -> str:
        return self._dtype

    @property
    def inner_shape(self) -> tuple[int, ...]:
        """The shape every row shares after its first dimension, e.g. ``(576, 4096)`` for tiles."""
        return self._inner

    def __arrow_ext_serialize__(self) -> bytes:
        return json.dumps({"dtype": self._dtype, "inner_shape": list(self._inner)}, sort_keys=True).encode()

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type: pa.DataType, serialized: bytes) -> VariableTensorType:
        meta = json.loads(serialized.decode())
        return cls(meta["dtype"], meta["inner_shape"])

    def __hash__(self) -> int:
        return hash((VARIABLE_EXTENSION_NAME, self._dtype, self._inner))


@dataclass(frozen=True)
class VariableSpec:
    """dtype and shared trailing shape of a variable-shape tensor column."""

    dtype: str
    inner_shape: tuple[int, ...]

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        return _NUMPY_DTYPES[self.dtype]


def variable_tensor_column(
    data: Any,
    offsets: np.ndarray,
    valid: np.ndarray,
    *,
    tensor_format: str = "binary",
    dtype: str | None = None,
) -> tuple[pa.Array, dict[bytes, bytes] | None]:
    """A full-length variable-shape tensor column and the field metadata it needs (None for ours).

    ``data`` (``(sum n_i, *inner)``) and ``offsets`` (``(k + 1,)``) hold the ``k`` valid rows, in order;
    ``valid`` (``(rows,)`` bool, ``k`` True) places them; the other rows are null. ``binary``:
    :class:`VariableTensorType`, zero-copy over ``data``. ``fixed_shape_tensor``: Arrow's canonical
    ``arrow.variable_shape_tensor`` (``struct<data: list<T>, shape: fixed_size_list<int32>[ndim]>``,
    flagged by field metadata; float16/float32 only).
    """
    values, dtype = as_numpy_tensor(data, dtype)
    valid = np.asarray(valid, dtype=bool)
    offsets = np.asarray(offsets, dtype=np.int64)
    if len(offsets) != int(valid.sum()) + 1 or offsets[-1] != len(values):
        raise ValueError(f"{len(offsets) - 1} rows of values for {int(valid.sum())} valid rows")
    inner = values.shape[1:]
    n = len(valid)
    lengths = np.zeros(n, np.int64)
    lengths[valid] = np.diff(offsets)
    shapes = np.zeros((n, 1 + len(inner)), np.int32)
    shapes[valid, 0] = lengths[valid]
    shapes[valid, 1:] = inner
    mask = pa.array(~valid)
    shape_array = pa.FixedSizeListArray.from_arrays(pa.array(shapes.reshape(-1)), 1 + len(inner))
    per_row = math.prod(inner)
    if tensor_format == "binary":
        ensure_registered()
        byte_offsets = np.concatenate([[0], np.cumsum(lengths * per_row * values.itemsize)]).astype(np.int64)
        blobs = pa.Array.from_buffers(
            pa.large_binary(), n, [None, pa.py_buffer(byte_offsets), pa.py_buffer(values)]
        )
        storage = pa.StructArray.from_arrays([shape_array, blobs], names=["shape", "data"], mask=mask)
        return pa.ExtensionArray.from_storage(VariableTensorType(dtype, inner), storage), None
    if tensor_format != "fixed_shape_tensor":
        raise ConfigError(f"Unknown tensor_format {tensor_format!r}; expected one of {list(TENSOR_FORMATS)}")
    if dtype not in _ARROW_VALUE_TYPES:
        raise ConfigError("tensor_format 'fixed_shape_tensor' does not support bfloat16; use 'binary'")
    element_offsets = np.concatenate([[0], np.cumsum(lengths * per_row)]).astype(np.int64)
    if element_offsets[-1] >= 2**31:
        raise ConfigError("a shard's variable-shape tensors exceed 2**31 values: lower job.shard_size")
    flat = pa.Array.from_buffers(
        _ARROW_VALUE_TYPES[dtype], int(element_offsets[-1]), [None, pa.py_buffer(values)]
    )
    lists = pa.ListArray.from_arrays(pa.array(element_offsets.astype(np.int32)), flat)
    storage = pa.StructArray.from_arrays([lists, shape_array], names=["data", "shape"], mask=mask)
    metadata = {
        b"ARROW:extension:name": CANONICAL_VARIABLE_NAME.encode(),
        b"ARROW:extension:metadata": json.dumps({"uniform_shape": [None, *inner]}).encode(),
    }
    return storage, metadata


def variable_spec(typ: pa.DataType | pa.Field) -> VariableSpec | None:
    """:class:`VariableSpec` of a variable-shape tensor column (ours or Arrow's canonical), else None."""
    field = typ if isinstance(typ, pa.Field) else None
    t = field.type if field is not None else typ
    name = t.extension_name if isinstance(t, pa.BaseExtensionType) else None
    if name == VARIABLE_EXTENSION_NAME:
        meta = json.loads(t.__arrow_ext_serialize__().decode())
        return VariableSpec(meta["dtype"], tuple(meta["inner_shape"]))
    if name == CANONICAL_VARIABLE_NAME:
        storage = t.storage_type
        value_type = storage.field("data").type.value_type
        dtype = next((k for k, v in _ARROW_VALUE_TYPES.items() if v == value_type), None)
        # pyarrow exposes the C++ canonical type without its metadata: read it from the type's text.
        match = re.search(r"uniform_shape=\[([^\]]*)\]", str(t))
        uniform = (
            [None if v.strip() == "null" else int(v) for v in match.group(1).split(",")] if match else []
        )
        if dtype is None or None in uniform[1:] or len(uniform) != storage.field("shape").type.list_size:
            raise ConfigError(f"variable_shape_tensor column {t} is not one this package writes")
        return VariableSpec(dtype, tuple(uniform[1:]))
    md = (field.metadata or {}) if field is not None else {}
    if md.get(b"ARROW:extension:name") == VARIABLE_EXTENSION_NAME.encode():
        meta = json.loads(md[b"ARROW:extension:metadata"].decode())
        return VariableSpec(meta["dtype"], tuple(meta["inner_shape"]))
    return None


def variable_rows(column: pa.Array | pa.ChunkedArray, spec: VariableSpec) -> list[np.ndarray | None]:
    """Each row of a variable-shape tensor column as a numpy array of its own shape (None where null).

    Rows of our type are read-only zero-copy views of the column's buffer; canonical rows too
    when they hold no nulls inside.
    """
    out: list[np.ndarray | None] = []
    for chunk in _chunks(column):
        storage = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
        shape_field = storage.field("shape")
        ndim = shape_field.type.list_size
        shapes = shape_field.values.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        shapes = shapes[shape_field.offset * ndim : (shape_field.offset + len(storage)) * ndim].reshape(
            -1, ndim
        )
        valid = storage.is_valid().to_numpy(zero_copy_only=False)
        data = storage.field("data")
        if pa.types.is_large_binary(data.type):
            offsets = np.frombuffer(data.buffers()[1], np.int64, count=len(data) + 1, offset=data.offset * 8)
            buf = data.buffers()[2]
            for i in range(len(storage)):
                if not valid[i]:
                    out.append(None)
                    continue
                row = np.frombuffer(
                    buf, spec.numpy_dtype, count=int(shapes[i].prod()), offset=int(offsets[i])
                )
                out.append(row.reshape(tuple(shapes[i])))
        else:
            for i in range(len(storage)):
                if not valid[i]:
                    out.append(None)
                    continue
                values = data[i].values.to_numpy(zero_copy_only=False)
                out.append(values.astype(spec.numpy_dtype, copy=False).reshape(tuple(shapes[i])))
    return out
