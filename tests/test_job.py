"""The offline job end to end on a local Ray: rows, error codes, parity, read-back, failures, resume,
the feature table's guarantees across writers, options and readers (claim, append, refusals)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llava_features.cli import main as cli_main
from pipeline.config import load_config
from pipeline.encoder import FeatureEncoder
from pipeline.model.errors import ErrorCode, OutputError
from pipeline.offline import run_job
from pipeline.table import SUCCESS_FILE, inspect_table, read_features
from pipeline.table.layout import DataFileName
from tests.corpus import write_bad_corpus, write_real_photos
from tests.fixtures.ray_cluster import local_ray

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray (4 CPUs, no dashboard) on free ports and its own temp dir (see ``local_ray``)."""
    import ray

    with local_ray(num_cpus=4, include_dashboard=False, logging_level="WARNING"):
        yield ray


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str | None]]:
    """Real photos plus the bad-image corpus in one folder, and a CSV manifest naming every file
    (folder listings only pick image extensions; the manifest also feeds the .ico, .html, ...).
    Returns (manifest, {file name: expected error code or None})."""
    folder = tmp_path_factory.mktemp("corpus")
    expected = {p.name: None for p in write_real_photos(folder)}
    expected.update(write_bad_corpus(folder))
    manifest = folder.parent / f"{folder.name}-manifest.csv"
    lines = ["image_id,uri", *(f"{name},{folder / name}" for name in sorted(expected))]
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, expected


_ENCODER_KEYS = ("features", "pooled", "output_dtype", "batch_size")


def _config(model: Path, **settings):
    """The tiny model in float32; ``settings`` go to the encoder section or the job section."""
    encoder = {k: v for k, v in settings.items() if k in _ENCODER_KEYS}
    job = {"shard_size": 4, **{k: v for k, v in settings.items() if k not in _ENCODER_KEYS}}
    return load_config(
        None, {"model": {"checkpoint": str(model), "dtype": "float32"}, "encoder": encoder, "job": job}
    )


@pytest.fixture(scope="module")
def corpus_table(ray_local, tiny_llava, corpus, tmp_path_factory):
    """The corpus encoded by the default route with pooled features, every error within the budget:
    ``(config, summary, output)``, for the tests that only read it."""
    folder, _ = corpus
    config = _config(tiny_llava, pooled=True, max_error_fraction=1.0)
    out = tmp_path_factory.mktemp("corpus-table") / "out"
    return config, run_job(config, str(folder), str(out)), out


def _encode_args(model: Path, inp: Path | str, out: Path | str, *extra: str) -> list[str]:
    return [
        "encode",
        "--model",
        str(model),
        "--input",
        str(inp),
        "--output",
        str(out),
        "--dtype",
        "float32",
        *extra,
    ]


def test_encode_folder_one_row_per_input_with_codes_and_parity(ray_local, tiny_llava, corpus, tmp_path):
    folder, expected = corpus
    out = tmp_path / "out"
    rc = cli_main(
        _encode_args(
            tiny_llava,
            folder,
            out,
            "--pooled",
            "--features",
            "both",
            "--max-error-fraction",
            "0.9",
            "--shard-size",
            "5",
        )
    )
    assert rc == 0
    res = read_features(str(out), status=None)
    ids = res.table.column("image_id").to_pylist()
    assert sorted(ids) == sorted(expected) and len(set(ids)) == len(ids)
    status = dict(zip(ids, res.table.column("status").to_pylist(), strict=True))
    codes = dict(zip(ids, res.table.column("error_code").to_pylist(), strict=True))
    for name, code in expected.items():
        assert codes[name] == code, name
        assert status[name] == ("ok" if code is None else "error"), name
    assert (out / SUCCESS_FILE).exists() and (out / "_delta_log").is_dir()
    assert res.state == "complete" and res.identity.options["encoder.features"] == "both"

    # ok rows equal the in-process encoder's features (float32)
    encoder = FeatureEncoder(_config(tiny_llava, features="both", pooled=True))
    ok = read_features(str(out))
    tower = read_features(str(out), column="tower_features")
    pooled = np.stack(ok.table.column("pooled").to_numpy(zero_copy_only=False))
    assert ok.features.dtype == np.float32 and ok.features.shape[1:] == (16, 64)
    assert tower.features.shape[1:] == (16, 32)
    for row, image_id in enumerate(ok.image_ids):
        prepared = encoder.encode_pre(Path(ok.table.column("uri")[row].as_py()).read_bytes(), image_id)
        ref = encoder.encode_pixels(prepared.pixels[None])
        assert np.abs(ok.features[row] - ref.projected[0]).max() <= 1e-5
        assert np.abs(tower.features[row] - ref.tower[0]).max() <= 1e-5
        assert np.abs(pooled[row] - ref.pooled[0]).max() <= 1e-5
        width, height = ok.table.column("width")[row].as_py(), ok.table.column("height")[row].as_py()
        assert (width, height) == (prepared.width, prepared.height)


