"""``llava-features inspect`` on real feature tables of the job (complete, failed over its error budget,
interrupted, being written; local, on S3 and on GCS), and what a user sees from ``llava-features
encode`` and ``llava-features demo`` run as commands: a quiet successful run, a budget failure that
names the option raising it, a demo that ends by pointing at inspect, ``read_features``,
``ray.data.read_delta`` and DuckDB.

The tables come from the real command line in subprocesses (the job's driver, as a user runs it),
connected to one local Ray of this module (free ports: the tests pass beside another Ray); the resumes
run the same command line in this process, on that Ray. The
interrupted ones are real tables whose newest commits are taken away: what the log holds when the
driver died after committing two of its three units (the third unit's file written, never
committed; a writer's temporary file and the dead run's lease left). Others have a file removed or
rewritten behind the table's back, as a careless hand leaves them. A job run in this process, held
before its commit, shows a running job's files as in flight.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import deltalake
import pyarrow.parquet as pq
import pytest

from llava_features.cli import main as cli_main
from pipeline.model.errors import IncompleteTableWarning, InputReadError
from pipeline.table import SUCCESS_FILE, inspect_table, read_features
from pipeline.table.layout import DELTA_LOG_DIR, DataFileName, lease_path
from tests.corpus import write_real_photos
from tests.fixtures.ray_cluster import local_ray

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
PHOTOS = 5
SHARD_SIZE = 2  # 6 inputs: units of 2, 2, 2

# What must never appear in the output of a successful run.
NOISE = {
    "an ERROR-level log line": re.compile(r"\bERROR\b"),
    "an E-level Ray (C++) log line": re.compile(r"\[\d{4}-\d\d-\d\d [\d:,.]+ E \d+ \d+\]"),
    "Ray's actor-restart warning": re.compile(r"core_worker\.cc|actor restart will fail"),
    "a traceback": re.compile(r"Traceback \(most recent call last\)"),
    "a weight-loading progress bar": re.compile(r"Loading weights"),
    "a torchvision warning": re.compile(r"torchvision"),
}


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A local Ray (4 CPUs, no dashboard) on free ports for the module's command-line runs."""
    import ray

    with local_ray(num_cpus=4, include_dashboard=False, logging_level="WARNING"):
        yield ray.get_runtime_context().gcs_address


def _run(address: str, *argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """``llava-features ARGV`` in a subprocess, the job's driver on the Ray at ``address``."""
    env = {**os.environ, "RAY_ADDRESS": address}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "llava_features", *argv]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=480)


def _encode_args(model: Path, images: Path, out: Path | str, *extra: str) -> list[str]:
    return [
        "encode",
        "--model",
        str(model),
        "--input",
        str(images),
        "--output",
        str(out),
        "--shard-size",
        str(SHARD_SIZE),
        "--pooled",
        *extra,
    ]


def _encode(
    address: str, model: Path, images: Path, out: Path | str, *extra: str, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    return _run(address, *_encode_args(model, images, out, *extra), cwd=cwd)


def _noise(text: str) -> list[str]:
    return [f"{what}: {line!r}" for line in text.splitlines() for what, p in NOISE.items() if p.search(line)]


def _data_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("part-*.parquet"))


def _log_entry(out: Path, version: int) -> Path:
    return out / DELTA_LOG_DIR / f"{version:020d}.json"


def _added_by(out: Path, version: int) -> list[str]:
    """The data files the commit of ``version`` added."""
    actions = [json.loads(line) for line in _log_entry(out, version).read_text().splitlines() if line]
    return [a["add"]["path"] for a in actions if "add" in a]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Five real photos and one truncated JPEG."""
    folder = tmp_path_factory.mktemp("images")
    photos = write_real_photos(folder, n=PHOTOS)
    data = photos[0].read_bytes()
    (folder / "broken.jpg").write_bytes(data[: len(data) // 3])
    return folder


@pytest.fixture(scope="module")
def complete(
    ray_address, images, tiny_llava, tmp_path_factory
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A finished table: 1 of 6 inputs failed, within --max-error-fraction 0.5. Its config commits each
    unit on its own (``job.commit_max_units: 1``), so its log is known: versions 0 (the claim), 1-3 (a
    unit each) and 4 (the finish)."""
    runs = tmp_path_factory.mktemp("runs")
    config = runs / "one-unit-commits.yaml"
    config.write_text(json.dumps({"model": {"checkpoint": str(tiny_llava)}, "job": {"commit_max_units": 1}}))
    out = runs / "complete"
    argv = _encode_args(tiny_llava, images, out, "--max-error-fraction", "0.5")
    argv[1:3] = ["--config", str(config)]  # instead of --model
    proc = _run(ray_address, *argv)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


