"""``llava-features inspect`` on real outputs of the job (complete, failed over its error budget,
incomplete; local, on S3 and on GCS), and what a user sees from ``llava-features encode`` and
``llava-features demo`` run as commands: a quiet successful run, a budget failure that names the
option raising it, a demo that ends by pointing at inspect, ``read_features`` and DuckDB.

The outputs come from the real command line in subprocesses (the job's driver, as a user runs it),
connected to one local Ray of this module (free ports: the tests pass beside another Ray); the
incomplete ones are real outputs with a unit's file and commit record removed, a writer's
temporary file left, a file without its commit record, or a short file, as an interrupted job (or
a careless hand) leaves them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llava_features.cli import main as cli_main
from pipeline.constants import COMMITS_DIR, JOB_FILE, SUCCESS_FILE, commit_file_name, shard_file_name
from pipeline.inspect import inspect_output, read_commit_state
from pipeline.reader import read_features
from tests.corpus import write_real_photos
from tests.fixtures.ray_cluster import local_ray

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
PHOTOS = 5
SHARD_SIZE = 2  # 6 inputs: shards of 2, 2, 2

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


def _encode(
    address: str, model: Path, images: Path, out: Path | str, *extra: str, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    return _run(
        address,
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
        cwd=cwd,
    )


def _noise(text: str) -> list[str]:
    return [f"{what}: {line!r}" for line in text.splitlines() for what, p in NOISE.items() if p.search(line)]


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
    """A finished output: 1 of 6 inputs failed, within --max-error-fraction 0.5."""
    out = tmp_path_factory.mktemp("runs") / "complete"
    proc = _encode(ray_address, tiny_llava, images, out, "--max-error-fraction", "0.5")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


@pytest.fixture(scope="module")
def failed(
    ray_address, images, tiny_llava, tmp_path_factory
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """An output over the default error budget (1 of 6 failed > 1 %): every row, no _SUCCESS.
    Given as a relative path: the shards land there, not in the encoder actors' working directory."""
    out = tmp_path_factory.mktemp("runs") / "failed"
    proc = _encode(ray_address, tiny_llava, images, "failed", cwd=out.parent)
    assert proc.returncode == 3, proc.stderr[-4000:]
    return out, proc


def _inspect_json(target: str, *extra: str, capsys) -> tuple[int, dict]:
    rc = cli_main(["inspect", "--json", target, *extra])
    return rc, json.loads(capsys.readouterr().out)


# -- what the commands print --------------------------------------------------------------------


def test_a_successful_encode_prints_progress_and_summary_and_nothing_like_an_error(complete):
    _, proc = complete
    assert _noise(proc.stdout + proc.stderr) == []
    assert "images read:   6 this run (6 in the job)" in proc.stdout
    assert "ok:            5" in proc.stdout and "errors:        1 (truncated: 1)" in proc.stdout
    assert re.search(r"Dataset \S+ execution finished", proc.stderr), proc.stderr[
        -2000:
    ]  # Ray Data's progress


