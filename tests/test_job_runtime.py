"""The offline job on a real cluster: it never hangs silently, shows its progress, survives a node loss,
and reports faults in one line.

- the pieces without Ray: the preflight's packing and the decode reserve, the watchdog, the progress
  counts and rate;
- case (a): a cluster whose CPUs are held so that the actors and a decode task cannot both run: the job
  fails fast (exit 5, nothing written) naming the shortfall, and the flag it names fixes it;
- a planted stall (a decode task that sleeps): the watchdog warns, then stops the job with Ray's
  diagnosis; the progress and the job's Prometheus metrics count exactly what was written; --resume
  completes the table;
- case (b): a two-node cluster whose worker node is killed mid-job: every row exactly once;
- faults as one line with a documented exit code and the summary: an output that is a file, a
  read-only output, a disk that fills mid-job (then --resume after freeing space: every row once);
- a local Ray the job started is stopped completely after SIGTERM (exit 130) and after SIGKILL of the
  driver (the reaper).

Small corpora and short watchdog limits (set in the config) keep it quick.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llava_features.cli import (
    EXIT_CLUSTER_TOO_SMALL,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_STOPPED,
)
from llava_features.cli import main as cli_main
from pipeline.config import load_config
from pipeline.model.errors import ConfigError, ErrorCode, JobStoppedError, LlavaFeaturesError
from pipeline.offline import Progress, run_job
from pipeline.offline.progress import ProgressTracker
from pipeline.offline.resources import Demand, NodeResources, actor_cpus, fit_actors, preflight
from pipeline.offline.watchdog import StallError, Watchdog
from pipeline.records import ShardSummary
from pipeline.table import SUCCESS_FILE, DataFile, read_features
from tests.corpus import write_real_photos
from tests.fixtures.ray_cluster import free_port, local_ray, two_node_cluster

REPO = Path(__file__).resolve().parent.parent
GB = 1e9


def _node(name: str, cpus: float, free_cpus: float, *, gpus: float = 0.0, free_gpus: float | None = None):
    total = {"CPU": cpus, "GPU": gpus, "memory": 16 * GB}
    free = {"CPU": free_cpus, "GPU": gpus if free_gpus is None else free_gpus, "memory": 16 * GB}
    return NodeResources(address=name, total=total, free=free)


# -- the pieces, without Ray -------------------------------------------------------------------------


def test_the_decode_reserve_and_the_preflight_packing():
    decode = Demand(cpus=1.0, memory=2 * GB)
    two_by_two = [_node("a", 2, 2), _node("b", 2, 2)]
    # After a node loss two actors may land on one 2-CPU node: each reserves half a CPU
    assert actor_cpus(two_by_two, requested=1.0, actors_max=2, gpus=0.0, decode=decode) == 0.5
    assert actor_cpus(two_by_two, requested=0.25, actors_max=2, gpus=0.0, decode=decode) == 0.25
    # GPU actors: at most as many per node as it has GPUs; CPU-only nodes hold none
    gpu_nodes = [_node("g", 8, 8, gpus=4), _node("c", 16, 16)]
    assert actor_cpus(gpu_nodes, requested=1.0, actors_max=8, gpus=1.0, decode=decode) == 1.0
    assert actor_cpus(gpu_nodes, requested=4.0, actors_max=8, gpus=1.0, decode=decode) == 1.75

    # case (a): Serve holds 0.5 and 0.25 CPU of two 2-CPU nodes; two 1-CPU actors and a decode task
    # need three whole CPUs on nodes with 1.5 and 1.75 free: room for one actor beside the decode task
    held = [_node("a", 2, 1.5), _node("b", 2, 1.75)]
    one_cpu = Demand(cpus=1.0)
    assert fit_actors(held, one_cpu, decode) == 1
    assert fit_actors(held, Demand(cpus=0.5), decode) == 4  # the decode reserve's share fits
    assert fit_actors([_node("a", 2, 0.5)], one_cpu, decode) == -1  # no room for a decode task
    with pytest.raises(LlavaFeaturesError) as info:
        preflight(
            lambda: held, actor=one_cpu, actors=(2, 2), decode=decode, shard_size=256, wait_s=0, settle_s=0
        )
    message = info.value.message
    assert info.value.code == ErrorCode.INSUFFICIENT_RESOURCES
    assert "2 encoder actor(s) (1 CPU each) and one decode task (1 CPU, 2.0 GB memory)" in message
    assert "room for 1 of them beside a decode task" in message and "--actors 1,2" in message
    assert "--num-cpus-per-actor 0.5" in message and "0.75 CPU" in message  # what others hold
    assert "2 node(s) of 2 CPU, 0 GPU, 16 GB" in message and "Nothing was written" in message
    preflight(
        lambda: held,
        actor=Demand(cpus=0.5),
        actors=(2, 2),
        decode=decode,
        shard_size=256,
        wait_s=0,
        settle_s=0,
    )

    # without a wait, the check still looks again for a few seconds (what a job that just ended held)
    looks = iter([held, [_node("a", 2, 2), _node("b", 2, 2)]])
    ticks = iter(range(100))
    preflight(
        lambda: next(looks),
        actor=one_cpu,
        actors=(2, 2),
        decode=decode,
        shard_size=256,
        wait_s=0,
        clock=lambda: float(next(ticks)),
        sleep=lambda s: None,
    )

    # waiting for an autoscaling cluster: room comes on the third look
    looks = iter([held, held, [*held, _node("new", 2, 2)]])
    clock = iter(range(100))
    preflight(
        lambda: next(looks),
        actor=one_cpu,
        actors=(2, 2),
        decode=decode,
        shard_size=256,
        wait_s=30,
        clock=lambda: float(next(clock)),
        sleep=lambda s: None,
    )
    memory_short = [NodeResources("m", {"CPU": 4, "memory": GB}, {"CPU": 4, "memory": GB})]
    with pytest.raises(LlavaFeaturesError, match="a smaller --shard-size"):
        preflight(
            lambda: memory_short,
            actor=None,
            actors=(1, 1),
            decode=decode,
            shard_size=256,
            wait_s=0,
            settle_s=0,
        )


def test_the_watchdog_warns_then_stops(caplog):
    looks = []
    watchdog = Watchdog(warn_s=10, fail_s=30, diagnose=lambda: looks.append(1) or "2 decode task(s) waiting")
    with caplog.at_level(logging.WARNING, logger="pipeline.offline.watchdog"):
        for idle in (0, 9, 10, 11, 19, 20, 0, 10):
            watchdog.check(idle)
        with pytest.raises(StallError) as info:
            watchdog.check(30)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3 and len(looks) == 4  # at 10 and 20, again at 10 after progress; the failure
    assert "No data file written and no unit committed for 10 s" in warnings[0]
    assert (
        warnings[0].endswith("2 decode task(s) waiting")
        and info.value.diagnosis == "2 decode task(s) waiting"
    )
    # its limits, and the progress and preflight settings, are checked config values naming their keys
    with pytest.raises(ConfigError, match=r"job.stall_fail_s \(300\) must be above job.stall_warn_s \(300\)"):
        load_config(None, {"job": {"stall_warn_s": 300, "stall_fail_s": 300}})
    for key, bad in (("stall_warn_s", 0), ("progress_interval_s", -1), ("resource_wait_s", -5)):
        with pytest.raises(ConfigError, match=f"job.{key}"):
            load_config(None, {"job": {key: bad}})


def _summary(unit: int, rows: int, ok: int, size: int, **errors: int) -> ShardSummary:
    file = DataFile(path=f"part-{unit}.parquet", size=size, rows=rows)
    return ShardSummary(shard=unit, piece=0, last=True, rows=rows, ok=ok, errors=errors, file=file)


def test_the_progress_counts_rate_and_time_left():
    now = [100.0]
    tracker = ProgressTracker(images_planned=40, units_planned=4, clock=lambda: now[0])
    now[0] = 110.0
    tracker.file(_summary(0, 10, 9, 1000, truncated=1))
    tracker.committed(1)
    first = tracker.snapshot()
    assert (first.images, first.ok, first.errors, first.files, first.bytes_written) == (
        10,
        9,
        {"truncated": 1},
        1,
        1000,
    )
    assert first.units_committed == 1 and first.fraction == 0.25
    assert first.images_per_s == pytest.approx(1.0) and first.eta_s == pytest.approx(30.0)
    now[0] = 170.0
    for unit in (1, 2):
        tracker.file(_summary(unit, 10, 10, 1000))
    tracker.committed(3)
    now[0] = 180.0
    later = tracker.snapshot()
    # the rate over the last minute (from the newest snapshot at least a minute old): 20 images in 70 s
    assert later.images == 30 and later.units_committed == 3 and later.idle_s == pytest.approx(10.0)
    assert later.images_per_s == pytest.approx(20 / 70) and later.eta_s == pytest.approx(10 / (20 / 70))
    unknown = ProgressTracker(images_planned=None, units_planned=4, clock=lambda: now[0])
    unknown.committed(2)
    assert unknown.snapshot().fraction == 0.5


def test_the_command_line_draws_a_bar_in_a_terminal_and_lines_elsewhere():
    import io

    from llava_features.render import ProgressPrinter, progress_line

    def snapshot(images: int, done: bool = False) -> Progress:
        return Progress(
            images=images,
            images_planned=40,
            ok=images - 1,
            errors={"truncated": 1},
            files=images // 10,
            bytes_written=images * 1000,
            units_committed=images // 10,
            units_planned=4,
            elapsed_s=20.0,
            images_per_s=2.0,
            eta_s=(40 - images) / 2.0,
            idle_s=0.0,
            done=done,
        )

    assert progress_line(snapshot(10)) == (
        "progress: 10/40 images (25.0%) · 2.0 images/s · ETA 15s · errors 1 (truncated 1) · units 1/4 committed"
        " · 1 files, 10.0 kB"
    )
    log = io.StringIO()
    printer = ProgressPrinter(log, interval_s=3600, terminal=False)
    for images in (10, 20, 30):
        printer(snapshot(images))
    printer(snapshot(40, done=True))
    lines = log.getvalue().splitlines()
    assert (
        len(lines) == 2 and lines[0].startswith("progress: 10/40") and " · done · " in lines[1]
    )  # first, last
    tty = io.StringIO()
    bar = ProgressPrinter(tty, interval_s=3600, terminal=True)
    for images in (10, 20):
        bar(snapshot(images))
    bar.close()
    drawn = tty.getvalue()
    assert drawn.count("\r[") == 2 and drawn.endswith("\n") and "[######" + "." * 18 + "] 10/40" in drawn


# -- on a local Ray --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def ray_local(metrics_port):
    """A local Ray of 4 CPUs exporting Prometheus metrics every half second on a free port."""
    import ray

    with local_ray(
        num_cpus=4,
        include_dashboard=False,
        logging_level="WARNING",
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 500},
    ):
        yield ray


def _config(model: Path, **job):
    return load_config(
        None,
        {
            "model": {"checkpoint": str(model), "dtype": "float32"},
            "job": {"shard_size": 1, "commit_interval_s": 0.05, "max_error_fraction": 1.0, **job},
        },
    )


@contextlib.contextmanager
def _held_cpus(ray, cpus: float):
    """An actor that holds ``cpus`` CPUs of the cluster (Serve replicas, another job) while in the block."""

    @ray.remote(num_cpus=cpus)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote(), timeout=120)
    try:
        yield
    finally:
        ray.kill(holder)
        time.sleep(1)  # the CPUs are back before the next test plans


@pytest.mark.slow
def test_a_cluster_too_small_fails_fast_naming_the_flag_that_fixes_it(
    ray_local, tiny_llava, tmp_path, capsys
):
    """Case (a): 2.5 of 4 CPUs held; a 1-CPU actor and a decode task do not fit beside each other: exit 5
    within seconds, nothing written, naming --num-cpus-per-actor; with it, the job runs (and its
    rows include a file whose name is not UTF-8, stored escaped)."""
    images = tmp_path / "images"
    write_real_photos(images, n=2)
    odd = os.path.join(os.fsencode(images), b"odd\xff name.jpg")
    shutil.copy(next(images.iterdir()), odd)
    out = tmp_path / "out"
    argv = [
        "encode",
        "--model",
        str(tiny_llava),
        "--input",
        str(images),
        "--output",
        str(out),
        "--dtype",
        "float32",
    ]
    with _held_cpus(ray_local, 2.5):
        started = time.monotonic()
        code = cli_main(argv)
        err = capsys.readouterr().err
        assert code == EXIT_CLUSTER_TOO_SMALL, err
        assert time.monotonic() - started < 90
        (line,) = [line for line in err.splitlines() if line.startswith("error:")]
        assert "[insufficient_resources] The cluster cannot run this job now" in line
        assert "room for 0 of them beside a decode task" in line and "--num-cpus-per-actor 0.5" in line
        assert "2.5 CPU" in line and "Nothing was written" in line and "Traceback" not in err
        assert not out.exists()
        assert cli_main([*argv, "--num-cpus-per-actor", "0.5", "--shard-size", "2"]) == 0
    table = read_features(out, status=None, column=None)
    assert sorted(table.image_ids) == sorted(
        [p.name for p in images.iterdir() if p.name.isascii()] + ["odd\\xff name.jpg"]
    )
    assert table.state == "complete" and set(table.table.column("status").to_pylist()) == {"ok"}


def _scrape(port: int, job: str) -> dict[str, float]:
    """The job's ``ray_llava_features_job_*`` series on Ray's Prometheus endpoint (``code`` tags kept)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        match = re.match(r"^ray_(llava_features_job_\w+)\{(.*)\} (\S+)$", line)
        if match and f'job="{job}"' in match.group(2):
            code = re.search(r'code="([^"]+)"', match.group(2))
            out[match.group(1) + (f"[{code.group(1)}]" if code else "")] = float(match.group(3))
    return out