@pytest.fixture(scope="module")
def failed(
    ray_address, images, tiny_llava, tmp_path_factory
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A table over the default error budget (1 of 6 failed > 1 %): every row, no _SUCCESS. Given as a
    relative path: the files land there, not in the encoder actors' working directory."""
    out = tmp_path_factory.mktemp("runs") / "failed"
    proc = _encode(ray_address, tiny_llava, images, "failed", cwd=out.parent)
    assert proc.returncode == 3, proc.stderr[-4000:]
    return out, proc


def _inspect_json(target: str, *extra: str, capsys) -> tuple[int, dict]:
    rc = cli_main(["inspect", "--json", target, *extra])
    return rc, json.loads(capsys.readouterr().out)


def _interrupted_copy(complete: Path, dest: Path) -> str:
    """``complete`` as its driver would have left it dying after committing two of its three units: the
    last unit's file written but never committed, a writer's temporary file, the dead run's lease, no
    finish record and no _SUCCESS. Returns the uncommitted file's name."""
    shutil.copytree(complete, dest)
    (lost,) = _added_by(dest, 3)
    for version in (3, 4):
        _log_entry(dest, version).unlink()
    (dest / SUCCESS_FILE).unlink()
    data = (dest / lost).read_bytes()
    (dest / f".{lost}.0123456789abcdef.tmp").write_bytes(data[: len(data) // 2])
    run = DataFileName.parse(lost).run
    lease = {
        "run": run,
        "job": "job",
        "host": socket.gethostname(),
        "pid": _gone_pid(),  # a process that no longer runs
        "started": time.time() - 60,
        "heartbeat": time.time() - 1,  # fresh, but its process is gone
    }
    (dest / lease_path(run)).parent.mkdir(parents=True, exist_ok=True)
    (dest / lease_path(run)).write_text(json.dumps(lease))
    return lost


def _gone_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- what the commands print --------------------------------------------------------------------


def test_a_successful_encode_prints_progress_and_summary_and_nothing_like_an_error(complete):
    out, proc = complete
    assert _noise(proc.stdout + proc.stderr) == []
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if re.search(r"\bWARNING\b", line)]
    assert warnings == []  # neither ours nor Ray's notices (token auth, progress bars, queue lengths)
    progress = [line for line in proc.stderr.splitlines() if line.startswith("progress: ")]
    assert progress and progress[-1].startswith("progress: 6/6 images (100.0%) · ")
    assert " · done · errors 1 (truncated 1) · units 3/3 committed · 3 files, " in progress[-1]
    assert "images read:   6 this run (6 in the plan)" in proc.stdout
    assert "ok:            5" in proc.stdout and "errors:        1 (truncated: 1)" in proc.stdout
    assert "units:         3 written, 0 skipped, 3 in total" in proc.stdout
    assert "files:         3 written, 3 in the table for this plan" in proc.stdout
    assert f"output:        {out} (Delta table version 4, complete)" in proc.stdout
    assert re.search(r"Dataset \S+ execution finished", proc.stderr), proc.stderr[
        -2000:
    ]  # Ray Data's progress


def test_over_the_error_budget_says_which_option_raises_it(
    failed, ray_address, tiny_llava, images, tmp_path, capsys
):
    out, proc = failed
    assert "[error_budget_exceeded]" in proc.stderr and "16.67% of the inputs failed" in proc.stderr
    assert "--max-error-fraction" in proc.stderr and f"llava-features inspect {out}" in proc.stderr
    assert re.search(r"\(Delta table version \d+, failed\)", proc.stdout), proc.stdout
    assert not (out / SUCCESS_FILE).exists()
    assert deltalake.DeltaTable(str(out)).to_pyarrow_dataset().count_rows() == PHOTOS + 1
    # The advice works: a raised budget and --resume finish the table without encoding again.
    copy = tmp_path / "accepted"
    shutil.copytree(out, copy)
    before = _data_files(copy)
    rc = cli_main(_encode_args(tiny_llava, images, copy, "--max-error-fraction", "0.5", "--resume"))
    again = capsys.readouterr()
    assert rc == 0, again.err[-3000:]
    assert "images read:   0 this run (6 in the plan)" in again.out
    assert "units:         0 written, 3 already committed, 3 in total" in again.out
    assert re.search(r"\(Delta table version \d+, complete\)", again.out), again.out
    assert (copy / SUCCESS_FILE).exists() and _data_files(copy) == before  # nothing encoded again
    report = inspect_table(copy)
    assert (report.state, report.rows, report.max_error_fraction) == ("complete", 6, 0.5)


def test_demo_ends_by_pointing_at_inspect_and_the_readers(ray_address, tmp_path):
    proc = _run(
        ray_address, "demo", "--output", "out", cwd=tmp_path
    )  # writes .demo/ under its working directory
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _noise(proc.stdout + proc.stderr) == []
    tail = proc.stdout.split("== next ==", 1)[1]
    assert "inspect out" in tail and "read_features('out')" in tail
    assert "ray.data.read_delta('out')" in tail and "deltalake.DeltaTable('out').to_pyarrow_dataset()" in tail
    assert "duckdb.sql(" in tail
    report = inspect_table(tmp_path / "out")
    assert report.state == "complete" and report.rows > 0 and report.problems == []


# -- inspect ------------------------------------------------------------------------------------


def test_inspect_a_complete_table(complete, images, tiny_llava, capsys):
    out, _ = complete
    rc, report = _inspect_json(str(out), capsys=capsys)
    assert rc == 0 and report["state"] == "complete" and report["problems"] == []
    assert report["success"] and report["finished"] and report["output"] == str(out)
    assert (report["rows"], report["ok"], report["errors"]) == (6, 5, 1)
    assert report["max_error_fraction"] == 0.5 and report["error_fraction"] == pytest.approx(1 / 6)
    (group,) = report["error_codes"]
    assert group["code"] == "truncated" and group["count"] == 1
    assert (
        group["examples"][0]["uri"].endswith("broken.jpg") and "truncated" in group["examples"][0]["message"]
    )
    columns = {c["name"]: c for c in report["columns"]}
    assert set(columns) == {"features", "pooled"}
    assert (columns["features"]["dtype"], columns["features"]["shape"]) == ("float16", [16, 64])
    assert columns["features"]["bytes_per_row"] == 16 * 64 * 2 and columns["features"]["encoding"] == "binary"
    assert (columns["pooled"]["dtype"], columns["pooled"]["shape"]) == ("float32", [64])
    # Against the log and the files themselves.
    table = deltalake.DeltaTable(str(out))
    files = _data_files(out)
    assert (
        sorted(Path(u).name for u in table.file_uris()) == files and report["version"] == table.version() == 4
    )
    names = [DataFileName.parse(f) for f in files]
    assert [(n.segment, n.unit, n.piece) for n in names] == [(1, u, 0) for u in range(3)]
    assert len({n.run for n in names}) == 1
    assert (report["units_planned"], report["units_committed"], report["data_files"]) == (3, 3, 3)
    assert report["data_bytes"] == sum((out / f).stat().st_size for f in files)
    for key in ("in_flight_files", "orphan_files", "missing_files", "changed_files", "other_files"):
        assert report[key] == [], key
    (segment,) = report["segments"]
    assert (segment["number"], segment["input"], segment["input_kind"], segment["append"]) == (
        1,
        str(images),
        "images",
        False,
    )
    assert (segment["units_planned"], segment["units_committed"], segment["rows"], segment["state"]) == (
        3,
        3,
        6,
        "complete",
    )
    (run,) = report["runs"]
    assert (run["run"], run["commits"], run["units"], run["rows"], run["live"]) == (
        names[0].run,
        5,
        3,
        6,
        False,
    )
    assert run["host"] == socket.gethostname() and run["pid"] > 0
    features = read_features(out)
    assert report["fingerprint"] == features.identity.fingerprint and len(report["fingerprint"]) == 64
    assert report["job"] == features.identity.job and report["model"] == str(tiny_llava)
    assert report["options"] == {
        "encoder.features": "projected",
        "encoder.pooled": True,
        "encoder.output_dtype": "float16",
        "encoder.anyres_output": None,
        "job.tensor_format": "binary",
        "input.keep_columns": [],
    }
    model = report["encoder"]["model"]
    assert (model["select_layer"], model["projector_type"], report["encoder"]["output_dtype"]) == (
        -2,
        "mlp2x_gelu",
        "float16",
    )
    assert report["config"]["job"]["max_error_fraction"] == 0.5 and report["config"]["job"]["shard_size"] == 2
    # The human form.
    assert cli_main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"table:        {out} (Delta Lake, version 4)" in text and "state:        complete (" in text
    assert "rows:         6: 5 ok, 1 errors (16.67%; budget 50.00%)" in text
    assert "truncated: 1" in text and "broken.jpg" in text
    assert (
        "features: 16 × 64 float16 per row (2.0 kB, binary)" in text and "pooled: 64 float32 per row" in text
    )
    assert "units:        3 of 3 planned in the table" in text
    assert f"segment 1:    job of {images} (images): 3 of 3 units, 6 rows, complete" in text
    assert f"run {names[0].run}: {socket.gethostname()}" in text and "5 commit(s), 3 units, 6 rows" in text
    assert f"fingerprint:  {report['fingerprint']}" in text
    assert f"model:        {tiny_llava} (llava): layer -2" in text
    assert "read_features(" in text and "deltalake.DeltaTable(" in text


def test_inspect_a_failed_table(failed, capsys):
    out, _ = failed
    rc, report = _inspect_json(str(out), capsys=capsys)
    assert rc == 1 and report["state"] == "failed" and not report["success"]
    assert (report["rows"], report["ok"], report["units_planned"], report["units_committed"]) == (6, 5, 3, 3)
    assert report["max_error_fraction"] == 0.01 and report["segments"][0]["state"] == "failed"
    assert report["orphan_files"] == [] and report["missing_files"] == []
    assert any("max_error_fraction 1.00%" in p and "--max-error-fraction" in p for p in report["problems"])


def test_inspect_an_interrupted_table_and_resume_it(
    complete, ray_address, images, tiny_llava, tmp_path, capsys
):
    out, _ = complete
    broken = tmp_path / "interrupted"
    lost = _interrupted_copy(out, broken)
    temp = f".{lost}.0123456789abcdef.tmp"
    rc, report = _inspect_json(str(broken), capsys=capsys)
    assert rc == 1 and report["state"] == "interrupted" and report["version"] == 2
    assert (report["units_planned"], report["units_committed"], report["rows"], report["data_files"]) == (
        3,
        2,
        4,
        2,
    )
    assert sorted(report["orphan_files"]) == sorted([lost, temp]) and report["in_flight_files"] == []
    assert report["segments"][0]["state"] == "unfinished" and not report["success"]
    assert [r["live"] for r in report["runs"]] == [False]
    problems = " | ".join(report["problems"])
    assert "2 of 3 planned units are in the table (1 missing); --resume continues it" in problems
    assert "2 file(s) no commit references, left by runs that stopped" in problems
    assert cli_main(["inspect", str(broken)]) == 1
    assert "state:        interrupted" in capsys.readouterr().out
    # The readers see the committed units only.
    with pytest.warns(IncompleteTableWarning, match="interrupted"):
        got = read_features(broken, status=None, column=None)
    assert got.num_rows == 4 and lost not in [Path(f).name for f in got.files]
    assert deltalake.DeltaTable(str(broken)).to_pyarrow_dataset().count_rows() == 4
    with pytest.raises(InputReadError, match="not complete"):
        read_features(broken, complete_only=True)
    # The dry run says what --resume would do, and writes nothing.
    argv = _encode_args(tiny_llava, images, broken, "--max-error-fraction", "0.5", "--resume")
    assert cli_main([*argv, "--dry-run"]) == 0
    assert (
        "a table (version 2); 2 of 3 unit(s) of this plan in it: --resume continues it"
        in capsys.readouterr().out
    )
    assert sorted(p.name for p in broken.iterdir() if p.is_file()) == sorted([*_data_files(out), temp])
    # --resume encodes the missing unit only, removes the dead run's files: every row exactly once.
    kept = [f for f in _data_files(broken) if f != lost]  # the committed units' files
    rc = cli_main(argv)
    resumed = capsys.readouterr()
    assert rc == 0, resumed.err[-3000:]
    assert "units:         1 written, 2 already committed, 3 in total" in resumed.out
    report = inspect_table(broken)
    assert (report.state, report.rows, report.ok, report.units_committed) == ("complete", 6, 5, 3)
    assert report.orphan_files == [] and not (broken / temp).exists() and not (broken / lost).exists()
    (new,) = set(_data_files(broken)) - set(kept)  # the lost unit, written again by the new run
    assert DataFileName.parse(new).unit == DataFileName.parse(lost).unit and len(_data_files(broken)) == 3
    assert DataFileName.parse(new).run != DataFileName.parse(lost).run
    ids = read_features(broken, status=None, column=None).image_ids
    assert sorted(ids) == sorted(p.name for p in images.iterdir())


def test_inspect_files_left_removed_or_rewritten_behind_the_tables_back(complete, tmp_path, capsys):
    out, _ = complete
    first, _, last = _data_files(out)
    # A writer's temporary file left in a complete table: not part of it, an orphan; still complete.
    leftover = tmp_path / "leftover"
    shutil.copytree(out, leftover)
    temp = f".{last}.fedcba9876543210.tmp"
    (leftover / temp).write_bytes(b"PAR1")
    rc, report = _inspect_json(str(leftover), capsys=capsys)
    assert rc == 0 and report["state"] == "complete" and report["orphan_files"] == [temp]
    assert report["rows"] == 6 and read_features(leftover, status=None).num_rows == 6  # never read as data

    # A committed file rewritten with fewer rows: named, and reads refuse it rather than return less.
    short = tmp_path / "short"
    shutil.copytree(out, short)
    pq.write_table(pq.read_table(short / first).slice(0, 1), short / first)
    rc, report = _inspect_json(str(short), capsys=capsys)
    assert rc == 1 and report["changed_files"] == [first] and report["missing_files"] == []
    assert any("rewritten behind its back" in p for p in report["problems"])
    with pytest.raises(InputReadError, match=f"{first} holds 1 rows, the table's log says 2"):
        read_features(short, status=None)

    # A committed file removed: the log names a file that is not there; reads fail, naming it.
    removed = tmp_path / "removed"
    shutil.copytree(out, removed)
    (removed / last).unlink()
    rc, report = _inspect_json(str(removed), capsys=capsys)
    assert rc == 1 and report["state"] == "complete" and report["missing_files"] == [last]
    assert report["rows"] == 6  # what the log holds
    assert any("removed behind its back" in p for p in report["problems"])
    with pytest.raises(InputReadError, match=last):
        read_features(removed)


def test_inspect_a_running_jobs_files_as_in_flight(
    ray_address, images, tiny_llava, tmp_path, monkeypatch, capsys
):
    """A job in this process, its committer held before its (only) commit: every file it wrote is in
    flight, not an orphan; the table is in progress and refused to a second job; once it commits, complete."""
    from pipeline.config import load_config
    from pipeline.offline import run_job
    from pipeline.table import run as table_run

    out = tmp_path / "running"
    closing, release = threading.Event(), threading.Event()
    real_close = table_run.Committer.close

    def held_close(self):
        closing.set()  # the pipeline is done: every file is written, none committed
        assert release.wait(timeout=240), "the test never released the committer"
        real_close(self)

    monkeypatch.setattr(table_run.Committer, "close", held_close)
    config = load_config(
        None,
        {
            "model": {"checkpoint": str(tiny_llava)},
            "encoder": {"pooled": True},
            "job": {"shard_size": SHARD_SIZE, "max_error_fraction": 0.5, "commit_interval_s": 3600},
        },
    )
    result: dict = {}

    def job():
        try:
            result["summary"] = run_job(config, str(images), str(out))
        except BaseException as exc:  # reported below
            result["error"] = exc
        finally:
            closing.set()

    thread = threading.Thread(target=job)
    thread.start()
    try:
        assert closing.wait(timeout=300) and "error" not in result, result
        files = _data_files(out)
        assert len(files) == 3
        report = inspect_table(out)
        assert (report.state, report.rows, report.units_planned, report.units_committed) == (
            "in_progress",
            0,
            3,
            0,
        )
        assert sorted(report.in_flight_files) == files and report.orphan_files == []
        (run,) = report.runs
        assert run.live and run.pid == os.getpid() and run.commits == 1  # the claim
        assert any(
            "a job is writing the table now" in p and "3 file(s) in flight" in p for p in report.problems
        )
        assert cli_main(["inspect", str(out)]) == 1
        text = capsys.readouterr().out
        assert "state:        in_progress" in text and "(not in the table: 3 in flight)" in text
        with pytest.warns(IncompleteTableWarning, match="in_progress"):
            assert read_features(out, status=None).num_rows == 0
        # A second job is refused before it writes anything, naming the running one.
        argv = _encode_args(tiny_llava, images, out, "--max-error-fraction", "0.5")
        for extra in ((), ("--resume",)):
            assert cli_main([*argv, *extra]) == 2
            err = capsys.readouterr().err
            assert "being written now" in err and f"run {run.run} on {socket.gethostname()}" in err, err
        assert _data_files(out) == files
    finally:
        release.set()
        thread.join(timeout=300)
    assert "error" not in result, result
    summary = result["summary"]
    assert (summary.state, summary.inputs, summary.units_written, summary.files_written) == (
        "complete",
        6,
        3,
        3,
    )
    report = inspect_table(out)
    assert (report.state, report.rows, report.units_committed) == ("complete", 6, 3)
    assert report.in_flight_files == [] and report.orphan_files == [] and _data_files(out) == files
    assert [r.live for r in report.runs] == [False]


def test_inspect_on_s3(complete, s3_server, capsys):
    out, _ = complete
    bucket = s3_server.create_bucket()
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        s3_server.put_object(bucket, f"runs/one/{path.relative_to(out).as_posix()}", path.read_bytes())
    uri = f"s3://{bucket}/runs/one"
    rc, report = _inspect_json(uri, "--s3-endpoint", s3_server.endpoint_url, capsys=capsys)
    local = json.loads(json.dumps(inspect_table(out).to_dict()))
    assert rc == 0 and report["state"] == "complete" and report["output"] == uri and report["problems"] == []
    for key in (
        "version",
        "rows",
        "ok",
        "errors",
        "error_codes",
        "data_files",
        "data_bytes",
        "units_committed",
        "fingerprint",
        "columns",
        "options",
        "success",
    ):
        assert report[key] == local[key], key
    # The driver died after two units: the last unit's commit and the finish never reached the log.
    lost = _added_by(out, 3)[0]
    for version in (3, 4):
        s3_server.client.delete_object(Bucket=bucket, Key=f"runs/one/{DELTA_LOG_DIR}/{version:020d}.json")
    s3_server.client.delete_object(Bucket=bucket, Key=f"runs/one/{SUCCESS_FILE}")
    report = inspect_table(uri, s3_endpoint=s3_server.endpoint_url)
    assert (report.state, report.version, report.units_committed, report.rows) == ("interrupted", 2, 2, 4)
    assert report.orphan_files == [lost]
    with pytest.warns(IncompleteTableWarning, match="interrupted"):
        got = read_features(uri, s3_endpoint=s3_server.endpoint_url, status=None)
    assert got.num_rows == 4 and got.version == 2


def test_inspect_what_is_not_a_feature_table(complete, tmp_path, capsys):
    assert cli_main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "No feature table at" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(["inspect", str(tmp_path / "empty")]) == 2
    assert "No feature table at" in capsys.readouterr().err
    out, _ = complete
    copied = tmp_path / "copied"  # the data files without the log: nothing says they are committed
    copied.mkdir()
    for name in _data_files(out):
        shutil.copy(out / name, copied / name)
    assert cli_main(["inspect", str(copied)]) == 2
    assert "No feature table at" in capsys.readouterr().err
    with pytest.raises(InputReadError, match="No feature table"):
        read_features(copied)
    one = read_features(copied / _data_files(out)[0], status=None)  # one data file is read as it is
    assert one.num_rows == 2 and one.features.shape == (2, 16, 64) and one.identity is None
    other = tmp_path / "other-delta"  # a Delta table another tool wrote
    deltalake.write_deltalake(str(other), read_features(out, status=None, column=None).table)
    assert cli_main(["inspect", str(other)]) == 2
    assert "did not write" in capsys.readouterr().err


def test_inspect_on_gcs(complete, gcs_server, gcs_env, capsys):
    out, _ = complete
    bucket = gcs_server.create_bucket()
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        gcs_server.put_object(bucket, f"runs/one/{path.relative_to(out).as_posix()}", path.read_bytes())
    rc, report = _inspect_json(f"gs://{bucket}/runs/one", capsys=capsys)
    assert rc == 0 and report["state"] == "complete"
    assert (report["rows"], report["ok"], report["units_committed"], report["version"]) == (6, 5, 3, 4)
    assert report["data_bytes"] == sum(p.stat().st_size for p in out.glob("part-*.parquet"))
