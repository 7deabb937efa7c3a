"""How the job finds Ray, and where it may write: each test runs the command line in its own process.

- an address nobody answers at (``RAY_ADDRESS`` or ``--address``) is a typed error, fast, and the
  output is never created;
- without one, the job starts its own local Ray, even when a stale cluster address is recorded on
  the host (where ``ray.init()`` would try to join it).

(A relative ``--output`` under ``ray job submit`` is refused: tests/test_cluster.py.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.table import SUCCESS_FILE
from tests.corpus import write_real_photos
from tests.fixtures.ray_cluster import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


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
    dead = f"127.0.0.1:{free_port()}"

    def attempt(extra: tuple[str, ...], env: dict[str, str], out: Path):
        started = time.monotonic()
        proc = _encode(tiny_llava, photos, out, *extra, env=env, timeout=240)
        return proc, time.monotonic() - started

    cases = {
        "RAY_ADDRESS": ((), _env(RAY_ADDRESS=dead)),
        "--address": (("--address", dead), _env()),
    }
    # The two commands are independent processes (mostly start-up and a refused connection): side by side.
    with ThreadPoolExecutor(len(cases)) as pool:
        runs = {
            source: (out, pool.submit(attempt, extra, env, out))
            for source, (extra, env) in cases.items()
            for out in [tmp_path / f"out-{source.strip('-')}"]
        }
    for source, (out, run) in runs.items():
        proc, seconds = run.result()
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert f"No Ray cluster answers at {dead}" in proc.stderr and source in proc.stderr
        assert "Traceback" not in proc.stderr and "Nothing was written" in proc.stderr
        assert not out.exists()  # never a half-initialised output
        assert seconds < 120


def test_without_an_address_a_local_ray_starts_even_beside_a_stale_cluster(tiny_llava, tmp_path):
    """``ray.init()`` joins the cluster recorded in ``<ray temp dir>/ray_current_cluster``; the job must
    start its own instead (here the recorded cluster is gone, as in the failure it replaces)."""
    photos = tmp_path / "photos"
    write_real_photos(photos, n=2)
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        (Path(ray_tmp) / "ray").mkdir()
        (Path(ray_tmp) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        out = tmp_path / "out"
        proc = _encode(tiny_llava, photos, out, env=_env(RAY_TMPDIR=ray_tmp), timeout=400)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "ok:            2" in proc.stdout and (out / SUCCESS_FILE).exists()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