STUCK = "z-stuck.jpg"
STALL_FAIL_S = 30


def sleepy_decode_unit(batch, **kwargs):
    """decode_unit, but the unit of ``STUCK`` sleeps first (until its folder holds ``release``): a planted stall."""
    from pipeline.offline.decode import decode_unit

    for uri in batch["uri"][0]:
        if str(uri).endswith(STUCK):
            release = Path(str(uri)).parent.parent / "release"
            deadline = time.monotonic() + 120
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
    yield from decode_unit(batch, **kwargs)


@pytest.mark.slow
def test_a_planted_stall_is_diagnosed_and_stopped_then_resumed(
    ray_local, metrics_port, tiny_llava, tmp_path, monkeypatch, caplog
):
    """A decode task that sleeps: a warning after job.stall_warn_s, then the job stops at job.stall_fail_s
    with Ray's diagnosis, having committed every other unit; the progress and the Prometheus metrics count
    exactly those; --resume completes the table, every row once."""
    import pipeline.offline.driver as driver

    images = tmp_path / "in" / "images"
    write_real_photos(images, n=3)
    (images / "b-broken.jpg").write_bytes(b"not an image at all")
    shutil.copy(images / sorted(os.listdir(images))[0], images / STUCK)
    out = tmp_path / "out"
    # The limits are above the job's start-up on a busy 2-core machine (no file before its actors are up):
    # on this module's running Ray the whole test, start-up included, took 16 s beside the stall at a
    # load average of 7-15.
    config = _config(tiny_llava, stall_warn_s=4, stall_fail_s=STALL_FAIL_S)
    monkeypatch.setattr(driver, "decode_unit", sleepy_decode_unit)
    seen: list[Progress] = []
    during: dict[str, float] = {}

    def progress(p: Progress) -> None:
        seen.append(p)
        if p.units_committed == 4 and not during and p.idle_s > 2:  # stalled: what Prometheus shows now
            job = read_features(out, status=None, column=None).identity.job
            during.update(_scrape(metrics_port, job), job=job)  # type: ignore[arg-type]

    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="pipeline.offline"),
        pytest.warns(UserWarning, match="state: in_progress"),
        pytest.raises(JobStoppedError) as info,
    ):
        run_job(config, str(images), str(out), progress=progress)
    assert time.monotonic() - started < 240
    stopped = info.value
    assert stopped.code == ErrorCode.STALLED, stopped
    assert f"for {STALL_FAIL_S} s (job.stall_fail_s)" in stopped.message and "--resume" in stopped.message
    assert "nothing waits for resources" in stopped.message  # the stuck task runs: it is not Ray's doing
    warned = [r.getMessage() for r in caplog.records if r.name == "pipeline.offline.watchdog"]
    assert warned and "No data file written and no unit committed" in warned[0]
    summary = stopped.summary
    assert (summary.state, summary.units_written, summary.read) == ("interrupted", 4, 4)
    assert (summary.ok, summary.errors) == (3, {"not_an_image": 1})

    last = seen[-1]
    assert last.done and (last.images, last.images_planned, last.ok) == (4, 5, 3)
    assert last.errors == {"not_an_image": 1} and (last.units_committed, last.units_planned) == (4, 5)
    assert last.files == 4 and last.bytes_written == summary.bytes_written > 0
    assert all(a.images <= b.images for a, b in itertools.pairwise(seen))
    wanted = {
        "llava_features_job_images_total": 4.0,
        "llava_features_job_errors_total[not_an_image]": 1.0,
        "llava_features_job_units_total": 4.0,
        "llava_features_job_files_total": 4.0,
        "llava_features_job_bytes_written_total": float(summary.bytes_written),
    }
    job = during.pop("job")
    planned = {"llava_features_job_images_planned": 5.0, "llava_features_job_units_planned": 5.0}
    assert {k: v for k, v in during.items() if k in planned} == planned  # gauges of a running job

    def counters() -> dict[str, float]:
        return {k: v for k, v in _scrape(metrics_port, job).items() if k not in planned}

    deadline = time.monotonic() + 60  # counters are exported every half second: the last ones may lag
    while (got := counters()) != wanted:
        assert time.monotonic() < deadline, got
        time.sleep(1)

    (tmp_path / "in" / "release").touch()
    monkeypatch.undo()
    resumed = run_job(config, str(images), str(out), mode="resume")
    assert (resumed.state, resumed.units_written, resumed.units_skipped) == ("complete", 1, 4)
    table = read_features(out, status=None, column=None)
    assert sorted(table.image_ids) == sorted(os.listdir(images))  # every row exactly once
    assert (out / SUCCESS_FILE).exists()


