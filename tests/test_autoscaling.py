"""Autoscaling that counts both front doors (deployments/autoscaling.py): the replicas' reported load,
the policy, and over a real local Ray Serve, online load and an offline job through the pool each
scaling the application from 1 to 2 replicas (and back to 1 after the online load stops)."""

from __future__ import annotations

import io
import math
import threading
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image

from deployments.autoscaling import (
    DECIDE_EVERY_S,
    LOAD_METRIC,
    autoscaling_config,
    both_doors_policy,
    replica_load,
)
from pipeline.config import load_config
from tests.fixtures.serve import tiny_app_args

slow = pytest.mark.slow
APP = "scaling"
TARGET = 2
UPSCALE_DELAY_S = 1.0
DOWNSCALE_DELAY_S = 3.0
CLIENTS = 8
JOB_IMAGES = 1536
JOB_SHARD_SIZE = 64
"""Files of 64 small images, encoded one image per pass (offline_chunk_size 1)."""
DEVICE_CALL_IMAGES = 2048
"""Images of each ``encode_pixels`` call that keeps the device busy in the offline test."""


def _ctx(
    loads: list[float], *, replicas: int = 1, queued: float = 0.0, serve_count: float = 0.0
) -> SimpleNamespace:
    """An AutoscalingContext's fields as the policy reads them."""
    from ray.serve.config import AutoscalingConfig

    return SimpleNamespace(
        current_num_replicas=replicas,
        target_num_replicas=replicas,
        aggregated_metrics={LOAD_METRIC: {f"r{i}": v for i, v in enumerate(loads)}} if loads else {},
        total_queued_requests=queued,
        total_num_requests=serve_count,
        config=AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=TARGET),
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=4,
        policy_state={},
        current_time=None,
    )


def test_load_and_policy():
    serve = load_config(None, {"serve": {"target_ongoing_requests": 16, "max_offline_shards": 2}}).serve
    # an offline file weighs target / max_offline_shards: a replica holding max_offline_shards is at target
    assert replica_load(3, 2, serve) == {"online": 3.0, "offline_files": 2.0, LOAD_METRIC: 3 + 16}
    assert both_doors_policy(_ctx([1.0]))[0] == 0.5  # under target: one replica is enough
    assert both_doors_policy(_ctx([4.0, 2.0], replicas=2))[0] == 3.0  # 6 over a target of 2
    assert both_doors_policy(_ctx([4.0], queued=2.0))[0] == 3.0  # requests waiting at handles count
    assert both_doors_policy(_ctx([], serve_count=5.0))[0] == 2.5  # nobody reported yet: Serve's count
    assert both_doors_policy(_ctx([0.0], replicas=0))[0] == 0  # no replica: the target stands
    desired, state = both_doors_policy(_ctx([5.0]))
    assert math.ceil(desired) == 3 and state["llava_features_wanted"] == 3
    # asked again within DECIDE_EVERY_S (the controller asks every 0.1 s): the last answer stands
    first = _ctx([5.0])
    first.current_time = 100.0
    _, state = both_doors_policy(first)
    again = _ctx([9.0])
    again.current_time, again.policy_state = 100.2, state
    assert both_doors_policy(again)[0] == 2.5
    again.current_time = 100.2 + DECIDE_EVERY_S
    assert both_doors_policy(again)[0] == 4.5
    config = load_config(None, {"serve": {"upscale_delay_s": 2.5, "downscale_delay_s": 7, "max_replicas": 3}})
    auto = autoscaling_config(config)
    assert (auto["upscale_delay_s"], auto["downscale_delay_s"], auto["max_replicas"]) == (2.5, 7.0, 3)
    assert auto["policy"]["policy_function"] is both_doors_policy
    defaults = load_config(None).serve
    assert (defaults.upscale_delay_s, defaults.downscale_delay_s) == (10.0, 120.0)


def _replicas(app: str) -> int:
    from ray import serve

    deployment = serve.status().applications[app].deployments["FeaturesEncoder"]
    return int(deployment.replica_states.get("RUNNING", 0))