def test_over_the_error_budget_says_which_option_raises_it(failed, ray_address, tiny_llava, images, tmp_path):
    out, proc = failed
    assert "[error_budget_exceeded]" in proc.stderr and "16.67% of the inputs failed" in proc.stderr
    assert "--max-error-fraction" in proc.stderr and f"llava-features inspect {out}" in proc.stderr
    assert not (out / SUCCESS_FILE).exists() and pq.read_table(out).num_rows == PHOTOS + 1
    # The advice works: a raised budget and --resume finish the output without encoding again.
    copy = tmp_path / "accepted"
    shutil.copytree(out, copy)
    again = _encode(ray_address, tiny_llava, images, copy, "--max-error-fraction", "0.5", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "units:         0 written, 3 already committed, 3 in total" in again.stdout
    assert f"nothing was encoded again, {SUCCESS_FILE} written" in again.stdout
    assert (copy / SUCCESS_FILE).exists()


def test_demo_ends_by_pointing_at_inspect_read_features_and_duckdb(ray_address, tmp_path):
    proc = _run(
        ray_address, "demo", "--output", "out", cwd=tmp_path
    )  # writes .demo/ under its working directory
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _noise(proc.stdout + proc.stderr) == []
    tail = proc.stdout.split("== next ==", 1)[1]
    assert "inspect out" in tail and "read_features('out')" in tail and "duckdb" in tail
    assert inspect_output(tmp_path / "out").state == "complete"


# -- inspect ------------------------------------------------------------------------------------


def test_inspect_a_complete_output(complete, capsys):
    out, _ = complete
    rc, report = _inspect_json(str(out), capsys=capsys)
    assert rc == 0 and report["state"] == "complete" and report["problems"] == []
    assert report["success"] and report["finished"]
    assert (report["inputs"], report["rows"], report["ok"], report["errors"]) == (6, 6, 5, 1)
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
    # Against the files themselves.
    shards = sorted(out.glob("part-*.parquet"))
    assert (report["units_planned"], report["units_committed"], report["data_files"]) == (3, 3, 3)
    assert report["missing_units"] == [] and report["temporary_files"] == [] and report["short_units"] == []
    assert [p.name for p in shards] == [shard_file_name(u, 0) for u in range(3)]
    assert report["data_bytes"] == sum(p.stat().st_size for p in shards)
    everything = [p for p in out.rglob("*") if p.is_file()]
    assert (report["total_files"], report["total_bytes"]) == (
        len(everything),
        sum(p.stat().st_size for p in everything),
    )
    assert sorted(report["record_files"]) == [SUCCESS_FILE, JOB_FILE] and report["commit_records"] == 3
    assert report["missing_files"] == [] and report["uncommitted_files"] == []
    job = json.loads((out / JOB_FILE).read_text())
    assert (
        report["fingerprint"]
        == job["fingerprint"]
        == read_features(out).metadata["llava_features.fingerprint"]
    )
    brief = report["brief"]
    assert (brief["select_layer"], brief["projector_type"], brief["output_dtype"]) == (
        -2,
        "mlp2x_gelu",
        "float16",
    )
    assert (brief["shard_size"], brief["pooled"], brief["input"]) == (SHARD_SIZE, True, job["input"])
    assert report["config"]["job"]["max_error_fraction"] == 0.5
    # The human form.
    assert cli_main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "state:        complete" in text and "rows:         6 of 6 inputs: 5 ok, 1 errors" in text
    assert "truncated: 1" in text and "broken.jpg" in text
    assert "features: 16 × 64 float16 per row (2.0 kB, binary)" in text and "pooled: 64 float32" in text
    assert (
        "units:        3 of 3 planned committed" in text
        and f"{COMMITS_DIR}/ (3 records)" in text
        and f"fingerprint:  {job['fingerprint']}" in text
    )
    assert "layer -2" in text and "read_features(" in text


def test_inspect_a_failed_output(failed, capsys):
    out, _ = failed
    rc, report = _inspect_json(str(out), capsys=capsys)
    assert rc == 1 and report["state"] == "failed" and not report["success"]
    assert (report["rows"], report["ok"], report["units_committed"], report["missing_units"]) == (6, 5, 3, [])
    assert report["max_error_fraction"] == 0.01
    assert any("max_error_fraction 1.00%" in p and "--max-error-fraction" in p for p in report["problems"])


def test_inspect_incomplete_outputs(complete, tmp_path, capsys):
    out, _ = complete
    # An interrupted job: unit 1 never committed (no file, no record), its writer's temporary file
    # left, no _SUCCESS.
    broken = tmp_path / "interrupted"
    shutil.copytree(out, broken)
    shard = broken / shard_file_name(1, 0)
    data = shard.read_bytes()
    shard.unlink()
    (broken / COMMITS_DIR / commit_file_name(1)).unlink()
    temp = f".{shard_file_name(1, 0)}.0123456789abcdef.tmp"
    (broken / temp).write_bytes(data[: len(data) // 2])
    (broken / SUCCESS_FILE).unlink()
    rc, report = _inspect_json(str(broken), capsys=capsys)
    assert rc == 1 and report["state"] == "incomplete"
    assert report["missing_units"] == [1] and report["units_committed"] == 2 and report["rows"] == 4
    assert report["temporary_files"] == [temp]
    problems = " | ".join(report["problems"])
    assert "1 of 3 planned units are not committed (1)" in problems and "temporary file" in problems
    assert cli_main(["inspect", str(broken)]) == 1
    assert "state:        incomplete" in capsys.readouterr().out

    # Every shard there and _SUCCESS too, but a writer's temporary file: a job is writing here.
    leftover = tmp_path / "leftover"
    shutil.copytree(out, leftover)
    (leftover / f".{shard_file_name(2, 0)}.fedcba9876543210.tmp").write_bytes(b"PAR1")
    rc, report = _inspect_json(str(leftover), capsys=capsys)
    assert rc == 1 and report["state"] == "incomplete" and report["missing_units"] == []
    assert report["rows"] == 6  # the temporary file is never read as data

    # A file with fewer rows than its unit's commit record says.
    short = tmp_path / "short"
    shutil.copytree(out, short)
    table = pq.read_table(short / shard_file_name(0, 0))
    pq.write_table(table.slice(0, 1), short / shard_file_name(0, 0))
    rc, report = _inspect_json(str(short), capsys=capsys)
    assert report["state"] == "incomplete" and report["short_units"] == [
        {"unit": 0, "rows": 1, "expected": 2}
    ]
    assert any("unit 0 holds 1 rows, its commit record says 2" in p for p in report["problems"])
    assert any("_SUCCESS is there, but files were removed or changed" in p for p in report["problems"])

    # A committed unit's file removed: the record names a file that is not there.
    removed = tmp_path / "removed"
    shutil.copytree(out, removed)
    (removed / shard_file_name(2, 0)).unlink()
    rc, report = _inspect_json(str(removed), capsys=capsys)
    assert rc == 1 and report["state"] == "incomplete" and report["missing_units"] == []
    assert report["missing_files"] == [shard_file_name(2, 0)] and report["rows"] == 4

    # A unit's file without its commit record (killed between the file and the record): a leftover
    # that --resume rewrites; read as data (read_features reads it), reported as uncommitted.
    uncommitted = tmp_path / "uncommitted"
    shutil.copytree(out, uncommitted)
    (uncommitted / COMMITS_DIR / commit_file_name(0)).unlink()
    (uncommitted / SUCCESS_FILE).unlink()
    rc, report = _inspect_json(str(uncommitted), capsys=capsys)
    assert rc == 1 and report["state"] == "incomplete" and report["missing_units"] == [0]
    assert report["uncommitted_files"] == [shard_file_name(0, 0)] and report["rows"] == 6
    assert any("left by an interrupted run (--resume rewrites them)" in p for p in report["problems"])


def test_inspect_on_s3(complete, s3_server, capsys):
    out, _ = complete
    bucket = s3_server.create_bucket()
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        s3_server.put_object(bucket, f"runs/one/{path.relative_to(out).as_posix()}", path.read_bytes())
    uri = f"s3://{bucket}/runs/one"
    rc, report = _inspect_json(uri, "--s3-endpoint", s3_server.endpoint_url, capsys=capsys)
    local = inspect_output(out)
    assert rc == 0 and report["state"] == "complete" and report["output"] == uri
    for key in (
        "rows",
        "ok",
        "errors",
        "data_files",
        "data_bytes",
        "units_committed",
        "fingerprint",
        "columns",
    ):
        assert report[key] == json.loads(json.dumps(local.to_dict()))[key], key
    s3_server.client.delete_object(Bucket=bucket, Key=f"runs/one/{shard_file_name(2, 0)}")
    s3_server.client.delete_object(Bucket=bucket, Key=f"runs/one/{COMMITS_DIR}/{commit_file_name(2)}")
    report = inspect_output(uri, s3_endpoint=s3_server.endpoint_url)
    assert report.state == "incomplete" and report.missing_units == [2] and report.rows == 4
    fs = s3_server.filesystem()
    state = read_commit_state(fs, f"{bucket}/runs/one")
    assert state.units == 3 and sorted(state.committed) == [0, 1]
    assert [(c.rows, c.files) for c in state.commits.values()] == [
        (2, [(shard_file_name(u, 0), 2)]) for u in (0, 1)
    ]


def test_inspect_what_is_not_a_finished_output(complete, tmp_path, capsys):
    assert cli_main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "No output at" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    rc, report = _inspect_json(str(tmp_path / "empty"), capsys=capsys)
    assert rc == 1 and report["state"] == "empty"
    out, _ = complete
    copied = tmp_path / "copied"  # the shards without the job's records: no plan to check
    copied.mkdir()
    for path in out.glob("part-*.parquet"):
        shutil.copy(path, copied / path.name)
    rc, report = _inspect_json(str(copied), capsys=capsys)
    assert (
        rc == 1 and report["state"] == "unknown" and report["rows"] == 6 and report["units_planned"] is None
    )
    assert report["brief"]["select_layer"] == -2  # from the files' own metadata


def test_inspect_on_gcs(complete, gcs_server, gcs_env, capsys):
    out, _ = complete
    bucket = gcs_server.create_bucket()
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        gcs_server.put_object(bucket, f"runs/one/{path.relative_to(out).as_posix()}", path.read_bytes())
    rc, report = _inspect_json(f"gs://{bucket}/runs/one", capsys=capsys)
    assert rc == 0 and report["state"] == "complete"
    assert (report["rows"], report["ok"], report["units_committed"]) == (6, 5, 3)
    assert report["data_bytes"] == sum(p.stat().st_size for p in out.glob("part-*.parquet"))