# -- case (b): a node lost mid-job -------------------------------------------------------------------------


def _actor_nodes(cluster) -> dict[int, str]:
    """{pid: "head" | "worker"} of the encoder actors, by the raylet they descend from."""
    import psutil

    raylets = {}
    for name, node in [("head", cluster.head_node), *[("worker", n) for n in cluster.worker_nodes]]:
        for info in node.all_processes.get("raylet", []):
            raylets[info.process.pid] = name
    out = {}
    for pid, name in raylets.items():
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if "EncodeShardActor" in " ".join(child.cmdline()):
                        out[child.pid] = name
    return out


@pytest.mark.slow
def test_a_worker_node_lost_mid_job_every_row_once(tiny_llava, tmp_path, caplog):
    """Case (b): 2 nodes × 2 CPUs, --actors 2,2; the worker node is killed mid-job. The decode reserve
    (actors of half a CPU) leaves a decode task room on the head even with both actors there: the job
    completes with every row exactly once (or, should Ray not recover, stops within the watchdog's limit
    and --resume completes it)."""
    images = tmp_path / "images"
    write_real_photos(images, n=4)
    for i in range(20):
        shutil.copy(sorted(images.iterdir())[i % 4], images / f"copy-{i:02d}.jpg")
    expected = sorted(os.listdir(images))
    config = _config(tiny_llava, actors=(2, 2), stall_warn_s=20, stall_fail_s=120)
    out = tmp_path / "out"
    with two_node_cluster(head_cpus=2, worker_cpus=2) as (cluster, worker), ThreadPoolExecutor(1) as pool:
        with caplog.at_level(logging.INFO, logger="pipeline.offline.driver"):
            job = pool.submit(run_job, config, str(images), str(out))
            deadline = time.monotonic() + 240
            while not job.done() and time.monotonic() < deadline:
                if len(list(out.glob("part-*.parquet"))) >= 3 and len(_actor_nodes(cluster)) == 2:
                    break
                time.sleep(0.1)
            placed = _actor_nodes(cluster)
            assert not job.done(), job.exception()
            cluster.remove_node(worker, allow_graceful=False)  # the worker node dies mid-job
            error = job.exception(timeout=400)
        assert any("reserve 0.5 CPU each" in r.getMessage() for r in caplog.records)
        if error is not None:  # Ray did not recover: stopped with the diagnosis, and --resume completes it
            assert isinstance(error, JobStoppedError) and error.code == ErrorCode.STALLED, error
            run_job(config, str(images), str(out), mode="resume")
        table = read_features(out, status=None, column=None)
        assert sorted(table.image_ids) == expected and table.state == "complete", placed
        print("encoder actors before the node loss:", placed, "stopped:" if error else "completed", error)


