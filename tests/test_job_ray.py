"""How the job finds Ray, and where it may write: each test runs the command line in its own process.

- an address nobody answers at (``RAY_ADDRESS`` or ``--address``) is a typed error, fast, and the
  output is never created;
- without one, the job starts its own local Ray, even when a stale cluster address is recorded on
  the host (where ``ray.init()`` would try to join it);
- under ``ray job submit --working-dir``, a relative ``--output`` is refused (Ray deletes the
  working directory copy the driver runs in).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.constants import SUCCESS_FILE
from tests.corpus import write_real_photos

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def _encode(
    model: Path,
    inp: Path,
    out: Path | str,
    *extra: str,
    env: dict[str, str],
    timeout: float,
    cwd: Path = REPO,
):
    cmd = [sys.executable, "-m", "llava_features", "encode", "--model", str(model), "--input", str(inp)]
    cmd += ["--output", str(out), "--dtype", "float32", *extra]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_an_address_nobody_answers_at_fails_fast_and_writes_nothing(tiny_llava, tmp_path):
    photos = tmp_path / "photos"
    write_real_photos(photos, n=2)
    dead = f"127.0.0.1:{_free_port()}"
    for extra, env, source in (
        ((), _env(RAY_ADDRESS=dead), "RAY_ADDRESS"),
        (("--address", dead), _env(), "--address"),
    ):
        out = tmp_path / f"out-{source.strip('-')}"
        started = time.monotonic()
        proc = _encode(tiny_llava, photos, out, *extra, env=env, timeout=240)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert f"No Ray cluster answers at {dead}" in proc.stderr and source in proc.stderr
        assert "Traceback" not in proc.stderr and "Nothing was written" in proc.stderr
        assert not out.exists()  # never a half-initialised output
        assert time.monotonic() - started < 120


def test_without_an_address_a_local_ray_starts_even_beside_a_stale_cluster(tiny_llava, tmp_path):
    """``ray.init()`` joins the cluster recorded in ``<ray temp dir>/ray_current_cluster``; the job must
    start its own instead (here the recorded cluster is gone, as in the failure it replaces)."""
    photos = tmp_path / "photos"
    write_real_photos(photos, n=2)
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        (Path(ray_tmp) / "ray").mkdir()
        (Path(ray_tmp) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}")
        out = tmp_path / "out"
        proc = _encode(tiny_llava, photos, out, env=_env(RAY_TMPDIR=ray_tmp), timeout=400)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "ok:            2" in proc.stdout and (out / SUCCESS_FILE).exists()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_relative_output_is_refused_under_ray_job_submit(tiny_llava, tmp_path):
    photos = tmp_path / "photos"
    write_real_photos(photos, n=1)
    ports = {
        name: _free_port()
        for name in ("gcs", "dashboard", "node", "object", "client", "agent", "grpc", "metrics", "env")
    }
    env = _env(PATH=f"{BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="disabled")
    temp_dir = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={ports['gcs']}",
            "--num-cpus=1",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={ports['dashboard']}",
            f"--node-manager-port={ports['node']}",
            f"--object-manager-port={ports['object']}",
            f"--ray-client-server-port={ports['client']}",
            f"--dashboard-agent-listen-port={ports['agent']}",
            f"--dashboard-agent-grpc-port={ports['grpc']}",
            f"--metrics-export-port={ports['metrics']}",
            f"--runtime-env-agent-port={ports['env']}",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        address = f"http://127.0.0.1:{ports['dashboard']}"
        deadline = time.time() + 120
        while time.time() < deadline:
            probe = subprocess.run(
                [str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True
            )
            if probe.returncode == 0:
                break
            time.sleep(1)
        for _ in range(5):  # the job agent may register a little after `ray job list` answers
            submit = subprocess.run(
                [
                    str(BIN / "ray"),
                    "job",
                    "submit",
                    "--address",
                    address,
                    "--working-dir",
                    str(REPO),
                    "--",
                    "llava-features",
                    "encode",
                    "--model",
                    str(tiny_llava),
                    "--input",
                    str(photos),
                    "--output",
                    "features",
                    "--dtype",
                    "float32",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=400,
            )
            if "No available agent to submit job" not in submit.stdout + submit.stderr:
                break
            time.sleep(5)
        logs = submit.stdout + submit.stderr
        assert submit.returncode != 0, logs[-3000:]
        assert "is a relative path" in logs and "deletes" in logs and "s3://" in logs, logs[-3000:]
        assert "ok:  " not in logs  # never reported as a success
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
