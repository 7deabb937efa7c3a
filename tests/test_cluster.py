"""The offline job on real multi-process Ray clusters: two nodes on one machine, and `ray job submit`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.constants import SUCCESS_FILE
from pipeline.job import run_job
from tests.corpus import write_real_photos
from tests.datasets import write_shards

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_cluster(tiny_llava, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        samples = write_shards(tmp_path / "shards", shards=4, per_shard=3)  # WebDataset tars
        config = load_config(
            None,
            {
                "model": {"checkpoint": str(tiny_llava), "dtype": "float32"},
                "input": {"keep_columns": ["caption"]},
                "job": {"shard_size": 1, "actors": (2, 2), "max_error_fraction": 0.0},
            },
        )
        summary = run_job(config, f"{tmp_path}/shards/{{00000..00003}}.tar", str(tmp_path / "out"))
        assert (
            summary.ok == len(samples) and summary.shards_written == len(samples) and summary.units_total == 4
        )
        table = pq.read_table(tmp_path / "out", columns=["image_id", "caption"])
        assert sorted(table.column("image_id").to_pylist()) == sorted(samples)
        assert all(samples[r["image_id"]]["caption"] == r["caption"] for r in table.to_pylist())
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ray_job_submit(tiny_llava, tmp_path):
    """`ray job submit --working-dir . -- llava-features encode ...` against a `ray start --head` cluster."""
    photos = write_real_photos(tmp_path / "photos")
    out = tmp_path / "out"
    gcs_port, dash_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs_port}",
            "--num-cpus=3",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        address = f"http://127.0.0.1:{dash_port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            probe = subprocess.run(
                [str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True
            )
            if probe.returncode == 0:
                break
            time.sleep(1)
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
                str(tmp_path / "photos"),
                "--output",
                str(out),
                "--dtype",
                "float32",
                "--shard-size",
                "2",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout.lower()
        assert f"ok:            {len(photos)}" in submit.stdout
        assert (out / SUCCESS_FILE).exists()
        assert pq.read_table(out, columns=["status"]).num_rows == len(photos)
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
