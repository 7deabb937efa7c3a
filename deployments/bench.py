"""Benchmarks of the online endpoint: against the encoder called in-process, and the shared pool.

:func:`bench_serve` deploys the Serve application locally (:func:`deployments.app.build_app`),
then measures over HTTP on 127.0.0.1:

- latency of one image at concurrency 1 (p50/p99/mean),
- throughput at ``concurrency`` parallel clients,

and the same two figures for the encoder called directly in this process (``encode_pre`` +
``encode_pixels``, same image, batches of ``serve.max_batch_size`` for the throughput), so the
difference is the cost of HTTP, Ray Serve and the queueing for dynamic batching.

Throughput on a machine shared with other jobs moves with their load, and the two phases run at
different times; CPU time does not move much. So when the benchmark starts its own Ray on Linux it
also reports the CPU milliseconds the whole local Ray session (proxy, controller, replicas,
raylet, GCS: every process of the session, from ``/proc``) spends per request at
``concurrency``, the load generator's own, and the in-process encoder's per image; their ratio
(``cpu_ratio``) is the endpoint's throughput per CPU-second relative to in-process.
"""

from __future__ import annotations

import http.client
import io
import logging
import math
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from pipeline.config import Config
from pipeline.constants import SERVE_ENCODER_DEPLOYMENT

logger = logging.getLogger(__name__)

BENCH_APP_NAME = "llava-features-bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sample_image(width: int = 640, height: int = 480, seed: int = 0) -> bytes:
    """A photo-like JPEG (smooth gradients + noise) for benchmarks."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples_s)
    if not ms:
        return {"p50": 0.0, "p99": 0.0, "mean": 0.0}

    def pct(q: float) -> float:
        return ms[min(len(ms) - 1, max(0, round(q * (len(ms) - 1))))]

    return {"p50": pct(0.50), "p99": pct(0.99), "mean": statistics.fmean(ms)}


def _run_concurrent(call: Callable[[], None], total: int, concurrency: int) -> float:
    """Run ``call`` ``total`` times over ``concurrency`` threads; returns wall seconds."""
    counter = iter(range(total))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            call()

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return time.perf_counter() - started


def _running_serve_port() -> int | None:
    """HTTP port of the Serve instance this driver is connected to, if one runs."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
    except Exception:
        return None
    if client is None:
        return None
    try:
        return int(client.http_config.port)
    except Exception:
        return None


def _bench_direct(config: Config, image: bytes, requests: int, warmup: int, threads: int) -> dict[str, float]:
    """The endpoint's work in this process: decode + preprocess + forward (+ host copy), with
    ``threads`` torch threads (what Ray gives a replica: OMP_NUM_THREADS = floor(num_cpus))."""
    import torch

    from pipeline.encoder import FeatureEncoder

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _time_direct(FeatureEncoder(config), config, image, requests, warmup)
    finally:
        torch.set_num_threads(previous)


def _time_direct(encoder: Any, config: Config, image: bytes, requests: int, warmup: int) -> dict[str, float]:
    batch = max(1, config.serve.max_batch_size)  # what the endpoint's dynamic batches hold at most

    def one() -> None:
        encoder.encode_pixels(encoder.encode_pre(image).pixels[None], batch_size=1)

    for _ in range(warmup):
        one()
    latencies = []
    for _ in range(requests):
        t = time.perf_counter()
        one()
        latencies.append(time.perf_counter() - t)
    lat = _percentiles(latencies)
    t, cpu = time.perf_counter(), time.process_time()
    for start in range(0, requests, batch):
        n = min(batch, requests - start)
        pixels = np.stack([encoder.encode_pre(image).pixels for _ in range(n)])
        encoder.encode_pixels(pixels, batch_size=batch)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    return {
        "direct_p50_ms": lat["p50"],
        "direct_p99_ms": lat["p99"],
        "direct_mean_ms": lat["mean"],
        "direct_throughput_ips": requests / wall,
        "direct_cpu_ms_per_image": cpu * 1000 / requests,
    }


ROLES = (b"ProxyActor", b"ServeReplica")
"""Process titles of Serve's HTTP proxy and of the replicas (Ray names its workers ``ray::<actor>``):
their CPU is reported apart; everything else of the session is ``other``."""