def _wait_for(app: str, want: int, timeout_s: float, until: threading.Event | None = None) -> float | None:
    """Seconds until ``app`` runs ``want`` replicas (None: not within ``timeout_s`` or before ``until``)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s and not (until is not None and until.is_set()):
        if _replicas(app) == want:
            return time.monotonic() - started
        time.sleep(0.25)
    return None


def _jpeg(seed: int, size: tuple[int, int] = (120, 160)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def scaling_app(serve_cluster, tiny_llava) -> str:
    args = tiny_app_args(
        tiny_llava,
        min_replicas=1,
        max_replicas=2,
        initial_replicas=1,
        target_ongoing_requests=TARGET,
        upscale_delay_s=UPSCALE_DELAY_S,
        downscale_delay_s=DOWNSCALE_DELAY_S,
        max_batch_size=4,
        offline_chunk_size=1,
    )
    return serve_cluster.deploy(APP, f"/{APP}", args)


@slow
def test_online_load_scales_up_and_back_down(scaling_app):
    """Small delays in the config: online load (8 clients) takes the application from 1 replica to 2
    and, once it stops, back to 1."""
    assert _wait_for(APP, 1, 60) is not None
    body = _jpeg(0)
    stop = threading.Event()
    codes: list[int] = []

    def client() -> None:
        with httpx.Client(base_url=scaling_app, timeout=60) as c:
            while not stop.is_set():
                codes.append(c.post("/v1/features", content=body).status_code)

    clients = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in clients:
        thread.start()
    try:
        up_s = _wait_for(APP, 2, 90)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert up_s is not None, "online load did not add a replica"
    assert set(codes) == {200}, sorted(set(codes))
    down_s = _wait_for(APP, 1, 90)
    print(f"online: 1 -> 2 replicas in {up_s:.1f}s under load, back to 1 in {down_s}s after it stopped")
    assert down_s is not None, "the application did not scale back to 1 replica"


@slow
def test_offline_job_scales_up(scaling_app, tiny_llava, tmp_path):
    """The files an offline job has on the replica are its load: a job through the pool takes the
    application from 1 replica to 2 while the replica's device is kept busy by one ``encode_pixels``
    call at a time (online first: the job's files wait on the replica, as they do whenever the
    replica, not the job's decoding, is the slower side; one call in progress is a load of 1, under
    the target). On this 2-core machine a job through the tiny model alone is bound by its own
    decoding: it keeps 0.15 to 0.56 files on the replica on average, and rightly asks for no second
    replica."""
    from pipeline.offline import run_job

    assert _wait_for(APP, 1, 90) is not None
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(JOB_IMAGES):
        (folder / f"{i:04d}.jpg").write_bytes(_jpeg(i, (40, 40)))
    config = load_config(
        None,
        {
            "model": {"checkpoint": str(tiny_llava)},
            "job": {"serve_app": APP, "shard_size": JOB_SHARD_SIZE},
        },
    )
    done = threading.Event()
    result = {}
    seen: list[float] = []

    def job() -> None:
        try:
            result["summary"] = run_job(config, str(folder), str(tmp_path / "out"))
        finally:
            done.set()

    def watch() -> None:
        with httpx.Client(base_url=scaling_app, timeout=30) as c:
            while not done.wait(0.2):
                seen.append(c.get("/debug/stats").json()["offline_in_flight"])

    calls: list[int] = []

    def client() -> None:
        from ray import serve

        handle = serve.get_deployment_handle("FeaturesEncoder", app_name=APP)
        pixels = np.zeros((DEVICE_CALL_IMAGES, 3, 56, 56), np.uint8)
        while not done.is_set():
            calls.append(len(handle.encode_pixels.remote(pixels).result().projected))

    threads = [threading.Thread(target=f) for f in (job, watch, client)]
    for thread in threads:
        thread.start()
    up_s = _wait_for(APP, 2, 120, until=done)
    for thread in threads:
        thread.join()
    print(
        f"offline: 1 -> 2 replicas in {up_s}s (job {result['summary'].seconds:.1f}s); files in progress on the "
        f"replica answering /debug/stats: mean {np.mean(seen):.2f}, max {max(seen, default=0)}"
    )
    assert result["summary"].ok == JOB_IMAGES and set(calls) == {DEVICE_CALL_IMAGES}
    assert up_s is not None, "the offline job through the pool did not add a replica"