# -- faults, as a user sees them ---------------------------------------------------------------------------


def _cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    base = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", **(env or {})}
    base.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "llava_features", *argv],
        cwd=REPO,
        env=base,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_an_output_that_is_a_file_is_one_line(tiny_llava, tmp_path, capsys):
    images = tmp_path / "images"
    write_real_photos(images, n=1)
    target = tmp_path / "features.parquet"
    target.write_bytes(b"someone's file")
    code = cli_main(["encode", "--model", str(tiny_llava), "--input", str(images), "--output", str(target)])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR
    (line,) = _error_lines(err)
    assert f"Output {target} is a file" in line and "--resume" not in err and "Traceback" not in err
    assert target.read_bytes() == b"someone's file"


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


needs_unshare = pytest.mark.skipif(
    not _unshare_works(), reason="needs unprivileged mount namespaces (unshare -rm) for a small tmpfs"
)


def _in_namespace(script: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``script`` (sh) in its own user + mount namespace: it may mount a tmpfs of a set size."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
@needs_unshare
def test_a_full_disk_stops_with_one_line_and_resume_completes(tiny_llava, tmp_path):
    """The output on a 200 kB tmpfs: the job stops when it is full (exit 7, the summary, one error line, no
    traceback); after the tmpfs grows, --resume completes it with every row once."""
    images = tmp_path / "images"
    write_real_photos(images, n=4)
    for i in range(26):
        shutil.copy(sorted(images.iterdir())[i % 4], images / f"copy-{i:02d}.jpg")
    mnt, copy = tmp_path / "mnt", tmp_path / "copy"
    mnt.mkdir()
    encode = (
        f"{sys.executable} -m llava_features encode --model {tiny_llava} --input {images} --output {mnt}/out "
        "--dtype float32 --shard-size 1 --commit-interval-s 0.05"
    )
    script = (
        f"mount -t tmpfs -o size=200k tmpfs {mnt} && mkdir {mnt}/out || exit 99\n"
        f"{encode} > {tmp_path}/first.out 2> {tmp_path}/first.err; echo first=$?\n"
        f"mount -o remount,size=20m {mnt}\n"
        f"{encode} --resume > {tmp_path}/resume.out 2> {tmp_path}/resume.err; echo resume=$?\n"
        f"cp -r {mnt}/out {copy}\n"
    )
    proc = _in_namespace(script)
    first_err = (tmp_path / "first.err").read_text()
    assert f"first={EXIT_STOPPED}" in proc.stdout, proc.stdout + proc.stderr + first_err[-4000:]
    (line,) = _error_lines(first_err)
    assert "[output_write_failed]" in line and "No space left on device" in line and "--resume" in line
    assert "Traceback" not in first_err and "DataContext" not in first_err
    first_out = (tmp_path / "first.out").read_text()
    assert "(Delta table version" in first_out and "interrupted)" in first_out
    assert "resume=0" in proc.stdout, (tmp_path / "resume.err").read_text()[-4000:]
    table = read_features(copy, status=None, column=None)
    assert sorted(table.image_ids) == sorted(os.listdir(images)) and table.state == "complete"


@pytest.mark.slow
@needs_unshare
def test_a_read_only_output_is_one_line(tiny_llava, tmp_path):
    images = tmp_path / "images"
    write_real_photos(images, n=1)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (
        f"mount -t tmpfs -o size=1m tmpfs {mnt} && mkdir {mnt}/out && mount -o remount,ro {mnt} || exit 99\n"
        f"exec {sys.executable} -m llava_features encode --model {tiny_llava} --input {images} --output {mnt}/out\n"
    )
    proc = _in_namespace(script, timeout=400)
    assert proc.returncode == EXIT_ERROR, proc.stderr[-4000:]
    (line,) = _error_lines(proc.stderr)
    assert "Read-only file system" in line and "Traceback" not in proc.stderr


# -- stopping the local Ray the job started ----------------------------------------------------------------


def _descendants(pid: int, seen: dict[int, float]) -> None:
    import psutil

    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                seen[child.pid] = child.create_time()


def _alive(seen: dict[int, float]) -> list[int]:
    import psutil

    out = []
    for pid, created in seen.items():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
    return out


def _run_until_committed(
    argv: list[str], out: Path, sig: int, units: int
) -> tuple[subprocess.Popen, dict[int, float], str, str]:
    """Start ``llava-features ARGV`` (its own local Ray), note its process tree, send ``sig`` once ``units``
    units are committed; returns the process, every descendant seen, stdout and stderr."""
    import deltalake
    import ray  # noqa: F401  (psutil comes with Ray)

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "llava_features", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: dict[int, float] = {}
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        _descendants(proc.pid, seen)
        with contextlib.suppress(Exception):
            if len(deltalake.DeltaTable(str(out)).file_uris()) >= units:
                proc.send_signal(sig)
                break
        time.sleep(0.2)
    _descendants(proc.pid, seen)
    stdout, stderr = proc.communicate(timeout=120)
    return proc, seen, stdout, stderr


@pytest.mark.slow
def test_the_local_ray_is_stopped_after_sigterm_and_after_sigkill(tiny_llava, tmp_path):
    """SIGTERM: the job commits what is ready, prints its summary and one line, exits 130, and every process
    of its local Ray is gone. SIGKILL of the driver: the reaper stops them all."""
    images = tmp_path / "images"
    write_real_photos(images, n=4)
    for i in range(36):
        shutil.copy(sorted(images.iterdir())[i % 4], images / f"copy-{i:02d}.jpg")
    out = tmp_path / "out"
    argv = ["encode", "--model", str(tiny_llava), "--input", str(images), "--output", str(out)]
    argv += ["--shard-size", "1", "--commit-interval-s", "0.05"]
    proc, seen, stdout, stderr = _run_until_committed(argv, out, signal.SIGTERM, units=2)
    assert proc.returncode == EXIT_INTERRUPTED, stderr[-4000:]
    (line,) = _error_lines(stderr)
    assert "[interrupted] Interrupted (signal SIGTERM)" in line and "--resume" in line
    assert "interrupted)" in stdout and "Traceback" not in stderr
    assert len(seen) >= 5 and _alive(seen) == []  # GCS, raylet, agents, workers: all gone

    proc, seen, _, _ = _run_until_committed([*argv, "--resume"], out, signal.SIGKILL, units=6)
    assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while _alive(seen) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _alive(seen) == []
