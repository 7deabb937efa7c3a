"""The offline job and the endpoint on real multi-process Ray clusters, the way a user runs them.

- two nodes on one machine (``ray.cluster_utils.Cluster``);
- ``ray job submit --working-dir . -- llava-features encode ...`` and ``serve deploy
  configs/serve.yaml`` / ``serve status`` / ``serve shutdown`` against a ``ray start --head``
  cluster with token authentication ON (Ray's default since 2.59/2.60), the client given the
  cluster's token through ``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN_PATH``;
- that the cluster really refuses clients without the token;
- that all of it works beside another Ray on the same machine (on Ray's default ports).

The ``ray start`` clusters come from tests/fixtures/ray_cluster.py: a free port for every
component, their own temp dir and token, and only they are stopped afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from deployments import http as H
from pipeline.config import load_config
from pipeline.offline import run_job
from pipeline.table import SUCCESS_FILE, read_features
from tests.corpus import png_bytes, write_real_photos
from tests.datasets import write_shards
from tests.fixtures.ray_cluster import (
    DEFAULT_HEAD_PORTS,
    RAY_DEFAULT_PORTS,
    RayHead,
    free_port,
    port_is_free,
    ray_head,
    run_cli,
    two_node_cluster,
)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def test_two_node_cluster(tiny_llava, tmp_path):
    import ray

    with two_node_cluster(head_cpus=2, worker_cpus=2):
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
        assert (summary.ok, summary.units_total, summary.state) == (len(samples), 4, "complete")
        assert summary.files_written == summary.files_total == len(samples)  # one file per sample
        table = read_features(tmp_path / "out", columns=["image_id", "caption"], column=None).table
        assert table.column("image_id").to_pylist() == sorted(samples)  # every sample once, in order
        assert all(samples[r["image_id"]]["caption"] == r["caption"] for r in table.to_pylist())


# -- ray job submit ------------------------------------------------------------------------------


def _submit_encode_job(head: RayHead, tiny_llava: Path, tmp_path: Path) -> None:
    """`ray job submit --working-dir . -- llava-features encode ...` succeeds on ``head`` (with its
    token) and writes one row per photo."""
    photos = write_real_photos(tmp_path / "photos")
    out = tmp_path / "out"
    submit = run_cli(
        [
            "ray",
            "job",
            "submit",
            "--address",
            head.dashboard_url,
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
        env=head.client_env(),
        timeout=400,
        cwd=tmp_path,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:] + head.logs()
    assert "succeeded" in submit.stdout.lower()
    assert f"ok:            {len(photos)}" in submit.stdout
    assert (out / SUCCESS_FILE).exists()
    got = read_features(out, columns=["image_id"], column=None)
    assert got.state == "complete" and sorted(got.image_ids) == sorted(p.name for p in photos)


def test_ray_job_submit(ray_head_cluster, tiny_llava, tmp_path):
    """`ray job submit --working-dir . -- llava-features encode ...` against a `ray start --head`
    cluster with token auth on, the client holding the token (RAY_AUTH_MODE=token,
    RAY_AUTH_TOKEN_PATH)."""
    assert ray_head_cluster.http("/api/authentication_mode") == (200, '{"authentication_mode": "token"}')
    _submit_encode_job(ray_head_cluster, tiny_llava, tmp_path)


def test_relative_output_is_refused_under_ray_job_submit(ray_head_cluster, tiny_llava, tmp_path):
    """Under `ray job submit --working-dir`, the driver runs in a temporary copy of the working
    directory that Ray deletes: a relative local --output is refused before anything is written."""
    head = ray_head_cluster
    write_real_photos(tmp_path / "photos", n=1)
    submission = f"relative-output-{os.getpid()}"
    args = ["--working-dir", str(REPO), "--submission-id", submission, "--", "llava-features", "encode"]
    args += ["--model", str(tiny_llava), "--input", str(tmp_path / "photos"), "--output", "features"]
    submit = run_cli(
        ["ray", "job", "submit", "--address", head.dashboard_url, *args],
        env=head.client_env(),
        timeout=400,
        cwd=tmp_path,
    )
    # The streamed tail may end before the driver's last lines: read the job's whole log.
    logs = run_cli(["ray", "job", "logs", "--address", head.dashboard_url, submission], env=head.client_env())
    text = submit.stdout + submit.stderr + logs.stdout
    assert submit.returncode != 0, text[-3000:]
    assert "is a relative path" in text and "deletes" in text and "s3://" in text, text[-3000:]
    assert "ok:  " not in text  # never reported as a success


# -- serve deploy ---------------------------------------------------------------------------------


def _serve_config_copy(tmp_path: Path, http_port: int) -> Path:
    """configs/serve.yaml as shipped, but on ``http_port`` and with the demo model at an absolute path
    (the shipped relative one resolves against the directory the app is built in)."""
    config = yaml.safe_load((REPO / "configs/serve.yaml").read_text())
    config["http_options"]["port"] = http_port
    app = config["applications"][0]
    assert app["args"]["model"] == ".demo/tiny-llava" and app["args"]["make_tiny_if_missing"] is True
    app["args"]["model"] = str(tmp_path / ".demo/tiny-llava")
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _serve_app_status(head: RayHead, env: dict[str, str]) -> str | None:
    r = run_cli(["serve", "status", "--address", head.dashboard_url], env, timeout=60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    status = yaml.safe_load(r.stdout) or {}
    return ((status.get("applications") or {}).get("llava-features") or {}).get("status")


def test_serve_deploy_status_shutdown(ray_head_cluster, tmp_path):
    """`serve deploy configs/serve.yaml` (HTTP port moved to a free one), `serve status` until
    RUNNING, requests to the endpoint, `serve shutdown`: all against the auth-on cluster."""
    head = ray_head_cluster
    env = head.client_env()
    http_port = free_port()
    config = _serve_config_copy(tmp_path, http_port)
    deploy = run_cli(["serve", "deploy", str(config), "--address", head.dashboard_url], env, cwd=tmp_path)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    try:
        deadline = time.monotonic() + 300
        status = None
        while time.monotonic() < deadline:
            status = _serve_app_status(head, env)
            if status in ("RUNNING", "DEPLOY_FAILED"):
                break
            time.sleep(3)
        assert status == "RUNNING", (status, head.logs())
        assert (tmp_path / ".demo/tiny-llava/config.json").is_file()  # make_tiny_if_missing wrote it
        base = f"http://127.0.0.1:{http_port}"
        health = httpx.get(f"{base}/healthz", timeout=60)
        assert health.status_code == 200 and health.json()["status"] == "ok", health.text
        r = httpx.post(
            f"{base}/v1/features",
            content=png_bytes(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)),
            headers={"content-type": "image/png"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        features = H.load_npy(r.content)
        assert features.ndim == 2 and features.shape[0] > 0
    finally:
        shutdown = run_cli(["serve", "shutdown", "--address", head.dashboard_url, "--yes"], env)
    assert shutdown.returncode == 0, shutdown.stdout[-2000:] + shutdown.stderr[-2000:]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _serve_app_status(head, env) is not None:
        time.sleep(2)
    assert _serve_app_status(head, env) is None


# -- auth is really on ---------------------------------------------------------------------------


def test_clients_without_the_token_are_refused(ray_head_cluster, tmp_path):
    """The dashboard (job and Serve REST APIs) and the GCS refuse a client without the cluster's
    token, or with another token; the same client with the token gets in."""
    head = ray_head_cluster
    # The HTTP API: 401 without a token, 403 with a wrong one, 200 with the cluster's.
    assert head.http("/api/jobs/")[0] == 401
    assert head.http("/api/jobs/", token="0" * 64)[0] == 403
    assert head.http("/api/jobs/", token=head.token)[0] == 200

    home = tmp_path / "home"  # no ~/.ray/auth_token there: the client has no token at all
    home.mkdir()
    anonymous = head.unauthenticated_env(home)
    wrong_file = tmp_path / "wrong_token"
    wrong_file.write_text("f" * 64)
    wrong = {**head.client_env(HOME=str(home)), "RAY_AUTH_TOKEN_PATH": str(wrong_file)}

    # Every client below is its own process (mostly Python start-up): run them side by side.
    probe = [sys.executable, "-c", "import ray; ray.init(); print('CONNECTED')"]
    env = head.client_env()
    jobs, serve = (
        ["ray", "job", "list", "--address", head.dashboard_url],
        ["serve", "status", "--address", head.dashboard_url],
    )
    with ThreadPoolExecutor(max_workers=8) as pool:
        refused_cli = {
            (name, expected): [pool.submit(run_cli, jobs, e), pool.submit(run_cli, serve, e)]
            for name, e, expected in (
                ("anonymous", anonymous, "Missing authentication token"),
                ("wrong", wrong, "Invalid authentication"),
            )
        }
        # The GCS (gRPC): a driver without the token cannot connect; with it, it does.
        refused = pool.submit(
            subprocess.run, probe, env=anonymous, capture_output=True, text=True, timeout=180
        )
        allowed_cli = pool.submit(run_cli, jobs, env)
        connected = pool.submit(subprocess.run, probe, env=env, capture_output=True, text=True, timeout=180)
        for (_, expected), (job_list, serve_status) in refused_cli.items():
            out = job_list.result()
            assert out.returncode != 0 and expected in out.stdout + out.stderr, out.stderr[-2000:]
            assert "AuthenticationError" in out.stdout + out.stderr
            out = serve_status.result()
            assert out.returncode != 0 and expected in out.stdout + out.stderr, out.stderr[-2000:]
        out = refused.result()
        assert out.returncode != 0 and "CONNECTED" not in out.stdout, out.stdout[-2000:]
        assert "authentication" in out.stderr.lower(), out.stderr[-2000:]
        # ... and with the token, both get in.
        assert allowed_cli.result().returncode == 0
        out = connected.result()
        assert out.returncode == 0 and "CONNECTED" in out.stdout, out.stderr[-2000:]


# -- beside another Ray ---------------------------------------------------------------------------


@pytest.fixture
def foreign_ray() -> contextlib.AbstractContextManager:
    """Someone else's Ray on this machine, on Ray's default ports (GCS 6379, dashboard 8265, dashboard
    agent 52365, Ray client 10001, workers 10002-19999), with its own token."""
    taken = {name: port for name, port in RAY_DEFAULT_PORTS.items() if not port_is_free(port)}
    if taken:
        pytest.skip(f"Ray's default ports are in use on this machine: {taken}")
    with ray_head(num_cpus=1, default_ports=True) as foreign:
        yield foreign


def test_job_submit_beside_another_ray_on_default_ports(foreign_ray, tiny_llava, tmp_path):
    """With another Ray holding Ray's default ports (the situation that made `make test` fail with
    "No available agent to submit job"), our cluster starts on free ports and the job goes through."""
    held = [p for p in DEFAULT_HEAD_PORTS.values() if p and not port_is_free(p)]
    assert sorted(held) == sorted(p for p in DEFAULT_HEAD_PORTS.values() if p), held
    assert foreign_ray.http("/api/jobs/", token=foreign_ray.token)[0] == 200
    with ray_head(num_cpus=3) as ours:
        assert not set(ours.ports.values()) & set(RAY_DEFAULT_PORTS.values())
        # Each cluster takes only its own token.
        assert ours.http("/api/jobs/", token=foreign_ray.token)[0] == 403
        _submit_encode_job(ours, tiny_llava, tmp_path)
        assert json.loads(foreign_ray.http("/api/jobs/", token=foreign_ray.token)[1]) == []
    # The foreign Ray is untouched by our cluster's teardown.
    assert foreign_ray.process.poll() is None
    assert foreign_ray.http("/api/jobs/", token=foreign_ray.token)[0] == 200