def test_read_back_with_delta_pyarrow_pandas_duckdb_polars_and_ray(corpus, corpus_table):
    import deltalake
    import duckdb
    import polars as pl

    _, expected = corpus
    _, summary, out = corpus_table
    n_ok = sum(code is None for code in expected.values())
    assert summary.ok == n_ok and sum(summary.errors.values()) == len(expected) - n_ok

    feats = read_features(str(out))
    assert feats.features.shape == (n_ok, 16, 64)
    assert feats.identity.fingerprint == summary.fingerprint
    assert feats.identity.encoder["model"]["projector_type"] == "mlp2x_gelu"

    # the Delta table through pyarrow, without our package: raw bytes + the shape in the field metadata
    code = (
        "import json, sys, numpy as np, deltalake, pyarrow.compute as pc\n"
        f"t = deltalake.DeltaTable({str(out)!r}).to_pyarrow_dataset().to_table()\n"
        "t = t.filter(pc.equal(t['status'], 'ok')).sort_by('image_id')\n"
        "meta = json.loads(t.schema.field('features').metadata[b'llava_features.tensor'])\n"
        "assert 'pipeline' not in sys.modules\n"
        "arr = np.stack([np.frombuffer(v, meta['dtype']) for v in t['features'].to_pylist()])\n"
        "np.save(sys.stdout.buffer, arr.reshape(-1, *meta['shape']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, cwd="/")
    import io

    plain = np.load(io.BytesIO(proc.stdout))
    assert np.array_equal(plain, feats.features[np.argsort(feats.image_ids)])

    # pandas, DuckDB (over the snapshot's pyarrow dataset: an array operation on pooled), Polars, Ray Data
    ds = deltalake.DeltaTable(str(out)).to_pyarrow_dataset()
    df = ds.to_table(columns=["image_id", "status", "error_code"]).to_pandas()
    assert len(df) == len(expected) and (df["status"] == "ok").sum() == n_ok
    rows = duckdb.sql(
        "select image_id, list_sum(pooled) from ds where status = 'ok' order by image_id"
    ).fetchall()
    ref = {i: float(feats.features[k].mean(axis=0).sum()) for k, i in enumerate(feats.image_ids)}
    assert len(rows) == n_ok and all(abs(total - ref[image_id]) < 1e-3 for image_id, total in rows)
    assert pl.scan_delta(str(out)).filter(pl.col("status") == "ok").select(pl.len()).collect().item() == n_ok
    import ray

    assert ray.data.read_delta(str(out)).filter(expr="status == 'ok'").count() == n_ok
    # one data file alone, with pyarrow
    one = pq.read_table(next(out.glob("part-*.parquet")))
    assert one.schema.field("features").type == pa.binary()


def test_non_empty_output_is_refused_and_fingerprint_checked(ray_local, tiny_llava, corpus, tmp_path):
    folder, _ = corpus
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputError, match="not empty"):
        run_job(_config(tiny_llava, max_error_fraction=1.0), str(folder), str(out))
    assert (out / "keep.txt").read_text() == "user data"

    out2 = tmp_path / "out2"
    run_job(_config(tiny_llava, max_error_fraction=1.0, limit=6), str(folder), str(out2))
    other = load_config(
        None,
        {
            "model": {"checkpoint": str(tiny_llava), "dtype": "float32", "select_layer": 1},
            "job": {"shard_size": 4, "max_error_fraction": 1.0, "limit": 6},
        },
    )
    with pytest.raises(OutputError, match=r"model.select_layer: -2 → 1") as info:
        run_job(other, str(folder), str(out2), mode="resume")
    assert info.value.code == ErrorCode.FINGERPRINT_MISMATCH


def _many_images(folder: Path, n: int) -> Path:
    src = sorted(write_real_photos(folder / "_src"))
    images = folder / "images"
    images.mkdir()
    for i in range(n):
        shutil.copy(src[i % len(src)], images / f"img-{i:04d}{src[i % len(src)].suffix}")
    shutil.rmtree(folder / "_src")
    return images


def _committed(out: Path) -> list[Path]:
    """The data files the table's latest snapshot holds (none before the table exists)."""
    import deltalake

    if not list((out / "_delta_log").glob("*.json")):
        return []
    return sorted(out / Path(uri).name for uri in deltalake.DeltaTable(str(out)).file_uris())


def _committed_units(out: Path) -> set[int]:
    return {DataFileName.parse(p.name).unit for p in _committed(out)}


def _encoder_actor_pid() -> int | None:
    """The process of an encoder actor of this test's Ray (a descendant of this process; Ray titles
    actor processes ``ray::<class>``)."""
    import psutil

    for proc in psutil.Process().children(recursive=True):
        try:
            if "EncodeShardActor" in " ".join(proc.cmdline()):
                return proc.pid
        except psutil.Error:
            continue
    return None


