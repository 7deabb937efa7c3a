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

:func:`bench_shared_pool` runs the offline job on its own actors and through the application's replicas
(the job's ``run_job`` is given by the command line: this package never imports the offline job).
Each takes its options dataclass (:class:`ServeOptions`, :class:`SharedPoolOptions`); the generated
JPEGs, the Ray and Serve sessions and the percentiles are :mod:`pipeline.measure`'s.
"""

from __future__ import annotations

import http.client
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

import numpy as np

from pipeline.config import Config
from pipeline.constants import SERVE_ENCODER_DEPLOYMENT
from pipeline.measure.images import iter_photos, photo_jpeg, write_jpegs
from pipeline.measure.options import BenchOptions
from pipeline.measure.session import ray_session, serve_session
from pipeline.measure.timing import percentiles_ms
from pipeline.model.config import setting

logger = logging.getLogger(__name__)

BENCH_APP_NAME = "llava-features-bench"
SHARED_POOL_APP = "llava-features-pool-bench"


@dataclass(frozen=True)
class EndpointOptions(BenchOptions):
    """What both endpoint benchmarks share: the generated JPEG, the deployment and where it listens."""

    image_size: tuple[int, int] = setting((640, 480), ge=1)
    """(width, height) of the generated JPEG(s)."""
    warmup: int = setting(5, ge=0)
    """Untimed requests first (``serve``: and untimed in-process calls)."""
    port: int | None = setting(None, ge=1)
    """Serve's HTTP port: where Serve is started (default: a free port), or a running Serve's whose own cannot be found."""
    ray_actor_options: dict | None = None
    """The deployment's ``ray_actor_options`` by role, e.g. ``{"encoder": {"num_cpus": 0.1}}``."""
    timeout_s: float = setting(120.0, gt=0)
    """Seconds a request may take."""


@dataclass(frozen=True)
class ServeOptions(EndpointOptions):
    """Options of ``bench serve``."""

    SECTION: ClassVar[str] = "bench.serve"

    requests: int = setting(200, ge=1)
    """Requests of each phase (latency at concurrency 1, then throughput)."""
    concurrency: int = setting(32, ge=1)
    """Parallel clients of the throughput phase."""
    direct_threads: int | None = setting(None, ge=1)
    """Torch threads of the in-process run (default: what Ray gives the encoder replica, floor(num_cpus), ≥ 1)."""
    batch_images: int = setting(16, ge=0)
    """Images per ``/v1/features:batch`` request (0: that route is not measured)."""
    batch_requests: int | None = setting(None, ge=1)
    """Requests to ``/v1/features:batch`` (default: ``requests`` // 4, at least 4)."""
    batch_concurrency: int = setting(4, ge=1)
    """Parallel clients of ``/v1/features:batch``."""


@dataclass(frozen=True)
class SharedPoolOptions(EndpointOptions):
    """Options of ``bench shared-pool``."""

    SECTION: ClassVar[str] = "bench.shared-pool"

    images: int = setting(256, ge=1)
    """JPEGs of each timed job."""
    shard_size: int = setting(16, ge=1)
    """Images per output file (and per file handed to a replica)."""
    requests: int = setting(60, ge=1)
    """Online requests on the idle application."""


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


def _bench_direct(
    config: Config, image: bytes, *, requests: int, warmup: int, threads: int
) -> dict[str, float]:
    """The endpoint's work in this process: decode + preprocess + forward (+ host copy), with
    ``threads`` torch threads (what Ray gives a replica: OMP_NUM_THREADS = floor(num_cpus))."""
    import torch

    from pipeline.encoder import FeatureEncoder

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _time_direct(FeatureEncoder(config), config, image, requests=requests, warmup=warmup)
    finally:
        torch.set_num_threads(previous)


def _time_direct(
    encoder: Any, config: Config, image: bytes, *, requests: int, warmup: int
) -> dict[str, float]:
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
    lat = percentiles_ms(latencies)
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
        lat = percentiles_ms(latencies)
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
    measured; also by role: proxy, replica, other) and of this load generator, apart."""
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
        for role, seconds in after.items():
            out[f"batch_route_server_cpu_ms_per_image_{role}"] = (seconds - before[role]) * 1000 / images
        out["batch_route_server_cpu_ms_per_image"] = sum(
            out[f"batch_route_server_cpu_ms_per_image_{role}"] for role in after
        )
    return out


def bench_serve(config: Config, options: ServeOptions, *, image: bytes | None = None) -> dict[str, Any]:
    """Deploy the endpoint for ``config`` locally and measure it against in-process encoding.

    The in-process figures are taken first (``direct_*``), then the endpoint's (``serve_*``), on
    ``image`` (default: a generated JPEG of ``image_size``). Runs on this driver's Ray and Serve when
    they run (the application ``llava-features-bench`` under ``/bench``, deleted at the end), else on a
    local Ray and Serve started here and stopped after. ``direct_threads`` (torch threads of the
    in-process run) defaults to what Ray gives the encoder replica, so both sides get the same cores.
    Then ``/v1/features:batch``: ``batch_requests`` requests of ``batch_images`` images each at
    ``batch_concurrency``, its images/s against the in-process images/s (``batch_route_ratio``).
    Returns a flat dict of figures (milliseconds, requests or images per second).
    """
    import gc

    from ray import serve

    from .app import ENCODER_DEPLOYMENT, build_app
    from .build import DEFAULT_ENCODER_CPUS, deployable_args

    o = options
    image = image if image is not None else photo_jpeg(*o.image_size)
    result: dict[str, Any] = {
        "requests": o.requests,
        "concurrency": o.concurrency,
        "image_bytes": len(image),
        "max_batch_size": config.serve.max_batch_size,
        "batch_wait_timeout_s": config.serve.batch_wait_timeout_s,
    }
    direct_threads = o.direct_threads
    if direct_threads is None:
        encoder_cpus = ((o.ray_actor_options or {}).get("encoder") or {}).get(
            "num_cpus", DEFAULT_ENCODER_CPUS
        )
        direct_threads = max(1, math.floor(encoder_cpus))
    result["direct_threads"] = direct_threads
    result.update(_bench_direct(config, image, requests=o.requests, warmup=o.warmup, threads=direct_threads))
    gc.collect()

    with (
        ray_session(include_dashboard=False, namespace="serve") as ray_,
        serve_session(BENCH_APP_NAME, "/bench", port=o.port) as served,
    ):
        args = deployable_args(config)
        if o.ray_actor_options:
            args["ray_actor_options"] = o.ray_actor_options
        t0 = time.perf_counter()
        serve.run(build_app(args), name=BENCH_APP_NAME, route_prefix=served.route_prefix)
        result["deploy_s"] = time.perf_counter() - t0
        handle = serve.get_deployment_handle(ENCODER_DEPLOYMENT, app_name=BENCH_APP_NAME)
        session_cpu = _session_cpu() if ray_.started else None  # another session holds other apps too
        samples: list[dict[str, float]] = []

        def before() -> None:
            handle.reset_stats.remote().result()
            if session_cpu is not None:
                samples.append(session_cpu())

        def after() -> None:
            if session_cpu is not None:
                samples.append(session_cpu())

        api_key = config.serve.api_key or os.environ.get("LLAVA_FEATURES_API_KEY")
        result.update(
            _bench_http(
                served.base_url,
                image,
                requests=o.requests,
                concurrency=o.concurrency,
                warmup=o.warmup,
                api_key=api_key,
                timeout_s=o.timeout_s,
                # The batch sizes reported are those of the concurrent phase only (the latency
                # phase's requests come one at a time: batches of one by construction).
                before_throughput=before,
                after_throughput=after,
            )
        )
        if len(samples) == 2:
            for role, seconds in samples[1].items():
                result[f"serve_cpu_ms_per_request_{role}"] = (seconds - samples[0][role]) * 1000 / o.requests
            result["serve_cpu_ms_per_request"] = sum(
                result[f"serve_cpu_ms_per_request_{role}"] for role in samples[1]
            )
        stats = handle.stats.remote().result()
        result["serve_mean_batch_size"] = stats["mean_batch_size"]
        result["serve_max_batch_size"] = stats["max_batch_size"]
        if o.batch_images > 0:
            result.update(
                _bench_batch_route(
                    served.base_url,
                    image,
                    images_per_request=o.batch_images,
                    requests=o.batch_requests or max(4, o.requests // 4),
                    concurrency=o.batch_concurrency,
                    api_key=api_key,
                    timeout_s=o.timeout_s,
                    session_cpu=session_cpu,
                )
            )
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


def bench_shared_pool(
    config: Config, options: SharedPoolOptions, *, run_job: Callable[..., Any]
) -> dict[str, Any]:
    """The mixed run of the shared pool, on this driver's Ray (else a local one started here and stopped
    after), with Serve started for it (or the running one's, the application deleted at the end):

    1. the standalone job (its own actor pool) over ``images`` generated JPEGs, ``shard_size`` per
       output file: images/s (after a job of two files that starts the workers and loads the model);
    2. the same job through the Serve application's replicas (``job.serve_app``), no online load;
    3. online latency at concurrency 1 on the idle application (``requests`` requests);
    4. online latency at concurrency 1 while the job runs through the application again.

    ``run_job`` is :func:`pipeline.offline.run_job` (given by the command line, the layer above both front
    doors). Returns images/s of 1, 2 and 4, their ratios, and p50/p99 of 3 and 4 (ms)."""
    import dataclasses
    import tempfile
    from pathlib import Path

    from ray import serve

    from .app import build_app
    from .build import deployable_args

    o = options
    width, height = o.image_size
    config = dataclasses.replace(config, job=dataclasses.replace(config.job, shard_size=o.shard_size))
    result: dict[str, Any] = {
        "images": o.images,
        "shard_size": config.job.shard_size,
        "offline_chunk_size": config.serve.offline_chunk_size,
        "max_offline_shards": config.serve.max_offline_shards,
        "requests": o.requests,
    }
    pooled = dataclasses.replace(config, job=dataclasses.replace(config.job, serve_app=SHARED_POOL_APP))
    body = photo_jpeg(width, height, seed=10_000)
    with (
        ray_session(
            address="local", include_dashboard=False, namespace="serve", logging_level=logging.WARNING
        ),
        tempfile.TemporaryDirectory(prefix="llava-pool-bench-") as tmp,
    ):
        folder = Path(tmp) / "images"
        write_jpegs(iter_photos(o.images, height, width), folder)
        warm = Path(tmp) / "warm"
        write_jpegs(iter_photos(2 * o.shard_size, height, width, seed=1), warm)

        def job(cfg: Config, name: str) -> float:
            # A small job first (Ray Data's workers, the actors' model loads), then the timed one.
            run_job(cfg, str(warm), str(Path(tmp) / f"{name}-warmup"))
            summary = run_job(cfg, str(folder), str(Path(tmp) / name))
            if summary.ok != o.images:
                raise RuntimeError(f"the {name} job encoded {summary.ok} of {o.images} images")
            return float(summary.images_per_s)

        # The standalone job first, while no application holds CPUs or a device.
        result["standalone_images_per_s"] = job(config, "standalone")
        with serve_session(SHARED_POOL_APP, "/pool", port=o.port) as served:
            args = deployable_args(config)
            if o.ray_actor_options:
                args["ray_actor_options"] = o.ray_actor_options
            serve.run(build_app(args), name=SHARED_POOL_APP, route_prefix=served.route_prefix)
            result["pool_images_per_s"] = job(pooled, "pool")
            idle = _online_latencies(
                served.base_url, body, n=o.requests, warmup=o.warmup, timeout_s=o.timeout_s
            )
            result.update({f"online_idle_{k}_ms": v for k, v in percentiles_ms(idle).items()})
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
            during = _online_latencies(served.base_url, body, until=done, timeout_s=o.timeout_s)
            thread.join()
            stats = handle.stats.remote().result()
        result.update({f"online_during_job_{k}_ms": v for k, v in percentiles_ms(during).items()})
        result["online_requests_during_job"] = len(during)
        result["pool_images_per_s_with_online"] = mixed.get("ips", 0.0)
        result["offline_chunk_ms_max"] = stats["offline_chunk_ms_max"]
        result["online_wait_ms_max"] = stats["online_wait_ms_max"]
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