def _session_cpu() -> Callable[[], dict[str, float]] | None:
    """A reader of the CPU seconds used so far by the processes of this driver's local Ray session
    (those whose command line names the session directory, and all their descendants: the
    workers, Serve's proxy and controller, the replicas), by role (``proxy``, ``replica``,
    ``other``), from Linux's ``/proc``; None elsewhere."""
    if not os.path.isdir("/proc/self"):
        return None
    try:
        import ray

        session = ray._private.worker.global_worker.node.get_session_dir_path()  # no public API
    except Exception:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    me = os.getpid()

    def read() -> dict[str, float]:
        parents: dict[int, int] = {}
        cpu: dict[int, float] = {}
        role: dict[int, str] = {}
        roots = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:  # gone meanwhile
                continue
            parents[pid] = int(fields[1])
            cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
            head = cmdline[:64]
            role[pid] = "proxy" if ROLES[0] in head else "replica" if ROLES[1] in head else "other"
            if session.encode() in cmdline:
                roots.append(pid)
        children: dict[int, list[int]] = {}
        for pid, parent in parents.items():
            children.setdefault(parent, []).append(pid)
        seen, todo = set(), list(roots)
        while todo:
            pid = todo.pop()
            if pid in seen or pid == me:
                continue
            seen.add(pid)
            todo.extend(children.get(pid, ()))
        out = dict.fromkeys(("proxy", "replica", "other"), 0.0)
        for pid in seen:
            out[role[pid]] += cpu[pid]
        return out

    return read


