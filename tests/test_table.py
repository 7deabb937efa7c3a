"""The feature table (``pipeline/table/``) without Ray: tensor columns, data files, the Delta log protocol
(claim, per-unit transactions, batched commits, leases, finish), readers and inspect."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import warnings
from pathlib import Path
from typing import Any

import deltalake
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.model.errors import ConfigError, ErrorCode, IncompleteTableWarning, InputReadError, OutputError
from pipeline.table import (
    SUCCESS_FILE,
    DataFile,
    IdSet,
    InputRows,
    PlannedUnit,
    RaggedRows,
    RunPlan,
    TableIdentity,
    TableLocation,
    TableSpec,
    TableWriter,
    TensorSpec,
    build_batch,
    inspect_table,
    read_features,
)
from pipeline.table import lease as lease_module
from pipeline.table.files import write_data_file
from pipeline.table.layout import DataFileName, lease_path
from pipeline.table.lease import Lease
from pipeline.table.log import CommitRecord, commit_conflict_types, commit_files, load_snapshot
from pipeline.table.tensors import (
    column_to_numpy,
    pooled_column,
    tensor_column,
    variable_column,
    variable_rows,
)

TOKENS, DIM = 5, 8
LOCAL = pafs.LocalFileSystem()


def _spec(**kw: Any) -> TableSpec:
    values: dict[str, Any] = {
        "tensors": (("features", TensorSpec("float16", (TOKENS, DIM))),),
        "pooled_dim": DIM,
        "carried": (("caption", "string"),),
    }
    values.update(kw)
    return TableSpec(**values)


def _identity(spec: TableSpec | None = None, *, fingerprint: str = "fp-1", **options: Any) -> TableIdentity:
    return TableIdentity(
        job="job-1",
        created="2026-12-07T00:00:00+00:00",
        fingerprint=fingerprint,
        spec=spec or _spec(),
        options={"encoder.pooled": True, "encoder.output_dtype": "float16", **options},
        encoder={"output_dtype": "float16", "compute_dtype": "float32"},
        config={"model": {"checkpoint": "/models/tiny"}, "job": {"max_error_fraction": 0.5}},
        host="test-host",
    )


def _rows(n: int, errors: tuple[int, ...] = (), prefix: str = "img") -> InputRows:
    rows = InputRows()
    for i in range(n):
        image_id = f"{prefix}-{i:03d}"
        if i in errors:
            rows.add_error(
                image_id, f"/in/{image_id}.jpg", code="corrupt", message=f"{image_id}: broken", carried={}
            )
        else:
            rows.add_ok(
                image_id, f"/in/{image_id}.jpg", width=10 + i, height=5 + i, carried={"caption": f"c{i}"}
            )
    return rows


def _features(n: int, seed: int = 0, dtype: str = "float16") -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, TOKENS, DIM)).astype(dtype)


def _units(n: int, rows: int = 3) -> list[PlannedUnit]:
    return [PlannedUnit(i, f"{i:02x}" * 16, rows) for i in range(n)]


def _write_unit(run: Any, unit: PlannedUnit, *, errors: tuple[int, ...] = (1,), piece: int = 0) -> DataFile:
    rows = _rows(unit.rows or 0, errors, prefix=f"u{unit.index}")
    feats = _features(rows.num_ok, seed=unit.index)
    table = build_batch(
        rows, run.identity.spec, features={"features": feats}, pooled=feats.astype(np.float32).mean(axis=1)
    )
    return run.target().write(table, unit=unit.index, piece=piece, key=unit.key)


def _add(committer: Any, unit: PlannedUnit, file: DataFile) -> None:
    committer.add(
        unit=unit.index,
        piece=0,
        last=True,
        file=file,
        rows=file.rows,
        ok=file.ok,
        errors={"corrupt": file.rows - file.ok},
    )


def _start(
    out: Path, mode: str = "create", identity: TableIdentity | None = None, plan: str = "plan-1"
) -> Any:
    writer = TableWriter.open(TableLocation(str(out)), identity=identity or _identity(), mode=mode)  # type: ignore[arg-type]
    return writer.start(RunPlan(plan=plan, input="/in", input_kind="images", units=4, rows=12))


def _full_run(
    out: Path, units: list[PlannedUnit], *, only: list[PlannedUnit] | None = None, budget: float = 0.5
) -> Any:
    run = _start(out, "create" if not (out / "_delta_log").exists() else "resume")
    committer = run.committer({u.index: u for u in units}, interval_s=60)  # one batch, at close
    for u in only if only is not None else units:
        _add(committer, u, _write_unit(run, u))
    committer.close()
    return run


# -- tensor columns -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "fmt"), [("float16", "binary"), ("float32", "binary"), ("float32", "list")]
)
def test_tensor_columns_round_trip_with_null_rows(dtype, fmt):
    ok = np.array([True, False, True, True, False])
    data = _features(3, dtype=dtype)
    col = tensor_column(data, ok, tensor_format=fmt)
    assert col.null_count == 2
    back = column_to_numpy(col, TensorSpec(dtype, (TOKENS, DIM)))
    np.testing.assert_array_equal(back[ok], data)
    assert not back[~ok].any()  # null rows read as zeros
    if fmt == "binary":
        assert np.shares_memory(np.frombuffer(col.chunks[0].buffers()[2], np.uint8), data)  # no copy on write


def test_bfloat16_is_stored_as_its_bits_and_read_back_exactly():
    t = torch.randn(4, TOKENS, DIM).to(torch.bfloat16)
    col = tensor_column(t, np.ones(4, bool), tensor_format="binary")
    spec = TensorSpec("bfloat16", (TOKENS, DIM))
    bits = column_to_numpy(col, spec)
    assert bits.dtype == np.uint16 and np.array_equal(bits, t.view(torch.int16).numpy().view(np.uint16))
    as_float = column_to_numpy(col, spec, bfloat16_as="float32")
    np.testing.assert_array_equal(as_float, t.float().numpy())


def test_a_column_of_one_chunk_without_nulls_reads_zero_copy():
    data = _features(4, dtype="float32")
    col = tensor_column(data, np.ones(4, bool), tensor_format="binary")
    view = column_to_numpy(col, TensorSpec("float32", (TOKENS, DIM)))
    assert np.shares_memory(view, data)


def test_columns_over_2_gib_are_split_into_chunks(monkeypatch):
    from pipeline.table import tensors

    monkeypatch.setattr(tensors, "_MAX_CHUNK_BYTES", 3 * TOKENS * DIM * 2)  # three rows a chunk
    ok = np.array([True] * 4 + [False] + [True] * 3)
    data = _features(7)
    col = tensor_column(data, ok, tensor_format="binary")
    assert col.num_chunks == 3
    np.testing.assert_array_equal(column_to_numpy(col, TensorSpec("float16", (TOKENS, DIM)))[ok], data)


@pytest.mark.parametrize("fmt", ["binary", "list"])
def test_variable_shape_rows_round_trip(fmt):
    rows = [np.full((n, TOKENS, DIM), n, np.float32) for n in (2, 5, 1)]
    ragged = RaggedRows.from_rows(rows)
    ok = np.array([True, False, True, True])
    col = variable_column(ragged.data, ragged.offsets, ok, tensor_format=fmt)
    back = variable_rows(col, TensorSpec("float32", (None, TOKENS, DIM)))
    assert back[1] is None
    for got, want in zip([back[0], back[2], back[3]], rows, strict=True):
        np.testing.assert_array_equal(got, want)


def test_the_list_storage_refuses_half_precision_naming_the_options():
    with pytest.raises(ConfigError, match="encoder.output_dtype.*job.tensor_format 'binary'"):
        TableSpec(tensors=(("features", TensorSpec("float16", (TOKENS, DIM))),), tensor_format="list")


def test_pooled_column():
    ok = np.array([False, True, True])
    col = pooled_column(np.ones((2, DIM)), ok)
    assert col.type == pa.list_(pa.float32()) and col.null_count == 1
    assert col.to_pylist()[1] == [1.0] * DIM


# -- data files ------------------------------------------------------------------------------------


def test_build_batch_has_the_table_schema_and_checks_its_inputs():
    spec = _spec()
    rows = _rows(5, errors=(1, 2))
    feats = _features(3)
    table = build_batch(rows, spec, features={"features": feats}, pooled=feats.astype(np.float32).mean(1))
    assert table.schema.equals(spec.arrow_schema(), check_metadata=True)
    assert table.column("status").to_pylist() == ["ok", "error", "error", "ok", "ok"]
    assert table.column("error_code").to_pylist() == [None, "corrupt", "corrupt", None, None]
    assert table.column("width").to_pylist() == [10, None, None, 13, 14]  # 0 (unknown) is null
    assert table.column("caption").to_pylist() == ["c0", None, None, "c3", "c4"]
    meta = json.loads(table.schema.field("features").metadata[b"llava_features.tensor"])
    assert meta == {"dtype": "float16", "shape": [TOKENS, DIM]}
    with pytest.raises(ValueError, match=r"rows of shape \[5, 4\]"):
        build_batch(rows, spec, features={"features": _features(3)[..., :4]}, pooled=np.ones((3, DIM)))
    with pytest.raises(ValueError, match="expected \\(3, \\*shape\\)"):
        build_batch(rows, spec, features={"features": _features(2)}, pooled=np.ones((3, DIM)))
    with pytest.raises(ValueError, match="pass pooled"):
        build_batch(rows, spec, features={"features": feats})
    other = _rows(2)
    other.carried = {}
    with pytest.raises(ValueError, match="carried columns"):
        build_batch(other, spec, features={"features": _features(2)}, pooled=np.ones((2, DIM)))


def test_a_data_file_is_complete_or_absent_and_reads_without_the_package(tmp_path, monkeypatch):
    spec = _spec()
    rows = _rows(4, errors=(2,))
    feats = _features(3)
    table = build_batch(rows, spec, features={"features": feats}, pooled=feats.astype(np.float32).mean(1))
    written = write_data_file(table, filesystem=LOCAL, folder=str(tmp_path), name="part-a.parquet")
    assert written.rows == 4 and written.ok == 3 and written.text_bounds["image_id"] == ("img-000", "img-003")
    assert written.int_bounds["width"] == (10, 13) and "features" not in written.null_counts
    assert "error_message" in written.text_bounds  # every covered column has its bounds
    assert written.size == (tmp_path / "part-a.parquet").stat().st_size
    plain = pq.read_table(tmp_path / "part-a.parquet")  # any Parquet reader: plain binary + field metadata
    assert plain.schema.field("features").type == pa.binary()
    assert len(plain.column("features")[0].as_py()) == TOKENS * DIM * 2

    real = pq.ParquetWriter.write_table

    def half(self, t, row_group_size=None):
        real(self, t.slice(0, 1), row_group_size=1)
        raise OSError("disk full")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", half)
    with pytest.raises(OSError, match="disk full"):
        write_data_file(table, filesystem=LOCAL, folder=str(tmp_path), name="part-b.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-a.parquet"]  # no partial file, no temp file


# -- the protocol ----------------------------------------------------------------------------------


def test_claim_commit_finish_read(tmp_path):
    out = tmp_path / "t"
    units = _units(4)
    run = _full_run(out, units)
    outcome = run.finish(units, max_error_fraction=0.5)
    run.close()
    assert (outcome.state, outcome.rows, outcome.ok, outcome.errors) == ("complete", 12, 8, {"corrupt": 4})
    assert (out / SUCCESS_FILE).exists() and not (out / lease_path(run.run)).exists()
    got = read_features(str(out))
    assert got.state == "complete" and got.features.shape == (8, TOKENS, DIM)
    assert got.image_ids[:2] == ["u0-000", "u0-002"]  # input order: unit, piece, row
    np.testing.assert_array_equal(got.features[:2], _features(2, seed=0))
    assert got.identity.fingerprint == "fp-1" and got.identity.model == "/models/tiny"
    everything = read_features(str(out), status=None, column="pooled")
    assert (
        everything.num_rows == 12 and everything.valid.sum() == 8 and everything.features.shape == (12, DIM)
    )
    # the other readers see the same snapshot
    ds = deltalake.DeltaTable(str(out)).to_pyarrow_dataset()
    counts = dict(duckdb.sql("select status, count(*) from ds group by all").fetchall())
    assert counts == {"ok": 8, "error": 4} and ds.count_rows() == 12
    # filters use the files' statistics: every column they cover must keep its rows
    assert duckdb.sql("select count(*) from ds where status = 'ok' and width > 0").fetchall() == [(8,)]
    assert duckdb.sql("select count(*) from ds where error_code = 'corrupt'").fetchall() == [(4,)]
    import polars as pl

    assert pl.scan_delta(str(out)).select(pl.len()).collect().item() == 12
    # versions: claim, one batch of units, the finish record
    assert got.version == 2 and read_features(str(out), version=1).num_rows == 8


def test_readers_see_committed_units_only_and_warn_once(tmp_path):
    out = tmp_path / "t"
    units = _units(4)
    run = _full_run(out, units, only=units[:2])
    _write_unit(run, units[2])  # written, never committed: in flight
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = read_features(str(out), status=None)
    assert got.num_rows == 6 and got.state == "in_progress"
    assert [w.category for w in caught] == [IncompleteTableWarning]
    assert "in_progress" in str(caught[0].message)
    with pytest.raises(InputReadError, match="not complete"):
        read_features(str(out), complete_only=True)
    assert deltalake.DeltaTable(str(out)).to_pyarrow_dataset().count_rows() == 6
    report = inspect_table(str(out))
    assert report.state == "in_progress" and len(report.in_flight_files) == 1 and not report.orphan_files
    run.close()  # the run stops without finishing: interrupted, its file an orphan
    report = inspect_table(str(out))
    assert report.state == "interrupted" and len(report.orphan_files) == 1
    assert (report.units_planned, report.units_committed) == (4, 2)


def test_the_claim_is_atomic_between_processes(tmp_path):
    out = tmp_path / "t"
    ctx = multiprocessing.get_context("spawn")  # fork after loading delta-rs deadlocks
    with ctx.Pool(3) as pool:
        results = pool.starmap(_claim_in_process, [(str(out), i) for i in range(3)])
    won = [r for r in results if r.startswith("ok")]
    assert len(won) == 1, results
    winner = won[0].split()[1]
    for lost in (r for r in results if not r.startswith("ok")):
        assert f"claimed by job {winner}" in lost or f"feature table of job {winner}" in lost, lost
    assert load_snapshot(TableLocation(str(out))).identity.job == winner


def _claim_in_process(out: str, i: int) -> str:
    from dataclasses import replace

    identity = replace(_identity(), job=f"job-{i}")
    try:
        run = TableWriter.open(TableLocation(out), identity=identity, mode="create").start(RunPlan(plan="p"))
    except OutputError as exc:
        return str(exc)
    run.close()
    return f"ok job-{i}"


def test_two_concurrent_commits_of_one_unit_conflict(tmp_path):
    out = tmp_path / "t"
    units = _units(2)
    run = _start(out)
    a, b = load_snapshot(run.location), load_snapshot(run.location)  # both at the same version
    first = _write_unit(run, units[0])
    record = run.record("units", units=1)
    commit_files(a, files=[first], keys=[units[0].key], record=record)
    with pytest.raises(commit_conflict_types(), match="Concurrent transaction failed"):
        commit_files(b, files=[first], keys=[units[0].key], record=record)
    run.close()


def test_two_resumes_commit_every_unit_exactly_once(tmp_path):
    out = tmp_path / "t"
    units = _units(6)
    first = _full_run(out, units, only=units[:1])
    first.close()
    # Two resumes started together: each looks before the other holds a lease, so both proceed.
    writers = [
        TableWriter.open(TableLocation(str(out)), identity=_identity(), mode="resume") for _ in range(2)
    ]
    one, two = (w.start(RunPlan(plan="plan-1")) for w in writers)
    assert [len(r.pending(units)) for r in (one, two)] == [5, 5]
    c1 = one.committer({u.index: u for u in units}, interval_s=30)
    c2 = two.committer({u.index: u for u in units}, interval_s=30)
    for u in units[1:]:
        _add(c1, u, _write_unit(one, u))
        _add(c2, u, _write_unit(two, u))
    c1.close()  # one commits first; the other then drops what is committed and removes its files
    c2.close()
    assert len(one.committed) + len(two.committed) == 5 and two.lost == {1, 2, 3, 4, 5} - set(two.committed)
    outcome = two.finish(units, max_error_fraction=0.5)
    one.close(), two.close()
    got = read_features(str(out), status=None, column=None)
    assert sorted(got.image_ids) == sorted(f"u{u.index}-{i:03d}" for u in units for i in range(3))
    assert outcome.rows == 18 and len(list(out.glob("part-*.parquet"))) == 6  # the losers' files are gone


def test_resume_continues_the_same_plan_only(tmp_path):
    out = tmp_path / "t"
    units = _units(3)
    _full_run(out, units, only=units[:1]).close()
    with pytest.raises(OutputError, match="different input plan") as info:
        _start(out, "resume", plan="plan-2")
    assert info.value.code == ErrorCode.FINGERPRINT_MISMATCH
    with pytest.raises(OutputError, match="interrupted: --resume continues it") as info:
        _start(out, "create")
    assert info.value.code == ErrorCode.OUTPUT_EXISTS


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"options": {"encoder.pooled": False}}, "encoder.pooled: true → false"),
        ({"options": {"job.tensor_format": "list"}}, "job.tensor_format"),
        ({"spec": _spec(pooled_dim=None)}, "the columns differ"),
        ({"fingerprint": "fp-2"}, "encoder fingerprint"),
    ],
)
def test_resume_refuses_what_changes_the_schema_or_the_values(tmp_path, change, named):
    from dataclasses import replace

    out = tmp_path / "t"
    _full_run(out, _units(2), only=_units(2)[:1]).close()
    base = _identity()
    other = replace(base, **{**change, "options": {**base.options, **change.get("options", {})}})
    with pytest.raises(OutputError, match=named) as info:
        TableWriter.open(TableLocation(str(out)), identity=other, mode="resume")
    assert info.value.code in (ErrorCode.SCHEMA_MISMATCH, ErrorCode.FINGERPRINT_MISMATCH)
    assert len(list(out.glob("part-*"))) == 1  # nothing written


def test_a_live_run_is_named_and_a_dead_runs_files_are_removed(tmp_path):
    out = tmp_path / "t"
    units = _units(3)
    run = _full_run(out, units, only=units[:1])
    stray = _write_unit(run, units[1])  # the run's file in flight
    with pytest.raises(OutputError, match=f"being written now.*run {run.run} on ") as info:
        _start(out, "resume")
    assert info.value.code == ErrorCode.OUTPUT_IN_USE
    # Another host's run whose lease went stale: its files are an interrupted run's orphans.
    run.lease._stop.set()
    run.lease._thread.join()
    dead = Lease(run=run.run, job="job-1", host="elsewhere", pid=1, started=0, heartbeat=time.time() - 3600)
    from pipeline.storage import write_json

    write_json(LOCAL, str(out / lease_path(run.run)), dead.__dict__)
    resumed = _start(out, "resume")
    removed = resumed.remove_orphans()
    assert [Path(p).name for p in removed] == [stray.path]
    resumed.close()


def test_a_run_that_lost_its_lease_commits_nothing(tmp_path, monkeypatch):
    out = tmp_path / "t"
    units = _units(2)
    run = _start(out)
    monkeypatch.setattr(lease_module, "LEASE_TIMEOUT_S", 0.0)
    committer = run.committer({u.index: u for u in units}, interval_s=0.01)
    _add(committer, units[0], _write_unit(run, units[0]))
    with pytest.raises(OutputError, match="could not renew its lease"):
        committer.close()
    assert load_snapshot(run.location).files == []
    run.close()


def test_finish_checks_every_unit_and_records_the_budget(tmp_path):
    out = tmp_path / "t"
    units = _units(3)
    run = _full_run(out, units, only=units[:2])
    with pytest.raises(OutputError, match="1 unit\\(s\\) of the plan are not in the table"):
        run.finish(units, max_error_fraction=0.5)
    run.close()
    run = _full_run(out, units, only=units[2:])
    failed = run.finish(units, max_error_fraction=0.2)  # 3 of 9 failed
    run.close()
    assert failed.state == "failed" and failed.budget_exceeded and not (out / SUCCESS_FILE).exists()
    assert inspect_table(str(out)).state == "failed"
    again = _start(out, "resume")  # a higher budget accepts it without encoding anything
    accepted = again.finish(units, max_error_fraction=0.5)
    again.close()
    assert accepted.state == "complete" and (out / SUCCESS_FILE).exists()
    assert accepted.errors == {"corrupt": 3}  # counted from the other runs' commit records
    stricter = _start(out, "resume")
    kept = stricter.finish(units, max_error_fraction=0.0)
    stricter.close()
    assert kept.up_to_date and kept.state == "complete" and kept.budget_exceeded  # never downgraded


def test_append_adds_a_segment(tmp_path):
    out = tmp_path / "t"
    units = _units(2)
    run = _full_run(out, units)
    run.finish(units, max_error_fraction=0.5)
    run.close()
    writer = TableWriter.open(TableLocation(str(out)), identity=_identity(), mode="append")
    held = writer.existing_ids()
    assert len(held) == 6 and "u1-002" in held and "u9-000" not in held
    more = [PlannedUnit(2, "ee" * 16, 3)]
    run = writer.start(RunPlan(plan="plan-b", input="/in2", units=1, rows=3, source_plan="src"))
    assert run.segment.number == 2
    committer = run.committer({u.index: u for u in more}, interval_s=0.01)
    _add(committer, more[0], _write_unit(run, more[0]))
    committer.close()
    outcome = run.finish(more, max_error_fraction=0.5)
    run.close()
    assert outcome.rows == 3 and read_features(str(out), status=None, column=None).num_rows == 9
    names = sorted(DataFileName.parse(p.name).segment for p in out.glob("part-*"))
    assert names == [1, 1, 2]
    report = inspect_table(str(out))
    assert [(s.number, s.append, s.state) for s in report.segments] == [
        (1, False, "complete"),
        (2, True, "complete"),
    ]


def test_outputs_that_are_not_a_table_are_refused(tmp_path):
    legacy = tmp_path / "legacy"
    (legacy / "_commits").mkdir(parents=True)
    (legacy / "_job.json").write_text("{}")
    for read in (read_features, inspect_table):
        with pytest.raises(InputReadError, match="earlier version of llava-features"):
            read(str(legacy))
    with pytest.raises(OutputError, match="earlier version") as info:
        _start(legacy)
    assert info.value.code == ErrorCode.UNSUPPORTED_OUTPUT
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("user data")
    with pytest.raises(OutputError, match="not empty"):
        _start(other)
    assert (other / "keep.txt").read_text() == "user data"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        _start(a_file)
    with pytest.raises(InputReadError, match="No feature table"):
        read_features(str(tmp_path / "nothing"))


def test_commit_records_survive_in_the_log(tmp_path):
    out = tmp_path / "t"
    units = _units(2)
    run = _full_run(out, units)
    run.finish(units, max_error_fraction=0.5)
    run.close()
    records = load_snapshot(TableLocation(str(out))).records()
    assert [r.op for r in records] == ["finish", "units", "claim"]
    assert records[1].units == 2 and records[1].errors == {"corrupt": 2}
    assert records[0].totals["budget_exceeded"] is False and records[2].segment.plan == "plan-1"
    assert isinstance(records[0], CommitRecord) and records[0].run == run.run


def test_id_set():
    held = IdSet.of(["a", "b", "bad\udcff"])
    assert held.contains(["a", "c", "bad\udcff"]).tolist() == [True, False, True]
    assert len(IdSet()) == 0 and not IdSet().contains(["a"]).any()
    assert os.environ.get("NO_SUCH") is None
