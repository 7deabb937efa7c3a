"""pipeline.tensors: the tensor extension type, zero-copy conversions, nulls, both formats."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.model.errors import ConfigError
from pipeline.tensors import (
    EXTENSION_NAME,
    TensorArray,
    TensorSpec,
    TensorType,
    ensure_registered,
    fixed_shape_tensor_array,
    pooled_array,
    tensor_array,
    tensor_spec,
    to_numpy,
    to_torch,
    valid_mask,
)

SHAPE = (5, 8)


def _data(n: int = 4, dtype: str = "float16", seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE), dtype=np.float32).astype(dtype)


def _parquet_round_trip(table: pa.Table) -> pa.Table:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return pq.read_table(pa.BufferReader(sink.getvalue()))


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_numpy_exact(dtype: str) -> None:
    data = _data(dtype=dtype)
    arr = tensor_array(data)
    assert isinstance(arr, TensorArray)
    assert arr.type == TensorType(dtype, SHAPE)
    assert arr.type.storage_type == pa.binary(data[0].nbytes)
    back = _parquet_round_trip(pa.table({"f": arr}))
    col = back.column("f")
    assert isinstance(col.type, TensorType)
    assert (col.type.dtype, col.type.shape) == (dtype, SHAPE)
    out = to_numpy(col)
    assert out.dtype == np.dtype(dtype) and out.shape == (4, *SHAPE)
    np.testing.assert_array_equal(_bits(out), _bits(data))


def test_round_trip_bfloat16_torch() -> None:
    t = torch.randn(3, *SHAPE).to(torch.bfloat16)
    arr = tensor_array(t)
    assert arr.type.dtype == "bfloat16" and arr.type.storage_type == pa.binary(2 * 5 * 8)
    col = _parquet_round_trip(pa.table({"f": arr})).column("f")
    back = to_torch(col)
    assert back.dtype == torch.bfloat16 and back.shape == (3, *SHAPE)
    assert torch.equal(back, t)
    # numpy: raw bits as uint16 by default, or an exact float32 conversion.
    bits = to_numpy(col)
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal(bits, t.view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(to_numpy(col, bfloat16_as="float32"), t.float().numpy())
    # uint16 bits with an explicit dtype store the same thing.
    again = tensor_array(bits.copy(), dtype="bfloat16")
    assert again.type == arr.type
    assert torch.equal(to_torch(again), t)


def test_zero_copy_from_numpy() -> None:
    data = _data()
    arr = tensor_array(data)
    data_buffer = arr.storage.buffers()[1]
    assert data_buffer.address == data.ctypes.data  # the Arrow buffer is the numpy memory
    view = arr.to_numpy_ndarray()
    assert np.shares_memory(view, data)
    assert view.shape == (4, *SHAPE)


def test_zero_copy_view_of_read_buffer() -> None:
    data = _data(6)
    table = _parquet_round_trip(pa.table({"f": tensor_array(data)}))
    chunk = table.column("f").chunk(0)
    assert isinstance(chunk, TensorArray)
    view = chunk.to_numpy_ndarray()
    buf = chunk.storage.buffers()[1]
    assert np.shares_memory(view, np.frombuffer(buf, dtype=np.uint8))
    assert (
        view.__array_interface__["data"][0]
        == buf.address + chunk.storage.offset * chunk.type.storage_type.byte_width
    )
    assert not view.flags.writeable
    np.testing.assert_array_equal(view, data)
    # A slice keeps an offset into the same buffer, still without a copy.
    sliced = chunk.slice(2, 3)
    sview = sliced.to_numpy_ndarray()
    assert np.shares_memory(sview, np.frombuffer(buf, dtype=np.uint8))
    np.testing.assert_array_equal(sview, data[2:5])


def test_null_rows() -> None:
    data = _data(4)
    data[[1, 3]] = 0
    mask = np.array([False, True, False, True])
    arr = tensor_array(data, mask)
    assert arr.null_count == 2
    np.testing.assert_array_equal(valid_mask(arr), ~mask)
    assert arr[1].as_py() is None and arr[1].to_numpy() is None
    np.testing.assert_array_equal(arr[2].to_numpy(), data[2])
    # Stride stays fixed: the null rows' (zero) bytes are in the buffer.
    assert arr.storage.buffers()[1].size == data.nbytes
    col = _parquet_round_trip(pa.table({"f": arr})).column("f")
    assert col.null_count == 2
    out = to_numpy(col)  # zeroes nulls by default, whatever the reader left there
    np.testing.assert_array_equal(out, data)
    np.testing.assert_array_equal(out[[1, 3]], 0)
    raw = to_numpy(col, zero_nulls=False)
    np.testing.assert_array_equal(raw[[0, 2]], data[[0, 2]])


def test_multi_chunk_copies_once_into_writable_array() -> None:
    a, b = _data(2, seed=1), _data(3, seed=2)
    col = pa.chunked_array([tensor_array(a), tensor_array(b)])
    out = to_numpy(col)
    assert out.flags.writeable and out.flags.c_contiguous
    assert not np.shares_memory(out, a)
    np.testing.assert_array_equal(out, np.concatenate([a, b]))
    single = to_numpy(pa.chunked_array([tensor_array(a)]))
    assert np.shares_memory(single, a)


def test_fixed_shape_tensor_format_round_trip() -> None:
    data = _data(4)
    data[2] = 0
    mask = np.array([False, False, True, False])
    arr = fixed_shape_tensor_array(data, mask)
    assert arr.type == pa.fixed_shape_tensor(pa.float16(), list(SHAPE))
    assert np.shares_memory(to_numpy(fixed_shape_tensor_array(data)), data)
    col = _parquet_round_trip(pa.table({"f": arr})).column("f")
    assert col.type.extension_name == "arrow.fixed_shape_tensor"
    assert col.null_count == 1
    assert tensor_spec(col.type) == TensorSpec("float16", SHAPE)
    np.testing.assert_array_equal(to_numpy(col), data)
    np.testing.assert_array_equal(to_numpy(col.slice(1, 2)), data[1:3])
    with pytest.raises(ConfigError, match="bfloat16"):
        fixed_shape_tensor_array(torch.zeros(1, *SHAPE, dtype=torch.bfloat16))


def test_pooled_array() -> None:
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    arr = pooled_array(data, np.array([False, True, False]))
    assert arr.type == pa.list_(pa.float32(), 4)
    assert arr.null_count == 1
    assert arr.to_pylist() == [[0.0, 1.0, 2.0, 3.0], None, [8.0, 9.0, 10.0, 11.0]]
    assert np.shares_memory(arr.values.to_numpy(), data)


def test_plain_fixed_size_binary_with_explicit_dtype_and_shape() -> None:
    data = _data(3, dtype="float32")
    plain = pa.array([row.tobytes() for row in data], pa.binary(data[0].nbytes))
    out = to_numpy(plain, dtype="float32", shape=SHAPE)
    np.testing.assert_array_equal(out, data)
    with pytest.raises(ConfigError, match="not a tensor column"):
        to_numpy(plain)
    with pytest.raises(ConfigError):
        to_numpy(plain, dtype="float16", shape=SHAPE)  # wrong width


def test_read_without_the_type_registered() -> None:
    data = _data(3)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"f": tensor_array(data)}), sink)
    payload = sink.getvalue()
    pa.unregister_extension_type(EXTENSION_NAME)
    try:
        table = pq.read_table(pa.BufferReader(payload))
        field = table.schema.field("f")
        assert field.type == pa.binary(data[0].nbytes)  # plain fixed_size_binary
        assert field.metadata[b"ARROW:extension:name"] == EXTENSION_NAME.encode()
        assert json.loads(field.metadata[b"ARROW:extension:metadata"]) == {
            "dtype": "float16",
            "shape": [5, 8],
        }
        assert tensor_spec(field) == TensorSpec("float16", SHAPE)
        np.testing.assert_array_equal(to_numpy(table.column("f"), dtype="float16", shape=SHAPE), data)
    finally:
        ensure_registered()
    again = pq.read_table(pa.BufferReader(payload))
    assert isinstance(again.schema.field("f").type, TensorType)


def test_read_in_a_process_without_the_package(tmp_path: Path) -> None:
    data = _data(3)
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"f": tensor_array(data)}), path)
    np.save(tmp_path / "expected.npy", data)
    code = (
        "import sys, numpy as np, pyarrow.parquet as pq\n"
        "assert 'pipeline' not in sys.modules\n"
        "t = pq.read_table(sys.argv[1])\n"
        "col = t.column('f')\n"
        "assert str(col.type) == 'fixed_size_binary[80]', col.type\n"
        "got = np.frombuffer(b''.join(col.to_pylist()), dtype='<f2').reshape(3, 5, 8)\n"
        "assert np.array_equal(got, np.load(sys.argv[2]))\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code, str(path), str(tmp_path / "expected.npy")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_ensure_registered_is_idempotent() -> None:
    ensure_registered()
    ensure_registered()
    pa.unregister_extension_type(EXTENSION_NAME)
    ensure_registered()  # registers again
    ensure_registered()
    back = _parquet_round_trip(pa.table({"f": tensor_array(_data(1))}))
    assert isinstance(back.column("f").type, TensorType)


def test_type_identity_pickle_and_ipc() -> None:
    t = TensorType("float32", [576, 4096])
    assert t == TensorType("float32", (576, 4096))
    assert t != TensorType("float16", (576, 4096))
    assert hash(t) == hash(TensorType("float32", (576, 4096)))
    assert pickle.loads(pickle.dumps(t)) == t
    assert t.storage_type == pa.binary(576 * 4096 * 4)
    assert json.loads(t.__arrow_ext_serialize__()) == {"dtype": "float32", "shape": [576, 4096]}
    with pytest.raises(TypeError):
        TensorType.__arrow_ext_deserialize__(pa.binary(3), t.__arrow_ext_serialize__())
    arr = tensor_array(_data(2))
    batch = pa.record_batch({"f": arr})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    read = pa.ipc.open_stream(sink.getvalue()).read_all()
    np.testing.assert_array_equal(to_numpy(read.column("f")), _data(2))


@pytest.mark.parametrize(
    ("value", "kwargs"),
    [
        (np.zeros((2, 3), dtype=np.float64), {}),
        (np.zeros((2, 3), dtype=np.int32), {}),
        (np.zeros((2, 3), dtype=np.float32), {"dtype": "bfloat16"}),
        (np.zeros((2, 3), dtype=np.float16), {"dtype": "float8"}),
    ],
)
def test_rejects_unsupported_dtypes(value: np.ndarray, kwargs: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        tensor_array(value, **kwargs)


def test_rejects_bad_shapes_and_masks() -> None:
    with pytest.raises(ValueError, match="shape"):
        tensor_array(np.zeros(3, dtype=np.float16))
    with pytest.raises(ValueError, match="mask"):
        tensor_array(_data(2), np.array([True]))


def test_non_contiguous_input_is_copied_correctly() -> None:
    base = _data(4)
    strided = base[::2]
    arr = tensor_array(strided)
    np.testing.assert_array_equal(to_numpy(arr), strided)
    transposed = np.ascontiguousarray(base.transpose(0, 2, 1)).transpose(0, 2, 1)
    np.testing.assert_array_equal(to_numpy(tensor_array(transposed)), base)


def test_all_null_and_empty_columns() -> None:
    ensure_registered()
    typ = TensorType("float16", SHAPE)
    nulls = pa.nulls(3, typ)
    out = to_numpy(nulls)
    assert out.shape == (3, *SHAPE) and not out.any()
    assert not valid_mask(nulls).any()
    empty = to_numpy(pa.chunked_array([], type=typ))
    assert empty.shape == (0, *SHAPE) and empty.dtype == np.float16