class _Client:
    """One keep-alive HTTP/1.1 connection (``http.client``): a load generator that costs the shared
    CPU little, so that the figures are the server's (httpx costs ~3 ms of CPU per request here)."""

    def __init__(self, base_url: str, headers: dict[str, str], timeout_s: float) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.headers = headers
        self.timeout_s = timeout_s
        self.conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        for attempt in (0, 1):  # one reconnect: the server may close an idle keep-alive connection
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            try:
                self.conn.request("POST", self.prefix + path, body=body, headers=self.headers)
                response = self.conn.getresponse()
                return response.status, response.read()
            except (ConnectionError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _poster(
    base_url: str, path: str, body: bytes, headers: dict[str, str], timeout_s: float
) -> tuple[Callable[[], None], list[_Client], list[int]]:
    """A function that POSTs ``body`` to ``path`` on this thread's keep-alive connection; the
    connections it opened (to close) and the statuses of the failed requests."""
    local = threading.local()
    clients: list[_Client] = []
    failures: list[int] = []

    def post() -> None:
        if not hasattr(local, "client"):
            local.client = _Client(base_url, headers, timeout_s)
            clients.append(local.client)
        status, answer = local.client.post(path, body)
        if status != 200:
            failures.append(status)
            logger.warning("bench request failed: %s %s", status, answer[:200])

    return post, clients, failures


def _auth(headers: dict[str, str], api_key: str | None) -> dict[str, str]:
    return {**headers, "authorization": f"Bearer {api_key}"} if api_key else headers


def _bench_http(
    base_url: str,
    image: bytes,
    *,
    requests: int,
    concurrency: int,
    warmup: int,
    api_key: str | None,
    timeout_s: float,
    before_throughput: Callable[[], None] | None = None,
    after_throughput: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Latency at concurrency 1 and throughput at ``concurrency`` over HTTP (one keep-alive
    connection per thread); ``before_throughput`` and ``after_throughput`` run right before and
    after the concurrent phase (the caller resets the replicas' counters, samples CPU time)."""
    headers = _auth({"content-type": "application/octet-stream"}, api_key)
    post, clients, failures = _poster(base_url, "/v1/features", image, headers, timeout_s)
    try:
        for _ in range(warmup):
            post()
        latencies = []
        for _ in range(requests):
            t = time.perf_counter()
            post()
            latencies.append(time.perf_counter() - t)
        lat = _percentiles(latencies)
        if before_throughput is not None:
            before_throughput()
        cpu = time.process_time()
        wall = _run_concurrent(post, requests, concurrency)
        cpu = time.process_time() - cpu
        if after_throughput is not None:
            after_throughput()
    finally:
        for client in clients:
            client.close()
    return {
        "serve_p50_ms": lat["p50"],
        "serve_p99_ms": lat["p99"],
        "serve_mean_ms": lat["mean"],
        "serve_throughput_rps": requests / wall,
        "serve_errors": float(len(failures)),
        "client_cpu_ms_per_request": cpu * 1000 / requests,
    }


def multipart_body(images: list[bytes]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with one file part per image, and its Content-Type."""
    boundary = "llava-features-bench-boundary"
    parts = []
    for i, data in enumerate(images):
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        )
        parts += [head.encode(), data, b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _bench_batch_route(
    base_url: str,
    image: bytes,
    *,
    images_per_request: int,
    requests: int,
    concurrency: int,
    api_key: str | None,
    timeout_s: float,
    session_cpu: Callable[[], dict[str, float]] | None,
) -> dict[str, float]:
    """``/v1/features:batch`` with ``images_per_request`` images per request, ``requests`` requests at
    ``concurrency``: images/s, and the CPU per image of the server (the local Ray session, when
    measured) and of this load generator, apart."""
    body, content_type = multipart_body([image] * images_per_request)
    post, clients, failures = _poster(
        base_url, "/v1/features:batch", body, _auth({"content-type": content_type}, api_key), timeout_s
    )
    try:
        post()  # warm: the multipart route's first request
        before = session_cpu() if session_cpu is not None else None
        cpu = time.process_time()
        wall = _run_concurrent(post, requests, concurrency)
        cpu = time.process_time() - cpu
        after = session_cpu() if session_cpu is not None else None
    finally:
        for client in clients:
            client.close()
    images = requests * images_per_request
    out = {
        "batch_route_images_per_request": float(images_per_request),
        "batch_route_concurrency": float(concurrency),
        "batch_route_images_per_s": images / wall,
        "batch_route_client_cpu_ms_per_image": cpu * 1000 / images,
        "batch_route_errors": float(len(failures)),
    }
    if before is not None and after is not None:
        out["batch_route_server_cpu_ms_per_image"] = sum(after.values()) - sum(before.values())
        out["batch_route_server_cpu_ms_per_image"] *= 1000 / images
    return out


def bench_serve(
    config: Config,
    *,
    requests: int = 200,
    concurrency: int = 32,
    image_bytes: bytes | None = None,
    width: int = 640,
    height: int = 480,
    warmup: int = 5,
    port: int | None = None,
    ray_actor_options: dict[str, Any] | None = None,
    direct_threads: int | None = None,
    timeout_s: float = 120.0,
    batch_images: int = 16,
    batch_requests: int | None = None,
    batch_concurrency: int = 4,
) -> dict[str, Any]:
    """Deploy the endpoint for ``config`` locally and measure it against in-process encoding.

    The in-process figures are taken first (``direct_*``), then the endpoint's (``serve_*``).
    Starts a local Ray (and Serve on ``port`` or a free port) when none is running, and shuts
    them down afterwards; on an already running Serve it deploys the application
    ``llava-features-bench`` under ``/bench`` next to the others and deletes it at the end
    (pass ``port`` when the running Serve's port cannot be found). ``requests`` is the number of
    requests of each phase; without ``image_bytes`` a ``width`` x ``height`` JPEG is generated.
    ``direct_threads`` (torch threads of the in-process run) defaults to what Ray gives the
    encoder replica, floor(its num_cpus) and at least 1, so both sides get the same cores.
    Then ``/v1/features:batch``: ``batch_requests`` requests (default: ``requests`` // 4, at least 4)
    of ``batch_images`` images each at ``batch_concurrency`` (``batch_images`` 0 skips it), its
    images/s against the in-process images/s (``batch_route_ratio``).
    Returns a flat dict of figures (milliseconds, requests or images per second).
    """
    import gc

    import ray
    from ray import serve

    from pipeline.model.errors import ConfigError

    from .app import ENCODER_DEPLOYMENT, build_app
    from .build import DEFAULT_ENCODER_CPUS, deployable_args

    if requests < 1 or concurrency < 1:
        raise ConfigError("requests and concurrency must be >= 1")
    image = image_bytes if image_bytes is not None else sample_image(width, height)
    result: dict[str, Any] = {
        "requests": requests,
        "concurrency": concurrency,
        "image_bytes": len(image),
        "max_batch_size": config.serve.max_batch_size,
        "batch_wait_timeout_s": config.serve.batch_wait_timeout_s,
    }
    if direct_threads is None:
        encoder_cpus = ((ray_actor_options or {}).get("encoder") or {}).get("num_cpus", DEFAULT_ENCODER_CPUS)
        direct_threads = max(1, math.floor(encoder_cpus))
    result["direct_threads"] = direct_threads
    result.update(_bench_direct(config, image, requests, warmup, direct_threads))
    gc.collect()

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False, namespace="serve")
    running_port = None if started_ray else _running_serve_port()
    started_serve = running_port is None
    route_prefix = "/" if started_serve else "/bench"
    if started_serve:
        port = port or _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    else:
        port = running_port
    try:
        args = deployable_args(config)
        if ray_actor_options:
            args["ray_actor_options"] = ray_actor_options
        t0 = time.perf_counter()
        serve.run(build_app(args), name=BENCH_APP_NAME, route_prefix=route_prefix)
        result["deploy_s"] = time.perf_counter() - t0
        handle = serve.get_deployment_handle(ENCODER_DEPLOYMENT, app_name=BENCH_APP_NAME)
        session_cpu = _session_cpu() if started_ray else None  # another session holds other apps too
        samples: list[dict[str, float]] = []

        def before() -> None:
            handle.reset_stats.remote().result()
            if session_cpu is not None:
                samples.append(session_cpu())

        def after() -> None:
            if session_cpu is not None:
                samples.append(session_cpu())

        base_url = f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}"
        api_key = config.serve.api_key or os.environ.get("LLAVA_FEATURES_API_KEY")
        result.update(
            _bench_http(
                base_url,
                image,
                requests=requests,
                concurrency=concurrency,
                warmup=warmup,
                api_key=api_key,
                timeout_s=timeout_s,
                # The batch sizes reported are those of the concurrent phase only (the latency
                # phase's requests come one at a time: batches of one by construction).
                before_throughput=before,
                after_throughput=after,
            )
        )
        if len(samples) == 2:
            for role, seconds in samples[1].items():
                result[f"serve_cpu_ms_per_request_{role}"] = (seconds - samples[0][role]) * 1000 / requests
            result["serve_cpu_ms_per_request"] = sum(
                result[f"serve_cpu_ms_per_request_{role}"] for role in samples[1]
            )
        stats = handle.stats.remote().result()
        result["serve_mean_batch_size"] = stats["mean_batch_size"]
        result["serve_max_batch_size"] = stats["max_batch_size"]
        if batch_images > 0:
            result.update(
                _bench_batch_route(
                    base_url,
                    image,
                    images_per_request=batch_images,
                    requests=batch_requests or max(4, requests // 4),
                    concurrency=batch_concurrency,
                    api_key=api_key,
                    timeout_s=timeout_s,
                    session_cpu=session_cpu,
                )
            )
    finally:
        try:
            if started_serve:
                serve.shutdown()
            else:
                serve.delete(BENCH_APP_NAME)
        finally:
            if started_ray:
                ray.shutdown()
    result["serve_errors"] = int(result["serve_errors"])
    result["overhead_p50_ms"] = result["serve_p50_ms"] - result["direct_p50_ms"]
    result["overhead_p99_ms"] = result["serve_p99_ms"] - result["direct_p99_ms"]
    result["throughput_ratio"] = result["serve_throughput_rps"] / result["direct_throughput_ips"]
    if result.get("serve_cpu_ms_per_request"):
        result["cpu_ratio"] = result["direct_cpu_ms_per_image"] / result["serve_cpu_ms_per_request"]
    if "batch_route_images_per_s" in result:
        result["batch_route_errors"] = int(result["batch_route_errors"])
        result["batch_route_ratio"] = result["batch_route_images_per_s"] / result["direct_throughput_ips"]
    return result


SHARED_POOL_APP = "llava-features-pool-bench"


def bench_shared_pool(
    config: Config,
    *,
    run_job: Callable[..., Any],
    images: int | None = None,
    shard_size: int = 16,
    width: int = 640,
    height: int = 480,
    requests: int = 60,
    warmup: int = 5,
    port: int | None = None,
    ray_actor_options: dict[str, Any] | None = None,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """The mixed run of the shared pool, on a local Ray + Serve started here (and stopped after):

    1. the standalone job (its own actor pool) over ``images`` generated JPEGs, ``shard_size`` per
       output file: images/s (after a job of two files that starts the workers and loads the model);
    2. the same job through the Serve application's replicas (``job.serve_app``), no online load;
    3. online latency at concurrency 1 on the idle application (``requests`` requests);
    4. online latency at concurrency 1 while the job runs through the application again.

    ``run_job`` is :func:`pipeline.job.run_job` (given by the command line, the layer above both front
    doors). Returns images/s of 1, 2 and 4, their ratios, and p50/p99 of 3 and 4 (ms)."""
    import dataclasses
    import tempfile
    from pathlib import Path

    import ray
    from ray import serve

    from .app import build_app
    from .build import deployable_args

    images = images or 256
    config = dataclasses.replace(config, job=dataclasses.replace(config.job, shard_size=shard_size))
    result: dict[str, Any] = {
        "images": images,
        "shard_size": config.job.shard_size,
        "offline_chunk_size": config.serve.offline_chunk_size,
        "max_offline_shards": config.serve.max_offline_shards,
        "requests": requests,
    }
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", include_dashboard=False, namespace="serve", logging_level=logging.WARNING)
    pooled = dataclasses.replace(config, job=dataclasses.replace(config.job, serve_app=SHARED_POOL_APP))
    body = sample_image(width, height, seed=10_000)
    try:
        with tempfile.TemporaryDirectory(prefix="llava-pool-bench-") as tmp:
            folder = Path(tmp) / "images"
            folder.mkdir()
            for i in range(images):
                (folder / f"{i:06d}.jpg").write_bytes(sample_image(width, height, seed=i))

            warm = Path(tmp) / "warm"
            warm.mkdir()
            for i in range(2 * shard_size):
                (warm / f"{i:06d}.jpg").write_bytes(sample_image(width, height, seed=i))

            def job(cfg: Config, name: str) -> float:
                # A small job first (Ray Data's workers, the actors' model loads), then the timed one.
                run_job(cfg, str(warm), str(Path(tmp) / f"{name}-warmup"))
                summary = run_job(cfg, str(folder), str(Path(tmp) / name))
                if summary.ok != images:
                    raise RuntimeError(f"the {name} job encoded {summary.ok} of {images} images")
                return float(summary.images_per_s)

            # The standalone job first, while no application holds CPUs or a device.
            result["standalone_images_per_s"] = job(config, "standalone")
            port = port or _free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            args = deployable_args(config)
            if ray_actor_options:
                args["ray_actor_options"] = ray_actor_options
            serve.run(build_app(args), name=SHARED_POOL_APP, route_prefix="/pool")
            result["pool_images_per_s"] = job(pooled, "pool")
            base_url = f"http://127.0.0.1:{port}/pool"
            idle = _online_latencies(base_url, body, n=requests, warmup=warmup, timeout_s=timeout_s)
            result.update({f"online_idle_{k}_ms": v for k, v in _percentiles(idle).items()})
            done = threading.Event()
            mixed: dict[str, float] = {}

            def background() -> None:
                try:
                    mixed["ips"] = job(pooled, "mixed")
                finally:
                    done.set()

            handle = serve.get_deployment_handle(SERVE_ENCODER_DEPLOYMENT, app_name=SHARED_POOL_APP)
            handle.reset_stats.remote().result()  # the longest chunk and online wait of the mixed run
            thread = threading.Thread(target=background, name="pool-bench-job")
            thread.start()
            during = _online_latencies(base_url, body, until=done, timeout_s=timeout_s)
            thread.join()
        result.update({f"online_during_job_{k}_ms": v for k, v in _percentiles(during).items()})
        result["online_requests_during_job"] = len(during)
        result["pool_images_per_s_with_online"] = mixed.get("ips", 0.0)
        stats = handle.stats.remote().result()
        result["offline_chunk_ms_max"] = stats["offline_chunk_ms_max"]
        result["online_wait_ms_max"] = stats["online_wait_ms_max"]
    finally:
        try:
            serve.shutdown()
        finally:
            if started_ray:
                ray.shutdown()
    result["pool_vs_standalone"] = result["pool_images_per_s"] / result["standalone_images_per_s"]
    result["online_p99_during_vs_idle"] = result["online_during_job_p99_ms"] / result["online_idle_p99_ms"]
    return result


def _online_latencies(
    base_url: str,
    image: bytes,
    *,
    n: int | None = None,
    warmup: int = 0,
    until: threading.Event | None = None,
    timeout_s: float = 120.0,
) -> list[float]:
    """Seconds of ``n`` sequential ``/v1/features`` requests (after ``warmup``), or of as many as run
    until ``until`` is set; a failed request is an error."""
    client = _Client(base_url, {"content-type": "application/octet-stream"}, timeout_s)
    out: list[float] = []
    try:
        for _ in range(warmup):
            client.post("/v1/features", image)
        while (n is not None and len(out) < n) or (until is not None and not until.is_set()):
            t = time.perf_counter()
            status, body = client.post("/v1/features", image)
            if status != 200:
                raise RuntimeError(f"online request failed: {status} {body[:200]!r}")
            out.append(time.perf_counter() - t)
    finally:
        client.close()
    return out
