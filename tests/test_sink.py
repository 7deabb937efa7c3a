"""pipeline.sink and pipeline.reader: shard tables, atomic commits, reading back (pyarrow, pandas, DuckDB, S3)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.bench.sink import bench_sink
from pipeline.constants import CONFIG_KEY, FINGERPRINT_KEY, LAYOUT_KEY
from pipeline.model.errors import ConfigError, ErrorCode, InputReadError
from pipeline.reader import FeatureSet, list_output_files, read_features, read_metadata
from pipeline.sink import (
    METADATA_COLUMNS,
    ShardRows,
    build_table,
    committed_shards,
    remove_stale_temp_files,
    shard_name,
    write_shard,
)
from pipeline.tensors import TensorType, to_numpy

TOKENS, DIM, TOWER_DIM = 5, 8, 4
LOCAL = pafs.LocalFileSystem()
OK_ROWS = [0, 3, 4]  # rows 1 and 2 are errors


def _rows(n: int = 5, errors: tuple[int, ...] = (1, 2), prefix: str = "img") -> ShardRows:
    rows = ShardRows()
    for i in range(n):
        image_id = f"{prefix}-{i}"
        if i in errors:
            rows.add_error(image_id, f"file:///in/{image_id}.jpg", ErrorCode.CORRUPT, f"{image_id}: broken")
        else:
            rows.add_ok(image_id, f"file:///in/{image_id}.jpg", width=100 + i, height=50 + i)
    return rows


def _features(n: int, dim: int = DIM, dtype: str = "float16", seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, TOKENS, dim), dtype=np.float32).astype(dtype)


class Shard(NamedTuple):
    rows: ShardRows
    feats: np.ndarray
    tower: np.ndarray
    pooled: np.ndarray


@pytest.fixture()
def shard() -> Shard:
    """Five inputs, rows 1 and 2 failed: features (3, 5, 8), tower features (3, 5, 4), pooled (3, 8)."""
    feats = _features(3)
    return Shard(_rows(), feats, _features(3, TOWER_DIM, seed=1), feats.astype(np.float32).mean(axis=1))


def _write(tmp_path: Path, shard: Shard, index: int = 0, **kwargs: Any) -> tuple[str, str]:
    rows = shard.rows
    feats = shard.feats
    tower = shard.tower
    pooled = shard.pooled
    table = build_table(
        rows,
        features=feats,
        tower_features=tower,
        pooled=pooled,
        metadata={CONFIG_KEY: json.dumps({"job": {"shard_size": 5}}), FINGERPRINT_KEY: "fp-123"},
        tensor_format=kwargs.pop("tensor_format", "binary"),
    )
    out = str(tmp_path / "out")
    return out, write_shard(table, out, index, filesystem=LOCAL, **kwargs)


# ------------------------------------------------------------------------------------------
# build_table
# ------------------------------------------------------------------------------------------


def test_build_table_schema_and_scatter(shard: Shard) -> None:
    rows = shard.rows
    feats = shard.feats
    tower = shard.tower
    pooled = shard.pooled
    table = build_table(rows, features=feats, tower_features=tower, pooled=pooled, metadata={"k": "v"})
    assert table.column_names == [*METADATA_COLUMNS, "features", "tower_features", "pooled"]
    schema = table.schema
    assert schema.field("status").type == pa.string() and not schema.field("status").nullable
    assert schema.field("width").type == pa.int32()
    assert schema.field("features").type == TensorType("float16", (TOKENS, DIM))
    assert schema.field("tower_features").type == TensorType("float16", (TOKENS, TOWER_DIM))
    assert schema.field("pooled").type == pa.list_(pa.float32(), DIM)
    assert schema.metadata == {b"k": b"v", LAYOUT_KEY.encode(): b"1"}
    assert table.column("status").to_pylist() == ["ok", "error", "error", "ok", "ok"]
    assert table.column("error_code").to_pylist() == [None, "corrupt", "corrupt", None, None]
    assert table.column("width").to_pylist() == [100, None, None, 103, 104]
    for name in ("features", "tower_features", "pooled"):
        assert table.column(name).is_null().to_pylist() == [False, True, True, False, False]
    full = to_numpy(table.column("features"))
    np.testing.assert_array_equal(full[OK_ROWS], feats)
    np.testing.assert_array_equal(full[[1, 2]], 0)
    # Zero-copy scatter: the ok runs are views of the caller's array.
    chunks = table.column("features").chunks
    assert [len(c) for c in chunks] == [1, 2, 2]
    assert np.shares_memory(chunks[0].to_numpy_ndarray(), feats)
    assert np.shares_memory(chunks[2].to_numpy_ndarray(), feats)
    np.testing.assert_array_equal(
        np.stack(table.column("pooled").to_numpy(zero_copy_only=False)[OK_ROWS]), pooled
    )


def test_build_table_validation() -> None:
    rows = _rows()
    with pytest.raises(ValueError, match="3 ok rows"):
        build_table(rows, features=_features(5))
    with pytest.raises(ValueError, match="3 ok rows"):
        build_table(rows, features=_features(3), pooled=np.zeros((2, DIM), np.float32))
    with pytest.raises(ConfigError, match="tensor_format"):
        build_table(rows, features=_features(3), tensor_format="npy")
    bad = _rows()
    bad.status[0] = "maybe"
    with pytest.raises(ValueError, match="status"):
        build_table(bad, features=_features(3))
    short = _rows()
    short.uri.pop()
    with pytest.raises(ValueError, match="uri"):
        build_table(short, features=_features(3))
    no_code = _rows()
    no_code.error_code[1] = None
    with pytest.raises(ValueError, match="without error_code"):
        build_table(no_code, features=_features(3))


def test_shard_without_ok_rows_keeps_the_schema(tmp_path: Path) -> None:
    rows = _rows(3, errors=(0, 1, 2))
    table = build_table(rows, features=_features(0), pooled=np.zeros((0, DIM), np.float32))
    assert table.schema.field("features").type == TensorType("float16", (TOKENS, DIM))
    assert table.column("features").null_count == 3
    out = str(tmp_path / "out")
    write_shard(table, out, 0, filesystem=LOCAL)
    got = read_features(out)
    assert len(got) == 0 and got.features is not None and got.features.shape == (0, TOKENS, DIM)
    everything = read_features(out, status=None)
    assert len(everything) == 3 and not everything.valid.any()
    empty = build_table(ShardRows(), features=_features(0))
    assert empty.num_rows == 0


# ------------------------------------------------------------------------------------------
# write_shard / committed_shards / read_features
# ------------------------------------------------------------------------------------------


def test_write_and_read_round_trip(tmp_path: Path, shard: Shard) -> None:
    feats = shard.feats
    tower = shard.tower
    out, path = _write(tmp_path, shard, index=12)
    assert path == f"{out}/part-000012.parquet"
    assert sorted(os.listdir(out)) == ["part-000012.parquet"]  # no temp file left behind
    assert committed_shards(out, LOCAL) == {12}

    got = read_features(out)
    assert isinstance(got, FeatureSet)
    assert got.image_ids == ["img-0", "img-3", "img-4"]
    assert got.table.column_names == [*METADATA_COLUMNS, "pooled"]
    assert isinstance(got.features, np.ndarray) and got.features.flags.writeable
    np.testing.assert_array_equal(got.features, feats)
    assert got.valid.all() and got.spec is not None and got.spec.dtype == "float16"
    assert got.metadata[FINGERPRINT_KEY] == "fp-123"

    every = read_features(
        out, status=None, column="tower_features", columns=["image_id", "status"], as_torch=True
    )
    assert every.table.column_names == ["image_id", "status"]
    assert isinstance(every.features, torch.Tensor) and every.features.shape == (5, TOKENS, TOWER_DIM)
    assert every.valid.tolist() == [True, False, False, True, True]
    assert torch.equal(every.features[OK_ROWS], torch.from_numpy(tower))
    assert not every.features[[1, 2]].any()

    errors = read_features(out, status="error", column=None)
    assert errors.features is None
    assert errors.table.column("error_code").to_pylist() == ["corrupt", "corrupt"]


def test_pooled_reads_as_a_rows_by_dim_array(tmp_path: Path, shard: Shard) -> None:
    out, _ = _write(tmp_path, shard)
    got = read_features(out, column="pooled")
    assert got.features.dtype == np.float32 and got.features.shape == (3, DIM)
    np.testing.assert_array_equal(got.features, shard.pooled)
    assert got.spec is not None and got.spec.shape == (DIM,) and "pooled" not in got.table.column_names
    every = read_features(out, column="pooled", status=None, as_torch=True)
    assert every.features.shape == (5, DIM) and every.valid.tolist() == [True, False, False, True, True]
    assert torch.equal(every.features[OK_ROWS], torch.from_numpy(shard.pooled))
    assert not every.features[[1, 2]].any()
    with pytest.raises(ConfigError, match=r"FeatureSet\.table.*\['features', 'tower_features', 'pooled'\]"):
        read_features(out, column="width")


def test_several_shards_read_in_shard_order(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    expected = []
    for index in (10, 2, 1000000, 7):  # written out of order; 7-digit index too
        feats = _features(2, seed=index)
        table = build_table(_rows(2, errors=(), prefix=f"s{index}"), features=feats)
        write_shard(table, out, index, filesystem=LOCAL)
        expected.append((index, feats))
    expected.sort(key=lambda item: item[0])
    assert committed_shards(out, LOCAL) == {2, 7, 10, 1000000}
    got = read_features(out, max_files_in_flight=3)
    assert got.image_ids == [f"s{i}-{j}" for i, _ in expected for j in range(2)]
    np.testing.assert_array_equal(got.features, np.concatenate([f for _, f in expected]))
    assert [Path(f).name for f in got.files] == [shard_name(i) for i, _ in expected]


def test_temp_leftovers_are_ignored_and_removed(tmp_path: Path, shard: Shard) -> None:
    out, _ = _write(tmp_path, shard, index=0)
    stale = Path(out) / ".part-000001.parquet.0123abcd.tmp"
    stale.write_bytes(b"half a parquet file")
    (Path(out) / "_SUCCESS").write_bytes(b"")
    assert committed_shards(out, LOCAL) == {0}
    assert [Path(f).name for f in list_output_files(out)] == ["part-000000.parquet"]
    assert len(read_features(out)) == 3
    assert pd.read_parquet(out, columns=["image_id"]).shape == (5, 1)  # pyarrow skips '.'/'_' files too
    # Recent temp files can be spared (a writer may still be busy with them).
    assert remove_stale_temp_files(out, LOCAL, older_than_s=3600) == []
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert remove_stale_temp_files(out, LOCAL, older_than_s=3600) == [str(stale)]
    assert not stale.exists()
    stale.write_bytes(b"again")
    assert remove_stale_temp_files(out, LOCAL) == [str(stale)]
    assert committed_shards(str(tmp_path / "missing"), LOCAL) == set()
    assert remove_stale_temp_files(str(tmp_path / "missing"), LOCAL) == []


def test_failed_write_leaves_nothing(tmp_path: Path, shard: Shard, monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = _write(tmp_path, shard, index=0)

    def boom(self: pq.ParquetWriter, table: pa.Table, row_group_size: int | None = None) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path, shard, index=1)
    assert sorted(os.listdir(out)) == ["part-000000.parquet"]
    assert committed_shards(out, LOCAL) == {0}


def test_rewrite_replaces_a_shard(tmp_path: Path, shard: Shard) -> None:
    out, path = _write(tmp_path, shard, index=3)
    table = build_table(_rows(2, errors=(), prefix="new"), features=_features(2))
    assert write_shard(table, out, 3, filesystem=LOCAL) == path
    assert read_features(out).image_ids == ["new-0", "new-1"]


def test_metadata_round_trip(tmp_path: Path, shard: Shard) -> None:
    out, path = _write(tmp_path, shard)
    meta = read_metadata(out)
    assert meta == {
        CONFIG_KEY: json.dumps({"job": {"shard_size": 5}}),
        FINGERPRINT_KEY: "fp-123",
        LAYOUT_KEY: "1",
    }
    assert json.loads(meta[CONFIG_KEY]) == {"job": {"shard_size": 5}}
    assert read_metadata(path) == meta  # a single file works too
    assert pq.read_schema(path).metadata[FINGERPRINT_KEY.encode()] == b"fp-123"


def test_parquet_layout(tmp_path: Path, shard: Shard) -> None:
    rows = shard.rows
    feats = shard.feats
    tower = shard.tower
    pooled = shard.pooled
    table = build_table(rows, features=feats, tower_features=tower, pooled=pooled)
    out = str(tmp_path / "out")
    # Row groups follow row_group_bytes (here: about two rows each).
    path = write_shard(table, out, 0, filesystem=LOCAL, row_group_bytes=2 * table.nbytes // 5)
    md = pq.ParquetFile(path).metadata
    assert md.num_row_groups == 3
    names = [md.schema.column(i).path for i in range(md.num_columns)]
    rg = md.row_group(0)
    features = rg.column(names.index("features"))
    assert features.physical_type == "FIXED_LEN_BYTE_ARRAY"
    assert features.compression == "UNCOMPRESSED"
    assert not features.is_stats_set
    assert not any("DICTIONARY" in e for e in features.encodings) and not features.has_dictionary_page
    assert rg.column(names.index("status")).is_stats_set
    np.testing.assert_array_equal(read_features(out).features, feats)

    zpath = write_shard(table, str(tmp_path / "z"), 0, filesystem=LOCAL, compression="zstd")
    assert pq.ParquetFile(zpath).metadata.row_group(0).column(0).compression == "ZSTD"
    np.testing.assert_array_equal(read_features(str(tmp_path / "z")).features, feats)
    with pytest.raises(ConfigError, match="compression"):
        write_shard(table, out, 1, filesystem=LOCAL, compression="lzma")


def test_fixed_shape_tensor_format(tmp_path: Path, shard: Shard) -> None:
    feats = shard.feats
    tower = shard.tower
    out, path = _write(tmp_path, shard, tensor_format="fixed_shape_tensor")
    schema = pq.read_schema(path)
    assert schema.field("features").type == pa.fixed_shape_tensor(pa.float16(), [TOKENS, DIM])
    got = read_features(out)
    np.testing.assert_array_equal(got.features, feats)
    every = read_features(out, status=None, column="tower_features")
    np.testing.assert_array_equal(every.features[OK_ROWS], tower)
    assert not every.features[[1, 2]].any()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_other_dtypes(tmp_path: Path, dtype: str) -> None:
    values = torch.randn(3, TOKENS, DIM).to(getattr(torch, dtype))
    table = build_table(_rows(), features=values)
    out = str(tmp_path / "out")
    write_shard(table, out, 0, filesystem=LOCAL)
    got = read_features(out, as_torch=True)
    assert got.features.dtype == values.dtype and torch.equal(got.features, values)
    assert got.spec is not None and got.spec.dtype == dtype
    if dtype == "bfloat16":
        as_f32 = read_features(out, bfloat16_as="float32").features
        np.testing.assert_array_equal(as_f32, values.float().numpy())


def test_read_errors(tmp_path: Path, shard: Shard) -> None:
    with pytest.raises(InputReadError) as info:
        read_features(str(tmp_path / "nothing"))
    assert info.value.code == ErrorCode.READ_FAILED
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputReadError, match="No Parquet shard"):
        read_metadata(str(tmp_path / "empty"))
    out, _ = _write(tmp_path, shard)
    with pytest.raises(ConfigError, match="no column"):
        read_features(out, column="nope")
    with pytest.raises(ConfigError, match="not a tensor column"):
        read_features(out, column="uri")
    with pytest.raises(ConfigError, match="no column"):
        read_features(out, columns=["image_id", "nope"])


# ------------------------------------------------------------------------------------------
# Other readers
# ------------------------------------------------------------------------------------------


def test_pandas_reads_the_output(tmp_path: Path, shard: Shard) -> None:
    out, _ = _write(tmp_path, shard)
    _write(
        tmp_path,
        Shard(_rows(2, errors=(), prefix="b"), _features(2), _features(2, TOWER_DIM), np.zeros((2, DIM))),
        1,
    )
    df = pd.read_parquet(out, columns=["image_id", "status", "error_code", "width"])
    assert len(df) == 7
    assert len(df.query("status == 'ok'")) == 5
    assert set(df.query("status == 'error'")["error_code"]) == {"corrupt"}
    whole = pd.read_parquet(out)
    assert isinstance(whole["features"].iloc[0], bytes) and len(whole["features"].iloc[0]) == TOKENS * DIM * 2


def test_duckdb_reads_the_output(tmp_path: Path, shard: Shard) -> None:
    feats = shard.feats
    pooled = shard.pooled
    out, _ = _write(tmp_path, shard)
    glob = f"{out}/*.parquet"
    con = duckdb.connect()
    assert con.sql(f"select count(*) from read_parquet('{glob}') where status = 'ok'").fetchall() == [(3,)]
    sums = con.sql(
        f"select list_sum(pooled) from read_parquet('{glob}') where status = 'ok' order by image_id"
    ).fetchall()
    np.testing.assert_allclose([s for (s,) in sums], pooled.sum(axis=1), rtol=1e-5)
    cos = con.sql(
        f"select array_cosine_similarity(pooled::FLOAT[{DIM}], list_value({', '.join(['1.0'] * DIM)})::FLOAT[{DIM}]) "
        f"from read_parquet('{glob}') where status = 'ok' order by image_id"
    ).fetchall()
    expected = pooled.sum(axis=1) / (np.linalg.norm(pooled, axis=1) * np.sqrt(DIM))
    np.testing.assert_allclose([c for (c,) in cos], expected, rtol=1e-5)
    blob = con.sql(f"select features from read_parquet('{glob}') where image_id = 'img-3'").fetchall()[0][0]
    np.testing.assert_array_equal(np.frombuffer(blob, dtype="<f2").reshape(TOKENS, DIM), feats[1])
    assert con.sql(f"select count(*) from read_parquet('{glob}') where features is null").fetchall() == [(2,)]


# ------------------------------------------------------------------------------------------
# S3 (moto)
# ------------------------------------------------------------------------------------------


def test_s3_write_and_read(s3_server, shard: Shard, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    rows = shard.rows
    feats = shard.feats
    pooled = shard.pooled
    bucket = s3_server.create_bucket()
    fs = s3_server.filesystem()
    table = build_table(rows, features=feats, pooled=pooled, metadata={FINGERPRINT_KEY: "fp-s3"})
    path = write_shard(table, f"{bucket}/out", 4, filesystem=fs)
    assert path == f"{bucket}/out/part-000004.parquet"
    assert s3_server.list_keys(bucket) == ["out/part-000004.parquet"]  # straight to the final key
    assert committed_shards(f"{bucket}/out", fs) == {4}
    got = read_features(f"{bucket}/out", filesystem=fs)
    np.testing.assert_array_equal(got.features, feats)
    # By URI, with the endpoint from the environment.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    assert read_metadata(f"s3://{bucket}/out")[FINGERPRINT_KEY] == "fp-s3"
    assert read_features(f"s3://{bucket}/out", column=None).image_ids == ["img-0", "img-3", "img-4"]


def test_s3_failed_write_leaves_no_object(s3_server, shard: Shard, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    rows = shard.rows
    feats = shard.feats
    bucket = s3_server.create_bucket()
    fs = s3_server.filesystem()
    table = build_table(rows, features=feats)
    real = pq.ParquetWriter.write_table

    def half(self: pq.ParquetWriter, table: pa.Table, row_group_size: int | None = None) -> None:
        real(self, table.slice(0, 2), row_group_size=1)
        raise OSError("connection reset")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", half)
    with pytest.raises(OSError, match="connection reset"):
        write_shard(table, f"{bucket}/out", 0, filesystem=fs)
    # pyarrow may leave an empty "out/" directory marker behind, never a shard object.
    assert [k for k in s3_server.list_keys(bucket) if not k.endswith("/")] == []
    assert committed_shards(f"{bucket}/out", fs) == set()


# ------------------------------------------------------------------------------------------
# Benchmark (tiny, to keep it working)
# ------------------------------------------------------------------------------------------


def test_bench_sink_smoke(tmp_path: Path) -> None:
    figures = bench_sink(rows=8, tokens=64, dim=512, tmpdir=str(tmp_path), repeats=1)
    assert set(figures["results"]) == {"binary", "fixed_shape_tensor"}
    for result in figures["results"].values():
        assert result["write_mb_s"] > 0 and result["read_mb_s"] > 0
    assert pa.cpu_count() > 0 and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------
# Variable-shape tensors (LLaVA-NeXT: every image has its own number of tiles / tokens)
# ------------------------------------------------------------------------------------------


def _ragged(dtype: str = "float16") -> tuple[list[np.ndarray], list[Any]]:
    """Three ok rows of 3, 1 and 5 "tiles" (base + grid) of (TOKENS, DIM), and their grids."""
    from pipeline.model.anyres import AnyresGrid

    rng = np.random.default_rng(7)
    rows = [rng.standard_normal((n, TOKENS, DIM), dtype=np.float32).astype(dtype) for n in (3, 1, 5)]
    grids = [
        AnyresGrid((90, 40), (224, 112), 112),
        AnyresGrid((50, 50), (112, 112), 112),
        AnyresGrid((300, 310), (224, 224), 112),
    ]
    return rows, grids


@pytest.mark.parametrize("tensor_format", ["binary", "fixed_shape_tensor"])
def test_variable_shape_rows_round_trip(tmp_path: Path, tensor_format: str) -> None:
    from pipeline.records import RaggedRows
    from pipeline.tensors import VariableTensorType, variable_spec

    values, grids = _ragged()
    table = build_table(
        _rows(), features=RaggedRows.from_rows(values), grids=grids, tensor_format=tensor_format
    )
    assert table.column("grid_rows").to_pylist() == [1, None, None, 1, 2]
    assert table.column("grid_cols").to_pylist() == [2, None, None, 1, 2]
    assert table.column("canvas_width").to_pylist() == [224, None, None, 112, 224]
    out = str(tmp_path / "out")
    path = write_shard(table, out, 0, filesystem=LOCAL)
    field = pq.read_schema(path).field("features")
    if tensor_format == "binary":
        assert field.type == VariableTensorType("float16", (TOKENS, DIM))
    else:  # Arrow's canonical variable_shape_tensor, as other Arrow readers know it
        assert field.type.extension_name == "arrow.variable_shape_tensor"
        assert pa.types.is_list(field.type.storage_type.field("data").type)
    spec = variable_spec(field)
    assert spec is not None and (spec.dtype, spec.inner_shape) == ("float16", (TOKENS, DIM))

    got = read_features(out)
    assert got.table.column("image_id").to_pylist() == ["img-0", "img-3", "img-4"]
    assert [r.shape for r in got.features] == [v.shape for v in values]
    for r, v in zip(got.features, values, strict=True):
        np.testing.assert_array_equal(r, v)
    padded = read_features(out, padded=True)
    assert padded.features.shape == (3, 5, TOKENS, DIM) and padded.lengths.tolist() == [3, 1, 5]
    np.testing.assert_array_equal(padded.features[0, :3], values[0])
    assert not padded.features[1, 1:].any() and not padded.features[0, 3:].any()
    every = read_features(out, status=None, as_torch=True)
    assert [None if r is None else tuple(r.shape) for r in every.features] == [
        (3, TOKENS, DIM),
        None,
        None,
        (1, TOKENS, DIM),
        (5, TOKENS, DIM),
    ]
    assert every.valid.tolist() == [True, False, False, True, True]
    assert torch.equal(every.features[4], torch.from_numpy(values[2]))


def test_inspect_reports_variable_shape_columns(tmp_path: Path) -> None:
    from pipeline.inspect import inspect_output
    from pipeline.records import RaggedRows

    values, grids = _ragged()
    table = build_table(_rows(), features=RaggedRows.from_rows(values), grids=grids)
    write_shard(table, str(tmp_path / "out"), 0, filesystem=LOCAL)
    report = inspect_output(tmp_path / "out")
    assert report.state == "unknown" and report.rows == 5 and report.ok == 3  # no _job.json: no plan
    (col,) = report.columns
    assert (col.name, col.dtype, col.shape, col.bytes_per_row) == (
        "features",
        "float16",
        [None, TOKENS, DIM],
        None,
    )


def test_variable_shape_bfloat16_and_duckdb(tmp_path: Path) -> None:
    from pipeline.records import RaggedRows

    values = [torch.randn(n, TOKENS, DIM).to(torch.bfloat16) for n in (2, 4, 1)]
    bits = [v.view(torch.int16).numpy().view(np.uint16) for v in values]
    table = build_table(_rows(), features=RaggedRows.from_rows(bits), dtype="bfloat16")
    out = str(tmp_path / "out")
    write_shard(table, out, 0, filesystem=LOCAL)
    got = read_features(out, as_torch=True)
    assert all(
        g.dtype == torch.bfloat16 and torch.equal(g, v) for g, v in zip(got.features, values, strict=True)
    )
    as_f32 = read_features(out, bfloat16_as="float32").features
    np.testing.assert_array_equal(as_f32[1], values[1].float().numpy())
    # DuckDB (and any Parquet reader) sees a struct of the shape and the little-endian bytes.
    con = duckdb.connect()
    shape, blob = con.sql(
        f"select features.shape, features.data from read_parquet('{out}/*.parquet') where image_id = 'img-4'"
    ).fetchall()[0]
    assert list(shape) == [1, TOKENS, DIM] and len(blob) == TOKENS * DIM * 2
    assert np.array_equal(np.frombuffer(blob, "<u2"), bits[2].reshape(-1))