def _many_inputs(folder: Path, n: int, kind: str) -> tuple[Path, list[str]]:
    """``n`` inputs of one kind: a folder of image files, or WebDataset tars of 5 samples (one output
    file each at shard size 1, so a unit has 5). Returns the input and the ids it must give."""
    if kind == "images":
        images = _many_images(folder, n)
        return images, sorted(p.name for p in images.iterdir())
    from tests.datasets import write_shards

    return folder / "shards", sorted(write_shards(folder / "shards", shards=n // 5, per_shard=5))


# The kill lands right after the first commit: 40 units leave it well inside the job.
@pytest.mark.parametrize(("kind", "n"), [("images", 40), ("webdataset", 40)])
def test_killed_encoder_actor_job_completes_exactly_once(ray_local, tiny_llava, tmp_path, kind, n):
    images, expected_ids = _many_inputs(tmp_path, n, kind)
    out = tmp_path / "out"
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(
            summary=run_job(
                _config(tiny_llava, shard_size=1, max_error_fraction=0.0, commit_interval_s=0.05),
                str(images),
                str(out),
            )
        )
    )
    thread.start()
    pid = None
    deadline = time.time() + 120
    while pid is None and time.time() < deadline and thread.is_alive():
        pid = _encoder_actor_pid()
        time.sleep(0.05)
    assert pid is not None, "no encoder actor came up"
    while not _committed(out) and thread.is_alive():
        time.sleep(0.005)
    killed_at = None
    while killed_at is None and thread.is_alive():
        try:
            os.kill(pid, signal.SIGKILL)  # the encoder actor dies mid-job
            killed_at = len(_committed(out))
        except ProcessLookupError:  # the pool replaced that process already: take the current one
            pid = _encoder_actor_pid() or pid
            time.sleep(0.01)
    assert killed_at is not None and 1 <= killed_at < n, "the job was not running when the actor was killed"
    thread.join(timeout=300)
    assert "summary" in result
    ids = read_features(str(out), status=None, column=None).image_ids
    assert sorted(ids) == expected_ids  # every row exactly once
    assert len(_committed(out)) == n and (out / SUCCESS_FILE).exists()
    assert sorted(p.name for p in out.glob("part-*")) == [p.name for p in _committed(out)]  # no stray file
    assert not list(out.glob(".*.tmp"))


def _encode_process(model: Path, inp: Path, out: Path, address: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "llava_features", *_encode_args(model, inp, out, *extra)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_interrupted_job_readers_see_committed_units_and_resumes_complete_it(ray_local, tiny_llava, tmp_path):
    """SIGKILL of the driver mid-job: every reader sees exactly the committed units' rows (never the files
    in flight); two --resume processes started together then finish it, every row exactly once.

    A folder of images: the readers and the resumes do not depend on the kind of input. WebDataset tars
    as units are resumed in test_resume_rewrites_exactly_the_uncommitted_units (a unit written but never
    committed) and survive a killed actor in test_killed_encoder_actor_job_completes_exactly_once."""
    import deltalake

    units, enough = 24, 5  # one image each; the kill comes once `enough` are committed
    images, expected_ids = _many_inputs(tmp_path, units, "images")
    out = tmp_path / "out"
    address = ray_local.get_runtime_context().gcs_address
    args = ("--shard-size", "1", "--max-error-fraction", "0", "--commit-interval-s", "0.05")
    proc = _encode_process(tiny_llava, images, out, address, *args)
    deadline = time.time() + 180
    while time.time() < deadline and len(_committed_units(out)) < enough and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    first = {p.name: p.stat().st_mtime_ns for p in _committed(out)}
    committed_rows = sum(pq.read_metadata(out / n).num_rows for n in first)
    first_units = len(_committed_units(out))
    assert enough <= first_units < units, "the job was not interrupted part-way"
    assert not (out / SUCCESS_FILE).exists()

    # readers: exactly the committed units' rows
    with pytest.warns(UserWarning, match="state: interrupted"):
        assert read_features(str(out), status=None, column=None).num_rows == committed_rows
    with pytest.raises(Exception, match="not complete"):
        read_features(str(out), complete_only=True)
    assert deltalake.DeltaTable(str(out)).to_pyarrow_dataset().count_rows() == committed_rows
    import ray

    assert ray.data.read_delta(str(out)).count() == committed_rows
    report = inspect_table(str(out))
    assert report.state == "interrupted" and report.rows == committed_rows and not report.in_flight_files

    # two resumes at once: one, or both, run; every unit is committed once
    resumes = [_encode_process(tiny_llava, images, out, address, *args, "--resume") for _ in range(2)]
    outputs = [r.communicate(timeout=300) for r in resumes]
    codes = sorted(r.returncode for r in resumes)
    assert codes in ([0, 0], [0, 2]), outputs
    if codes == [0, 2]:
        refused = next(err for r, (_, err) in zip(resumes, outputs, strict=True) if r.returncode == 2)
        assert "is being written now" in refused and "output_in_use" in refused
    resumed = read_features(str(out))
    assert sorted(resumed.image_ids) == expected_ids and resumed.state == "complete"  # every row exactly once
    assert {p.name: p.stat().st_mtime_ns for p in _committed(out) if p.name in first} == first  # untouched
    assert sorted(p.name for p in out.glob("part-*")) == [p.name for p in _committed(out)]  # orphans removed
    # the same features as a run that was never interrupted
    clean = tmp_path / "clean"
    run_job(_config(tiny_llava, shard_size=1, max_error_fraction=0.0), str(images), str(clean))
    reference = read_features(str(clean))
    a, b = np.argsort(resumed.image_ids), np.argsort(reference.image_ids)
    assert np.array_equal(resumed.features[a], reference.features[b])
    assert (out / SUCCESS_FILE).exists()
    # resuming a finished job writes nothing
    again = run_job(
        _config(tiny_llava, shard_size=1, max_error_fraction=0.0), str(images), str(out), mode="resume"
    )
    assert again.files_written == 0 and again.ok == units and again.up_to_date


def test_two_jobs_on_one_empty_output_exactly_one_proceeds(ray_local, tiny_llava, tmp_path):
    """Two encode processes started together on one output (different options): the first commit
    claims it, the other is refused naming the claiming job; the table holds every input once."""
    images, expected_ids = _many_inputs(tmp_path, 24, "images")
    out = tmp_path / "out"
    address = ray_local.get_runtime_context().gcs_address
    jobs = [
        _encode_process(tiny_llava, images, out, address, "--shard-size", size, "--max-error-fraction", "0")
        for size in ("3", "5")
    ]
    outputs = [j.communicate(timeout=300) for j in jobs]
    assert sorted(j.returncode for j in jobs) == [0, 2], outputs
    loser = next(err for j, (_, err) in zip(jobs, outputs, strict=True) if j.returncode == 2)
    table = read_features(str(out), status=None, column=None)
    owner = table.identity
    assert f"job {owner.job}" in loser and owner.created in loser, loser
    assert "nothing was written" in loser
    assert sorted(table.image_ids) == expected_ids and table.state == "complete"


def test_s3_to_s3(ray_local, tiny_llava, s3_server, tmp_path):
    photos = write_real_photos(tmp_path / "photos")
    s3_server.create_bucket("in-images")
    s3_server.create_bucket("out-features")
    for p in photos:
        s3_server.put_object("in-images", f"photos/{p.name}", p.read_bytes())
    s3_server.put_object("in-images", "photos/bad.jpg", b"not an image at all")
    rc = cli_main(
        _encode_args(
            tiny_llava,
            "s3://in-images/photos",
            "s3://out-features/run1",
            "--s3-endpoint",
            s3_server.endpoint_url,
            "--max-error-fraction",
            "0.5",
        )
    )
    assert rc == 0
    keys = s3_server.list_keys("out-features", "run1/")
    assert "run1/_SUCCESS" in keys and any(k.startswith("run1/_delta_log/") for k in keys)
    res = read_features("s3://out-features/run1", status=None, s3_endpoint=s3_server.endpoint_url)
    assert res.state == "complete"
    codes = dict(zip(res.image_ids, res.table.column("error_code").to_pylist(), strict=True))
    assert codes.pop("bad.jpg") == "not_an_image"
    assert set(codes) == {p.name for p in photos} and all(c is None for c in codes.values())


def test_s3_webdataset_and_parquet_images_to_s3(ray_local, tiny_llava, s3_server, tmp_path):
    """Tar shards and a Parquet file of images read from S3 (moto), carried columns, output on S3."""
    from tests.datasets import photo_bytes, write_image_parquet, write_shards

    endpoint = s3_server.endpoint_url
    expected = write_shards(tmp_path / "shards", shards=2, per_shard=3)
    for tar in (tmp_path / "shards").glob("*.tar"):
        s3_server.put_object("in-containers", f"wds/{tar.name}", tar.read_bytes())
    images = photo_bytes(3)
    write_image_parquet(
        tmp_path / "hf.parquet", images, ids=["p0", "p1", "p2"], columns={"caption": ["x", "y", "z"]}
    )
    s3_server.put_object("in-containers", "hf/train.parquet", (tmp_path / "hf.parquet").read_bytes())
    s3_server.create_bucket("out-containers")
    common = (
        "--s3-endpoint",
        endpoint,
        "--keep-columns",
        "caption",
        "--shard-size",
        "2",
        "--max-error-fraction",
        "0",
    )
    assert (
        cli_main(
            _encode_args(
                tiny_llava, "s3://in-containers/wds/{00000..00001}.tar", "s3://out-containers/wds", *common
            )
        )
        == 0
    )
    assert (
        cli_main(
            _encode_args(
                tiny_llava,
                "s3://in-containers/hf",
                "s3://out-containers/hf",
                "--image-column",
                "image",
                "--id-column",
                "id",
                *common,
            )
        )
        == 0
    )
    for prefix, want in (
        ("wds", {k: v["caption"] for k, v in expected.items()}),
        ("hf", {"p0": "x", "p1": "y", "p2": "z"}),
    ):
        keys = s3_server.list_keys("out-containers", f"{prefix}/")
        assert f"{prefix}/_SUCCESS" in keys and any(k.startswith(f"{prefix}/_delta_log/") for k in keys)
        got = read_features(f"s3://out-containers/{prefix}", s3_endpoint=endpoint).table
        assert (
            dict(zip(got.column("image_id").to_pylist(), got.column("caption").to_pylist(), strict=True))
            == want
        )


def test_list_tensor_format_and_tower_only(ray_local, tiny_llava, tmp_path):
    photos = write_real_photos(tmp_path / "photos", n=3)
    out = tmp_path / "out"
    rc = cli_main(
        _encode_args(tiny_llava, tmp_path / "photos", out, "--tensor-format", "list", "--features", "tower")
    )
    assert rc == 0
    table = pq.read_table(next(out.glob("part-*.parquet")))
    assert "features" not in table.column_names
    assert table.schema.field("tower_features").type == pa.list_(pa.float32())  # arrays other tools read
    res = read_features(str(out), column="tower_features")
    assert res.features.shape == (len(photos), 16, 32) and res.features.dtype == np.float32
    encoder = FeatureEncoder(_config(tiny_llava, features="tower"))
    for row, uri in enumerate(res.table.column("uri").to_pylist()):
        ref = encoder.encode_pixels(encoder.encode_pre(Path(uri).read_bytes()).pixels[None]).tower
        assert np.abs(res.features[row] - ref[0]).max() <= 1e-5


def test_shard_without_a_good_image_keeps_the_schema(ray_local, tiny_llava, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "0-empty.jpg").write_bytes(b"")
    (folder / "0-text.png").write_bytes(b"<html>not an image</html>")
    write_real_photos(folder, n=2)
    out = tmp_path / "out"
    config = _config(tiny_llava, shard_size=2, pooled=True, features="both", max_error_fraction=1.0)
    summary = run_job(config, str(folder), str(out))
    assert summary.ok == 2 and summary.errors == {"empty": 1, "not_an_image": 1}
    files = {DataFileName.parse(p.name).unit: p for p in _committed(out)}
    first = pq.read_table(files[0])  # the two bad files: no ok row
    assert first.column("status").to_pylist() == ["error", "error"]
    assert first.schema == pq.read_table(files[1]).schema
    assert first.column("features").null_count == 2 and first.column("pooled").null_count == 2


def test_temp_files_of_writers_lost_mid_run_are_removed(ray_local, tiny_llava, tmp_path, monkeypatch):
    """A writer killed mid-file leaves its temporary file; the file is rewritten by the retry, and the
    finished job leaves no temporary file behind (deterministic version of the actor-kill case)."""
    import pipeline.offline.driver as driver

    folder = tmp_path / "images"
    folder.mkdir()
    write_real_photos(folder, n=2)
    out = tmp_path / "out"
    run_pipeline = driver._pipeline

    def run_and_lose_a_writer(session, **kw):
        run_pipeline(session, **kw)
        name = kw["target"].table.file_name(unit=0, piece=0, key=kw["work"][0][1][:20])
        (out / f".{name}.0123abcd.tmp").write_bytes(b"half a file")

    monkeypatch.setattr(driver, "_pipeline", run_and_lose_a_writer)
    summary = run_job(_config(tiny_llava, max_error_fraction=0.0), str(folder), str(out))
    assert summary.ok == 2 and (out / SUCCESS_FILE).exists()
    assert not list(out.glob(".*.tmp"))
    assert read_features(str(out)).num_rows == 2


def test_decode_on_the_encoder_device_gives_the_same_rows(corpus, corpus_table, tmp_path):
    """``decode.nvjpeg``: decode tasks only read, the encoder actors decode. Without CUDA the route
    falls back to the exact CPU path inside the actor: the same rows, codes and features as the
    default route (the fingerprint names the route, as every opt-in deviation's must)."""
    folder, expected = corpus
    config, default, cpu = corpus_table
    config = replace(config, decode=replace(config.decode, nvjpeg=True))
    device = run_job(config, str(folder), str(tmp_path / "device"))
    assert device.fingerprint != default.fingerprint
    assert (device.ok, device.errors) == (default.ok, default.errors)
    a = read_features(str(cpu), status=None)
    b = read_features(str(tmp_path / "device"), status=None)
    for column in ("image_id", "status", "error_code", "width", "height"):
        assert a.table.column(column).to_pylist() == b.table.column(column).to_pylist(), column
    np.testing.assert_array_equal(a.features, b.features)
    assert sum(code is None for code in expected.values()) == default.ok


@pytest.mark.parametrize("anyres_output", ["tiles", "packed"])
def test_llava_next_job_writes_each_images_own_shape(ray_local, tiny_models, tmp_path, anyres_output):
    """LLaVA-NeXT (anyres): every image has its own tile grid, so its own number of rows; the job
    writes a variable-shape column with the grid beside it, equal to the in-process encoder's rows
    (which tests/test_fidelity.py holds to transformers' LlavaNext classes)."""
    from PIL import Image
    from skimage import data as skdata

    model = tiny_models["llava-next-hf"]
    folder = tmp_path / "photos"
    folder.mkdir()
    astronaut = Image.fromarray(skdata.astronaut())
    for name, size in {"square": (300, 300), "wide": (400, 150), "tall": (90, 260), "tiny": (20, 14)}.items():
        astronaut.resize(size).save(folder / f"{name}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    out = tmp_path / "out"
    extra = ("--anyres-output", anyres_output, "--max-error-fraction", "0.5")
    assert cli_main(_encode_args(model, folder, out, *extra)) == 0

    every = read_features(str(out), status=None)
    assert every.table.num_rows == 5 and every.valid.sum() == 4
    ok = read_features(str(out), columns=["image_id", "uri", "grid_rows", "grid_cols"])
    sections = {
        "model": {"checkpoint": str(model), "dtype": "float32"},
        "encoder": {"anyres_output": anyres_output},
    }
    encoder = FeatureEncoder(load_config(None, sections))
    shapes = set()
    for row, uri in enumerate(ok.table.column("uri").to_pylist()):
        prepared = encoder.encode_pre(Path(uri).read_bytes())
        want = np.asarray(encoder.encode_prepared([prepared]).projected[0])
        got = ok.features[row]
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5, uri
        rows, cols = ok.table.column("grid_rows")[row].as_py(), ok.table.column("grid_cols")[row].as_py()
        assert (rows, cols) == (prepared.grid.rows, prepared.grid.cols)
        if anyres_output == "tiles":
            assert got.shape[0] == 1 + rows * cols
        shapes.add(got.shape)
    assert len(shapes) > 1  # the grids differ, and so do the rows
    padded = read_features(str(out), padded=True)
    assert padded.lengths.tolist() == [len(f) for f in ok.features]


# -- the input kinds of large jobs ------------------------------------------------------------------


def _parity(out: Path, model: Path, data_of) -> None:
    """Every ok row's features equal the in-process encoder's on the same bytes (float32)."""
    encoder = FeatureEncoder(_config(model))
    ok = read_features(str(out))
    assert ok.num_rows > 0
    for row, image_id in enumerate(ok.image_ids):
        prepared = encoder.encode_pre(data_of(image_id), image_id)
        ref = encoder.encode_pixels(prepared.pixels[None])
        assert np.abs(ok.features[row] - ref.projected[0]).max() <= 1e-5, image_id


def _files_per_unit(out: Path) -> dict[int, list[str]]:
    units: dict[int, list[str]] = {}
    for p in _committed(out):
        units.setdefault(DataFileName.parse(p.name).unit, []).append(p.name)
    return units


def test_webdataset_shards_with_carried_columns(ray_local, tiny_llava, tmp_path):
    """Brace notation over tar shards: one row per sample, several files per tar, captions and json
    fields carried, bad members and a truncated tar as error rows — never a failed job."""
    from tests.datasets import (
        photo_bytes,
        sample_members,
        tar_bytes,
        truncate_inside_last_member,
        write_shards,
    )

    folder = tmp_path / "shards"
    expected = write_shards(folder, shards=2, per_shard=5)
    good = (folder / "00000.tar").read_bytes()
    bad = tar_bytes(
        [
            *sample_members("bad-0", photo_bytes(1)[0][:700], caption="a jpeg cut short"),
            *sample_members("bad-1", None, caption="no image"),
            *sample_members("bad-2", b"", caption="empty"),
        ]
    )
    (folder / "00002.tar").write_bytes(bad)
    (folder / "00003.tar").write_bytes(truncate_inside_last_member(good))
    out = tmp_path / "out"
    rc = cli_main(
        _encode_args(
            tiny_llava,
            f"{folder}/{{00000..00003}}.tar",
            out,
            "--shard-size",
            "2",
            "--keep-columns",
            "caption,url",
            "--max-error-fraction",
            "0.5",
        )
    )
    assert rc == 0
    table = read_features(str(out), status=None).table
    rows = {(r["uri"].split("#")[0].rsplit("/", 1)[1], r["image_id"]): r for r in table.to_pylist()}
    assert len(rows) == table.num_rows == 10 + 3 + 5  # every sample exactly once, the truncated tar too
    for image_id, want in expected.items():
        row = rows[(want["tar"], image_id)]
        assert row["status"] == "ok" and (row["caption"], row["url"]) == (want["caption"], want["url"])
        assert row["uri"] == f"{folder / want['tar']}#{want['member']}"
    assert {k[1]: rows[k]["error_code"] for k in rows if k[0] == "00002.tar"} == {
        "bad-0": "truncated",
        "bad-1": "read_failed",
        "bad-2": "empty",
    }
    assert rows[("00002.tar", "bad-1")]["caption"] == "no image"  # carried on error rows too
    truncated = [rows[k] for k in rows if k[0] == "00003.tar"]
    assert [r["status"] for r in truncated] == ["ok"] * 4 + ["error"]
    assert (
        truncated[-1]["error_code"] == "truncated" and "ends inside member" in truncated[-1]["error_message"]
    )
    assert table.schema.field("caption").type == pa.string()
    files = _files_per_unit(out)
    assert sorted(files) == [0, 1, 2, 3] and [len(files[u]) for u in range(4)] == [3, 3, 2, 3]
    _parity(out, tiny_llava, lambda image_id: _member(folder, image_id))  # 00003.tar repeats 00000's keys


def _member(folder: Path, image_id: str) -> bytes:
    import tarfile

    with tarfile.open(folder / f"{image_id[:5]}.tar") as tf:
        return tf.extractfile(f"{image_id}.jpg").read()  # type: ignore[union-attr]


def test_parquet_images_and_sharded_manifests(ray_local, tiny_llava, tmp_path):
    """Parquet files with the image bytes (the datasets Image struct), ids and carried columns of
    their own types; then a manifest split into Parquet and CSV files."""
    import pyarrow.csv as pacsv

    from tests.datasets import photo_bytes, write_image_parquet

    images = photo_bytes(7)
    images[3] = b"not an image"
    ds = tmp_path / "hf" / "data"
    write_image_parquet(
        ds / "train-00000-of-00002.parquet",
        images[:5],
        ids=[f"hf-{i}" for i in range(5)],
        columns={"caption": [f"caption {i}" for i in range(5)], "aesthetic": [0.5 * i for i in range(5)]},
        row_group_size=2,
    )
    write_image_parquet(
        ds / "train-00001-of-00002.parquet",
        images[5:],
        ids=["hf-5", "hf-6"],
        columns={"caption": ["caption 5", "caption 6"], "aesthetic": [2.5, 3.0]},
    )
    out = tmp_path / "out-hf"
    rc = cli_main(
        _encode_args(
            tiny_llava,
            ds,
            out,
            "--image-column",
            "image",
            "--id-column",
            "id",
            "--keep-columns",
            "caption,aesthetic",
            "--shard-size",
            "3",
            "--max-error-fraction",
            "0.5",
        )
    )
    assert rc == 0
    table = read_features(str(out), status=None).table
    assert table.column("image_id").to_pylist() == [f"hf-{i}" for i in range(7)]  # input order
    assert table.column("caption").to_pylist() == [f"caption {i}" for i in range(7)]
    assert (
        table.schema.field("aesthetic").type == pa.float64() and table.column("aesthetic")[4].as_py() == 2.0
    )
    assert table.column("error_code").to_pylist()[3] == "not_an_image"
    assert table.column("uri")[6].as_py() == f"{ds / 'train-00001-of-00002.parquet'}#1"
    _parity(out, tiny_llava, lambda image_id: images[int(image_id.split("-")[1])])

    photos = sorted(write_real_photos(tmp_path / "photos", n=5))
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    pq.write_table(
        pa.table(
            {"uri": [str(p) for p in photos[:3]], "image_id": ["a", "b", "c"], "caption": ["ca", "cb", "cc"]}
        ),
        manifests / "000.parquet",
    )
    pacsv.write_csv(
        pa.table(
            {
                "uri": [f"../photos/{p.name}" for p in photos[3:]],
                "image_id": ["d", "e"],
                "caption": ["cd", "ce"],
            }
        ),
        manifests / "001.csv",
    )
    summary = run_job(
        load_config(
            None,
            {
                "model": {"checkpoint": str(tiny_llava), "dtype": "float32"},
                "input": {"keep_columns": ["caption"]},
                "job": {"shard_size": 2, "max_error_fraction": 0.0},
            },
        ),
        f"{manifests}/*",
        str(tmp_path / "out-manifest"),
    )
    assert (summary.input_kind, summary.ok, summary.units_total) == ("manifest", 5, 3)
    got = read_features(str(tmp_path / "out-manifest")).table
    assert got.column("image_id").to_pylist() == list("abcde")
    assert got.column("caption").to_pylist() == ["ca", "cb", "cc", "cd", "ce"]


def test_resume_rewrites_exactly_the_uncommitted_units(ray_local, tiny_llava, tmp_path, monkeypatch):
    """A run that wrote a unit's files but never committed them (killed before its commit): the resume
    writes that unit again under its own run's names and removes the dead run's files; the committed
    units are untouched."""
    import pipeline.table.run as table_run
    from tests.datasets import write_shards

    expected = write_shards(tmp_path / "shards", shards=3, per_shard=5)
    out = tmp_path / "out"
    config = _config(tiny_llava, shard_size=2, max_error_fraction=0.0)
    real_add = table_run.Committer.add

    def never_unit_1(self, *, unit, **kw):  # the driver dies before committing unit 1
        return True if unit == 1 else real_add(self, unit=unit, **kw)

    monkeypatch.setattr(table_run.Committer, "add", never_unit_1)
    with pytest.raises(OutputError, match="1 unit\\(s\\) of the plan are not in the table"):
        run_job(config, str(tmp_path / "shards"), str(out))
    monkeypatch.undo()
    before = {p.name: p.stat().st_mtime_ns for p in _committed(out)}
    stray = sorted(p.name for p in out.glob("part-*") if p.name not in before)
    assert {DataFileName.parse(n).unit for n in before} == {0, 2} and len(stray) == 3  # unit 1's files
    from pipeline.offline import dry_run

    assert (
        "2 of 3 unit(s) of this plan in it: --resume continues it"
        in dry_run(config, str(tmp_path / "shards"), str(out), mode="resume").output_state
    )
    again = run_job(config, str(tmp_path / "shards"), str(out), mode="resume")
    assert (again.units_written, again.units_skipped, again.files_written, again.read) == (1, 2, 3, 5)
    after = {p.name: p.stat().st_mtime_ns for p in _committed(out)}
    assert {n: t for n, t in after.items() if n in before} == before  # untouched
    assert not set(stray) & set(after) and sorted(p.name for p in out.glob("part-*")) == sorted(after)
    ids = read_features(str(out), status=None).image_ids
    assert sorted(ids) == sorted(expected) and len(ids) == 15
    assert (out / SUCCESS_FILE).exists()


def test_bad_folder_entries_get_error_rows_through_the_job(ray_local, tiny_llava, tmp_path):
    folder = tmp_path / "images"
    photos = write_real_photos(folder, n=2)
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to("..")  # a loop: each real file still once
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    os.mkfifo(folder / "pipe.jpg")
    summary = run_job(_config(tiny_llava, max_error_fraction=1.0), str(folder), str(tmp_path / "out"))
    table = read_features(str(tmp_path / "out"), status=None).table
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted([p.name for p in photos] + ["dangling.jpg", "loop.jpg", "pipe.jpg"])
    assert summary.ok == 2 and summary.errors == {"read_failed": 3}
    assert "dangling symbolic link" in rows["dangling.jpg"]["error_message"]
    assert "symbolic link loop" in rows["loop.jpg"]["error_message"]
    assert "FIFO" in rows["pipe.jpg"]["error_message"]


def test_resume_of_a_finished_output_reports_what_was_recorded(
    ray_local, tiny_llava, corpus, tmp_path, capsys, monkeypatch
):
    """A resume with nothing to do prints the recorded counts and decides with its own budget; a complete
    table is never downgraded by a stricter one. Relative outputs are shown absolute. A run over its error
    budget exits non-zero after writing every row, and a resume with a higher budget completes it."""
    folder, expected = corpus
    monkeypatch.chdir(tmp_path)
    n_err = sum(code is not None for code in expected.values())
    assert cli_main(_encode_args(tiny_llava, folder, "out", "--max-error-fraction", "0.9")) == 0
    printed = capsys.readouterr().out
    assert f"output:        {tmp_path / 'out'} (Delta table version 2, complete)\n" in printed
    success = (tmp_path / "out" / SUCCESS_FILE).read_bytes()
    assert json.loads(success)["max_error_fraction"] == 0.9

    assert cli_main(_encode_args(tiny_llava, folder, "out", "--resume")) == 3  # default budget: 0.01
    captured = capsys.readouterr()
    assert f"errors:        {n_err} " in captured.out and "images read:   0 this run" in captured.out
    assert "up to date" in captured.out and "left as it is" in captured.err
    assert (tmp_path / "out" / SUCCESS_FILE).read_bytes() == success  # untouched
    assert inspect_table("out").state == "complete"
    assert cli_main(_encode_args(tiny_llava, folder, "out", "--resume", "--max-error-fraction", "0.9")) == 0
    assert (tmp_path / "out" / SUCCESS_FILE).read_bytes() == success

    # A run over its budget (the default --max-error-fraction 0.01) exits 3 after writing every row: a
    # failed table; a resume that allows more completes it, encoding nothing.
    assert cli_main(_encode_args(tiny_llava, folder, "strict")) == 3
    assert "[error_budget_exceeded]" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="state: failed"):
        assert read_features("strict", status=None, column=None).table.num_rows == len(expected)
    assert not (tmp_path / "strict" / SUCCESS_FILE).exists() and inspect_table("strict").state == "failed"
    assert (
        cli_main(_encode_args(tiny_llava, folder, "strict", "--resume", "--max-error-fraction", "0.9")) == 0
    )
    assert "images read:   0 this run" in capsys.readouterr().out
    recorded = json.loads((tmp_path / "strict" / SUCCESS_FILE).read_text())
    assert recorded["max_error_fraction"] == 0.9 and recorded["ok"] == len(expected) - n_err
    assert inspect_table("strict").state == "complete"


@pytest.fixture(scope="module")
def finished(ray_local, tiny_llava, tmp_path_factory) -> tuple[Path, Path]:
    """A complete table of six photos, pooled, float32 (the photos' folder, the table)."""
    root = tmp_path_factory.mktemp("finished")
    write_real_photos(root / "photos", n=6)
    out = root / "out"
    assert (
        cli_main(_encode_args(tiny_llava, root / "photos", out, "--pooled", "--max-error-fraction", "0")) == 0
    )
    return root / "photos", out


@pytest.mark.parametrize(
    ("flags", "named", "code"),
    [
        (("--features", "both"), 'encoder.features: "projected" → "both"', "schema_mismatch"),
        (("--no-pooled",), "encoder.pooled: true → false", "schema_mismatch"),
        (("--tensor-format", "list"), 'job.tensor_format: "binary" → "list"', "schema_mismatch"),
        (("--output-dtype", "float16"), 'encoder.output_dtype: "float32" → "float16"', "schema_mismatch"),
        (("--select-layer", "1"), "model.select_layer: -2 → 1", "fingerprint_mismatch"),
        (("--image-aspect-ratio", "square"), "preprocess.aspect_ratio", "fingerprint_mismatch"),
        (("--shard-size", "2"), "different input plan", "fingerprint_mismatch"),
    ],
)
def test_resume_refuses_options_that_change_the_schema_or_the_values(
    finished, tiny_llava, flags, named, code, capsys
):
    photos, out = finished
    version = read_features(str(out), column=None).version
    rc = cli_main(_encode_args(tiny_llava, photos, out, "--pooled", "--resume", *flags))
    err = capsys.readouterr().err
    assert rc == 2 and named in err and f"[{code}]" in err, err
    assert read_features(str(out), column=None).version == version  # nothing written


@pytest.mark.parametrize(
    "flags",
    [("--batch-size", "3"), ("--compression", "zstd"), ("--actors", "1,2"), ("--read-timeout-s", "5")],
)
def test_resume_accepts_options_that_change_neither(finished, tiny_llava, flags, capsys):
    photos, out = finished
    rc = cli_main(_encode_args(tiny_llava, photos, out, "--pooled", "--resume", *flags))
    assert rc == 0 and "up to date" in capsys.readouterr().out


def test_append_adds_the_new_inputs_only(ray_local, tiny_llava, tmp_path, capsys):
    """A table of A, then --append of A ∪ B: |A ∪ B| rows, each id once, A's data files untouched; another
    encoder or schema is refused; an append with nothing new writes nothing."""
    photos = sorted(write_real_photos(tmp_path / "src", n=8))
    folder = tmp_path / "images"
    folder.mkdir()
    for p in photos[:5]:  # A
        shutil.copy(p, folder / f"a-{p.name}")
    out = tmp_path / "out"
    assert (
        cli_main(_encode_args(tiny_llava, folder, out, "--shard-size", "2", "--max-error-fraction", "0")) == 0
    )
    a_files = {p.name: p.stat().st_mtime_ns for p in _committed(out)}
    for p in photos[5:]:  # B
        shutil.copy(p, folder / f"b-{p.name}")
    for p in photos[:2]:  # and two of A's images again under new names: new ids, new rows
        shutil.copy(p, folder / f"c-{p.name}")
    capsys.readouterr()
    assert cli_main(_encode_args(tiny_llava, folder, out, "--shard-size", "2", "--append", "--dry-run")) == 0
    assert "--append adds the rest" in capsys.readouterr().out
    assert (
        cli_main(
            _encode_args(
                tiny_llava, folder, out, "--shard-size", "2", "--max-error-fraction", "0", "--append"
            )
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "images read:   5 this run" in printed
    table = read_features(str(out), status=None, column=None)
    ids = table.image_ids
    assert sorted(ids) == sorted(p.name for p in folder.iterdir()) and len(set(ids)) == len(ids) == 10
    assert {p.name: p.stat().st_mtime_ns for p in _committed(out) if p.name in a_files} == a_files
    assert {DataFileName.parse(p.name).segment for p in _committed(out)} == {1, 2}
    report = inspect_table(str(out))
    assert [(s.number, s.append, s.rows, s.state) for s in report.segments] == [
        (1, False, 5, "complete"),
        (2, True, 5, "complete"),
    ]
    # nothing new: nothing written
    version = table.version
    assert cli_main(_encode_args(tiny_llava, folder, out, "--shard-size", "2", "--append")) == 0
    assert "nothing was appended" in capsys.readouterr().out
    assert read_features(str(out), column=None).version == version
    # another encoder, another schema: refused before anything is written
    for flags, code in (
        (("--select-layer", "1"), "fingerprint_mismatch"),
        (("--pooled",), "schema_mismatch"),
    ):
        assert cli_main(_encode_args(tiny_llava, folder, out, "--append", *flags)) == 2
        assert f"[{code}]" in capsys.readouterr().err


def test_non_utf8_manifest_is_a_typed_error_naming_the_file(tiny_llava, tmp_path, capsys):
    manifest = tmp_path / "latin1.csv"
    manifest.write_bytes("uri\ncaf\xe9.jpg\n".encode("latin-1"))
    assert cli_main(_encode_args(tiny_llava, manifest, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "invalid_config" in err and str(manifest) in err and "not valid UTF-8" in err
    assert not (tmp_path / "out").exists()
