"""The online endpoint over real HTTP on 127.0.0.1: a local Ray, Ray Serve and a tiny checkpoint.

Two applications share one Serve instance: ``main`` (under ``/``, default limits, no API key)
and ``strict`` (under ``/strict``: an API key, a 64 KiB body limit, one request at a time with
one queued, and a 1.5 s request timeout) for the auth, 413, 503 and 504 paths.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from deployments import http as H
from deployments.app import ENCODER_DEPLOYMENT
from deployments.build import (
    API_KEY_ENV,
    deployment_options,
    proxy_request_timeout_s,
    resolve_app_config,
    with_api_key_from_env,
)
from deployments.replica import declared_pixels
from deployments.scheduling import (
    Admission,
    DeviceQueue,
    Inflow,
    PixelBudget,
    forming_batch_size,
)
from pipeline.config import load_config
from pipeline.encoder import FeatureEncoder
from pipeline.memory import release_free_memory
from pipeline.model.errors import ConfigError, DecodeError, ErrorCode, RequestError
from pipeline.shards import chunk_ranges
from tests.fixtures.serve import assert_same_features, free_port, tiny_app_args

slow = pytest.mark.slow  # the tests that start Ray (the helpers' tests run in quick mode too)
REPO = Path(__file__).resolve().parent.parent
API_KEY = "test-key-123"
STRICT_BODY_LIMIT = 64 * 1024
STRICT_TIMEOUT_S = 1.5
STRICT_BODY_TIMEOUT_S = 1.5


# -- inputs ---------------------------------------------------------------------------------------


def _image(width: int, height: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 90)], axis=-1)
    arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


IMAGES = {
    "a.png": _image(80, 64, "PNG", 1),
    "b.jpg": _image(50, 90, "JPEG", 2),
    "c.png": _image(56, 56, "PNG", 3),
    "d.jpg": _image(120, 40, "JPEG", 4),
}


def _inline_bad_corpus(folder: Path) -> dict[str, str | None]:
    jpeg = _image(64, 48, "JPEG", 5)
    one_px = io.BytesIO()
    Image.new("RGB", (1, 1), (255, 0, 0)).save(one_px, "PNG")
    files = {
        "empty.jpg": (b"", "empty"),
        "random.bin": (
            np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
            "not_an_image",
        ),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "page.html": (b"<!doctype html><html><body>not an image</body></html>", "not_an_image"),
        "one_pixel.png": (one_px.getvalue(), "too_small"),
        "good.jpg": (jpeg, None),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: code for name, (_, code) in files.items()}


def _bad_corpus(folder: Path) -> dict[str, str | None]:
    """tests/corpus.py's corpus when present, else a few bad inputs written here."""
    try:
        from tests.corpus import write_bad_corpus
    except ImportError:
        return _inline_bad_corpus(folder)
    return write_bad_corpus(folder)


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_encoder(tiny_llava) -> FeatureEncoder:
    """The in-process encoder with the config the endpoint uses."""
    return FeatureEncoder(load_config(None, {"model": {"checkpoint": str(tiny_llava)}}))


@pytest.fixture(scope="module")
def expected(local_encoder) -> dict[str, tuple[np.ndarray, np.ndarray, tuple[int, int]]]:
    """{name: (features float16 (tokens, dim), pooled float32 (dim,), (width, height))} in-process."""
    out = {}
    for name, data in IMAGES.items():
        prepared = local_encoder.encode_pre(data)
        batch = local_encoder.encode_pixels(prepared.pixels[None], pooled=True)
        out[name] = (batch.projected[0], batch.pooled[0], (prepared.width, prepared.height))
    return out


@pytest.fixture(scope="module")
def apps(serve_cluster, tiny_llava) -> dict[str, str]:
    main = tiny_app_args(tiny_llava, max_batch_size=16, batch_wait_timeout_s=0.05, request_timeout_s=60)
    strict = tiny_app_args(
        tiny_llava,
        api_key=API_KEY,
        max_body_bytes=STRICT_BODY_LIMIT,
        max_batch_size=1,
        max_ongoing_requests=1,
        max_queued_requests=1,
        request_timeout_s=STRICT_TIMEOUT_S,
        body_timeout_s=STRICT_BODY_TIMEOUT_S,
    )
    return serve_cluster.deploy_many({"main": ("/", main), "strict": ("/strict", strict)})


@pytest.fixture(scope="module")
def main(apps) -> httpx.Client:
    with httpx.Client(base_url=apps["main"], timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def strict(apps) -> httpx.Client:
    with httpx.Client(
        base_url=apps["strict"], timeout=60, headers={"authorization": f"Bearer {API_KEY}"}
    ) as client:
        yield client


def _ok(client: httpx.Client, name: str = "a.png") -> np.ndarray:
    """A good request that must succeed (run after every error)."""
    r = client.post("/v1/features", content=IMAGES[name], headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    return H.load_npy(r.content)


def _assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body


# -- pure helpers (no Ray) -------------------------------------------------------------------------


def test_status_mapping_and_helpers():
    assert H.status_for(ErrorCode.TRUNCATED) == 400
    assert H.status_for(ErrorCode.PAYLOAD_TOO_LARGE) == 413
    assert H.status_for(ErrorCode.UNSUPPORTED_MEDIA_TYPE) == 415
    assert H.status_for(ErrorCode.UNAUTHORIZED) == 401
    assert H.status_for(ErrorCode.OVERLOADED) == 503
    assert H.status_for(ErrorCode.UNAVAILABLE) == 503
    assert H.status_for(ErrorCode.TIMEOUT) == 504
    assert H.status_for(ErrorCode.INTERNAL) == 500
    assert H.choose_format(None) == "npy"
    assert H.choose_format("*/*") == "npy"
    assert H.choose_format("application/json") == "json"
    assert H.choose_format("application/x-npy;q=0.5, application/json") == "json"
    assert H.choose_format("application/json", "npy") == "npy"
    with pytest.raises(RequestError):
        H.choose_format(None, "xml")
    arr = np.arange(12, dtype=np.float16).reshape(3, 4)
    np.testing.assert_array_equal(H.decode_array_payload(H.array_payload(arr)), arr)
    np.testing.assert_array_equal(H.load_npy(H.npy_bytes(arr)), arr)
    assert H.image_from_data_url(_data_url(b"xyz")) == b"xyz"
    for bad in ("https://example.com/cat.jpg", "hello", "data:image/png,rawtext", 42):
        with pytest.raises(RequestError):
            H.image_from_data_url(bad)
    # Strict data URLs: only image media types, only the base64 alphabet (nothing dropped silently).
    jpeg = base64.b64encode(IMAGES["b.jpg"]).decode()
    for bad, why in [
        ("data:image/png;base64,@@@@", "'@' at position 0 is not in the base64 alphabet"),
        (f"data:image/jpeg;base64,{jpeg[:40]} {jpeg[40:]}", "' ' at position 40"),
        (f"data:text/plain;base64,{jpeg}", "media type is 'text/plain'"),
        (f"data:;base64,{jpeg}", "media type is 'missing'"),
        ("data:image/png;base64,abc", "invalid base64 data"),  # padding
    ]:
        with pytest.raises(RequestError, match=why) as info:
            H.image_from_data_url(bad, "input[3]")
        assert info.value.code == ErrorCode.BAD_REQUEST and "input[3]" in info.value.message
    assert H.image_from_data_url(f"data:image/jpeg;base64,{jpeg}") == IMAGES["b.jpg"]
    # bfloat16 features (uint16 bit patterns) leave as float32, exactly.
    values = np.array([1.0, -2.5, 3.140625, 0.0], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    widened = H.response_array(bits, "bfloat16")
    assert widened.dtype == np.float32 and np.array_equal(widened, values)
    assert H.response_array(arr, "float16") is arr


def test_pixel_budget_admission_and_device_queue():
    """The replica's three schedulers, on one event loop (no Ray)."""

    async def budget() -> None:
        b = PixelBudget(100)
        await b.acquire(60)
        order: list[str] = []

        async def take(name: str, cost: int) -> None:
            await b.acquire(cost)
            order.append(name)

        waiters = [
            asyncio.create_task(take("big", 90)),  # does not fit: waits
            asyncio.create_task(take("small", 20)),  # would fit, but is not let past the big one
        ]
        await asyncio.sleep(0.01)
        assert order == [] and b.used == 60 and b.waits == 2
        b.release(60)
        await asyncio.sleep(0.01)
        assert order == ["big"] and b.used == 90  # first come first served
        b.release(90)
        await asyncio.sleep(0)
        assert order == ["big", "small"] and b.used == 20
        await asyncio.gather(*waiters)
        cancelled = asyncio.create_task(take("cancelled", 95))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cancelled
        assert b.used == 20 and not b._waiters  # a waiter that went away holds nothing
        b.release(20)
        await b.acquire(500)  # larger than the whole budget: runs alone
        assert b.used == 500 and b.peak == 500

    async def admission() -> None:
        a = Admission(ongoing=1, queued=1)
        gate = asyncio.Event()

        async def hold() -> None:
            async with a.slot():
                await gate.wait()

        tasks = [asyncio.create_task(hold()) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert a.inside == 2
        with pytest.raises(RequestError) as info:
            async with a.slot():
                pass
        assert info.value.code == ErrorCode.OVERLOADED and a.refused == 1
        gate.set()
        await asyncio.gather(*tasks)
        assert a.inside == 0

    async def device() -> None:
        passes: list[int] = []
        release = threading.Event()

        def forward(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            release.wait(5)
            return pixels.reshape(len(pixels), -1).sum(axis=1), pixels[:, 0, 0, 0]

        q = DeviceQueue(forward, max_batch_size=4, observe=lambda n, waits, s: passes.append(n))
        images = [np.full((1, 2, 2), i, np.uint8) for i in range(7)]
        first = asyncio.create_task(q.encode(images[:1]))
        await asyncio.sleep(0.01)  # the first pass runs (blocked); the next groups wait and merge
        rest = [asyncio.create_task(q.encode(images[i : i + 2])) for i in (1, 3, 5)]
        job = asyncio.create_task(q.call(lambda x: x * 2, 21))
        await asyncio.sleep(0.01)
        assert q.waiting == 6
        release.set()
        outs = [await first] + [await t for t in rest]
        assert await job == 42
        assert passes == [1, 4, 2]  # 1 alone, then two groups merged (4 ≤ max), then the third
        flat = [row for out in outs for row in out]
        assert [int(total) for total, _ in flat] == [4 * i for i in range(7)]
        assert [int(first) for _, first in flat] == list(range(7))

    asyncio.run(budget())
    asyncio.run(admission())
    asyncio.run(device())
    # A forming batch counts as full once no other image of the replica is on its way.
    inflow = Inflow(max_batch_size=8)
    items = [(images, inflow) for images in range(3)]
    inflow.decoding = 2
    assert forming_batch_size(items) == 3
    inflow.decoding = 0
    assert forming_batch_size(items) == 8
    assert forming_batch_size(items * 3) == 9  # more than fits: still refused by the batcher
    # A request's images go to the device in passes of at most max_batch_size (anyres: tiles), in order.
    # (pipeline.shards.chunk_ranges, which also cuts the offline files' device work into chunks)
    assert chunk_ranges(np.ones(7, np.int64), 3) == [(0, 3), (3, 6), (6, 7)]
    assert chunk_ranges(np.array([2, 3, 1, 9, 1]), 5) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert chunk_ranges(np.zeros(0, np.int64), 4) == []
    png = io.BytesIO()
    Image.new("RGB", (300, 200)).save(png, "PNG")
    assert declared_pixels(png.getvalue()) == 60_000
    assert declared_pixels(b"not an image") == 0
    assert isinstance(release_free_memory(), bool)


def test_framework_errors_in_our_error_shape():
    """Unknown routes (404) and wrong methods (405) answer {"error": {...}} from the router."""
    from starlette.responses import PlainTextResponse
    from starlette.testclient import TestClient

    from deployments.router import Route, Router

    async def features(request):
        return PlainTextResponse("ok")

    seen = []
    api = Router(
        [Route("POST", "/v1/features", features)],
        limits=load_config(None).serve,
        api_key=None,
        admission=Admission(4, 4),
        observe=lambda route, status, ms: seen.append((route, status)),
    )
    with TestClient(api) as client:
        assert client.post("/v1/features").text == "ok"
        r = client.get("/v1/nope")
        assert r.status_code == 404 and "detail" not in r.json()
        assert (
            r.json()["error"]["code"] == "not_found" and "POST /v1/features" in r.json()["error"]["message"]
        )
        r = client.get("/v1/features")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert r.json()["error"] == {
            "code": "method_not_allowed",
            "message": "GET /v1/features is not allowed; use POST",
            "type": "invalid_request_error",
        }
    assert seen == [("/v1/features", 200)]  # only the requests a route answered are counted
    assert H.status_for(ErrorCode.NOT_FOUND) == 404 and H.status_for(ErrorCode.METHOD_NOT_ALLOWED) == 405
    assert H.status_for(ErrorCode.BODY_TIMEOUT) == 408


def test_build_args_and_deployment_options(tmp_path, monkeypatch):
    """configs/serve.yaml is a valid Serve config whose args build (writing the tiny demo model)."""
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "configs/serve.yaml").read_text()))
    app = schema.applications[0]
    assert app.import_path == "deployments.app:build_app"
    monkeypatch.chdir(tmp_path)
    config = resolve_app_config(app.args)
    assert (tmp_path / ".demo/tiny-llava/config.json").is_file()
    assert config.model.checkpoint == str(tmp_path / ".demo/tiny-llava")
    # The proxy's own timeout stays above ours (our 504 comes first), as llava-features serve sets it.
    assert (
        schema.http_options.request_timeout_s
        >= proxy_request_timeout_s(config)
        > config.serve.request_timeout_s
    )
    opts = deployment_options(config)
    assert opts["encoder"]["max_ongoing_requests"] >= config.serve.max_batch_size
    assert opts["encoder"]["autoscaling_config"]["max_replicas"] == config.serve.max_replicas
    # The proxy's queue (plain-text 503s) is the last guard: it holds what a replica is handed, at
    # least twice what our own admission takes (our JSON 503 answers first).
    admitted = (
        max(config.serve.max_ongoing_requests, config.serve.max_batch_size) + config.serve.max_queued_requests
    )
    assert opts["encoder"]["max_queued_requests"] == opts["encoder"]["max_ongoing_requests"] >= 2 * admitted
    with pytest.raises(ValueError, match="Unknown build_app arg"):
        resolve_app_config({"modle": "x"})
    # One deployment: its replicas serve HTTP, so the old `ingress` options are refused by name.
    with pytest.raises(ConfigError, match="no ingress deployment.*'encoder'"):
        deployment_options(config, {"encoder": {"num_cpus": 1}, "ingress": {"num_cpus": 0.5}})
    with pytest.raises(ConfigError, match="serve.max_decode_pixels .* decode.max_image_pixels"):
        deployment_options(
            dataclasses.replace(config, serve=dataclasses.replace(config.serve, max_decode_pixels=10))
        )
    assert with_api_key_from_env(config).serve.api_key is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert with_api_key_from_env(config).serve.api_key == "from-env"


@slow
def test_cli_serve_blocks_until_stopped(tiny_llava):
    """`llava-features serve --model PATH --port P` with RAY_ADDRESS unset: own local Ray, serves, stops."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "llava_features", "serve", "--model", str(tiny_llava), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 150
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.TransportError):
                ready = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
            if ready:
                break
            time.sleep(0.25)
        assert ready, (
            proc.stdout.read().decode(errors="replace")[-3000:] if proc.poll() is not None else "not ready"
        )
        r = httpx.post(f"http://127.0.0.1:{port}/v1/features", content=IMAGES["a.png"], timeout=30)
        assert r.status_code == 200 and H.load_npy(r.content).shape[0] > 0
        proc.send_signal(signal.SIGTERM)  # Ctrl-C (SIGINT) takes the same path
        assert proc.wait(timeout=90) == 0
        assert f"llava-features listens on http://127.0.0.1:{port}: POST /v1/features" in (
            proc.stdout.read().decode(errors="replace")
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)


@slow
def test_serve_run_config_prints_where_it_listens(tmp_path):
    """`serve run configs/serve.yaml` (Ray's CLI, onto a token-auth cluster on free ports) says where
    the endpoint listens, and it answers there."""
    from tests.fixtures.ray_cluster import ray_head

    port = free_port()
    config = (REPO / "configs" / "serve.yaml").read_text().replace("port: 8000", f"port: {port}")
    assert f"port: {port}" in config
    (tmp_path / "serve.yaml").write_text(config)
    announced = (
        f"llava-features will listen, once its replicas are up (`serve status`), on http://127.0.0.1:{port}:"
    )
    with ray_head(num_cpus=2) as head:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("serve")), "run", "serve.yaml"],
            cwd=tmp_path,
            env=head.client_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        lines: list[str] = []
        reader = threading.Thread(
            target=lambda: lines.extend(iter(lambda: proc.stdout.readline().decode(errors="replace"), "")),
            daemon=True,
        )
        reader.start()
        try:
            deadline = time.monotonic() + 180
            ready = False
            while time.monotonic() < deadline and proc.poll() is None and not ready:
                with contextlib.suppress(httpx.TransportError):
                    ready = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
                time.sleep(0.5 if ready else 0.25)
            assert ready, "".join(lines)[-3000:]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(announced in line for line in lines):
                time.sleep(0.2)
            assert any(announced in line for line in lines), "".join(lines)[-3000:]
        finally:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: serve run shuts Serve down on the cluster
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- the endpoint --------------------------------------------------------------------------------


@slow
def test_features_equal_in_process_encoder(main, expected, local_encoder):
    for name, data in IMAGES.items():
        features, pooled, (width, height) = expected[name]
        r = main.post("/v1/features", content=data, headers={"content-type": "application/octet-stream"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/x-npy"
        served = H.load_npy(r.content)
        assert served.dtype == np.float16
        assert_same_features(served, features)
        assert r.headers["x-model-fingerprint"] == local_encoder.fingerprint
        assert (int(r.headers["x-image-width"]), int(r.headers["x-image-height"])) == (width, height)

        r = main.post(f"/v1/features?image_id={name}", content=data, headers={"accept": "application/json"})
        body = r.json()
        assert body["image_id"] == name and (body["width"], body["height"]) == (width, height)
        assert body["fingerprint"] == local_encoder.fingerprint
        assert body["dtype"] == "float16" and body["shape"] == list(features.shape)
        assert_same_features(H.decode_array_payload(body), features)

        r = main.post("/v1/features?pooled=true", files={"image": (name, data)})
        assert r.status_code == 200, r.text
        vector = H.load_npy(r.content)
        assert vector.dtype == np.float32 and vector.shape == pooled.shape
        np.testing.assert_allclose(vector, pooled, rtol=1e-5, atol=1e-6)
        assert r.headers["x-image-id"] == name


@slow
def test_concurrent_requests_are_batched(main, expected):
    from ray import serve

    handle = serve.get_deployment_handle(ENCODER_DEPLOYMENT, app_name="main")
    handle.reset_stats.remote().result()
    names = [list(IMAGES)[i % len(IMAGES)] for i in range(32)]
    barrier = threading.Barrier(len(names))

    def one(name: str) -> tuple[str, int, bytes]:
        with httpx.Client(base_url=str(main.base_url), timeout=60) as client:
            barrier.wait()
            r = client.post("/v1/features", content=IMAGES[name])
            return name, r.status_code, r.content

    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(one, names))
    for name, status, content in results:
        assert status == 200, content[:200]
        # Other batch compositions may change the float32 sums' last bits before the float16 cast.
        np.testing.assert_allclose(H.load_npy(content), expected[name][0], rtol=1e-2, atol=1e-3)
    stats = handle.stats.remote().result()
    assert stats["images"] == 32
    assert stats["max_batch_size"] > 1, stats
    r = main.get("/debug/stats")
    assert r.status_code == 200 and r.json()["batch_sizes"] == stats["batch_sizes"]


@slow
def test_encode_pixels_through_a_handle(main, local_encoder, expected):
    """The non-HTTP entry point: uint8 pixel batches through a deployment handle, on the replica's
    device queue, give the in-process encoder's features (the seam for callers that decode elsewhere)."""
    from ray import serve

    handle = serve.get_deployment_handle(ENCODER_DEPLOYMENT, app_name="main")
    names = list(IMAGES)
    pixels = np.stack([local_encoder.encode_pre(IMAGES[n]).pixels for n in names])
    out = handle.encode_pixels.remote(pixels, pooled=True).result()
    assert out.dtype == "float16" and out.projected.shape == (len(names), *expected["a.png"][0].shape)
    for i, name in enumerate(names):
        np.testing.assert_allclose(out.projected[i], expected[name][0], rtol=1e-2, atol=1e-3)
        np.testing.assert_allclose(out.pooled[i], expected[name][1], rtol=1e-4, atol=1e-5)
    _ok(main)


@slow
def test_bad_images_get_their_decode_code(main, tmp_path):
    corpus = _bad_corpus(tmp_path)
    assert any(code is not None for code in corpus.values())
    for name, code in corpus.items():
        data = (tmp_path / name).read_bytes()
        r = main.post("/v1/features", content=data, headers={"content-type": "application/octet-stream"})
        if code is None:
            assert r.status_code == 200, (name, r.text)
        else:
            _assert_error(r, 400, code)
        _ok(main)


@slow
def test_batch_route_reports_per_item(main, expected):
    files = [
        ("file", ("a.png", IMAGES["a.png"], "image/png")),
        ("file", ("junk.bin", b"definitely not an image", "application/octet-stream")),
        ("file", ("b.jpg", IMAGES["b.jpg"], "image/jpeg")),
        ("file", ("empty.png", b"", "image/png")),
    ]
    r = main.post("/v1/features:batch", files=files)
    assert r.status_code == 200, r.text
    items = r.json()
    assert [i["image_id"] for i in items] == ["a.png", "junk.bin", "b.jpg", "empty.png"]
    assert [i["ok"] for i in items] == [True, False, True, False]
    assert items[1]["error_code"] == "not_an_image" and items[1]["error_message"]
    assert items[3]["error_code"] == "empty"
    for item in (items[0], items[2]):
        assert_same_features(H.decode_array_payload(item), expected[item["image_id"]][0])
        assert (item["width"], item["height"]) == expected[item["image_id"]][2]
    r = main.post("/v1/features:batch?pooled=true", files=files[:1])
    vector = H.decode_array_payload(r.json()[0])
    np.testing.assert_allclose(vector, expected["a.png"][1], rtol=1e-5, atol=1e-6)
    _assert_error(main.post("/v1/features:batch", content=IMAGES["a.png"]), 415, "unsupported_media_type")
    _ok(main)


@slow
def test_request_errors(main, local_encoder):
    # curl --data-binary's default Content-Type is taken as a raw body, not refused.
    r = main.post(
        "/v1/features", content=IMAGES["a.png"], headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert r.status_code == 200, r.text
    _assert_error(
        main.post("/v1/features", content=b"hello", headers={"content-type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    _ok(main)
    _assert_error(main.post("/v1/features", json={"image": "x"}), 415, "unsupported_media_type")
    _ok(main)
    _assert_error(main.post("/v1/features?pooled=maybe", content=IMAGES["a.png"]), 400, "bad_request")
    _ok(main)
    _assert_error(main.post("/v1/features?format=xml", content=IMAGES["a.png"]), 400, "bad_request")
    _ok(main)
    _assert_error(main.post("/v1/features", files={"meta": (None, "no file here")}), 400, "bad_request")
    _ok(main)
    body = _assert_error(
        main.post("/v1/embeddings", json={"model": "m", "input": ["https://example.com/x.jpg"]}),
        400,
        "bad_request",
    )
    assert "never fetches" in body["error"]["message"]
    _ok(main)
    _assert_error(main.post("/v1/embeddings", json={"model": "m", "input": "plain text"}), 400, "bad_request")
    _assert_error(main.post("/v1/embeddings", json={"model": "m", "input": []}), 400, "bad_request")
    _assert_error(
        main.post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}),
        400,
        "bad_request",
    )
    deep = b"[" * 1000 + b"]" * 1000  # Python's JSON reader recurses: a RecursionError, not a 500
    body = _assert_error(
        main.post("/v1/embeddings", content=deep, headers={"content-type": "application/json"}),
        400,
        "bad_request",
    )
    assert "nested too deeply" in body["error"]["message"]
    _ok(main)
    body = _assert_error(
        main.post("/v1/embeddings", json={"model": "m", "input": ["data:image/png;base64,@@@@"]}),
        400,
        "bad_request",
    )
    assert "base64 alphabet" in body["error"]["message"]
    jpeg_url = _data_url(IMAGES["b.jpg"], "text/plain")
    body = _assert_error(
        main.post("/v1/embeddings", json={"model": "m", "input": [jpeg_url]}), 400, "bad_request"
    )
    assert "media type" in body["error"]["message"]
    _ok(main)
    truncated = IMAGES["b.jpg"][:300]
    try:
        local_encoder.encode_pre(truncated)
    except DecodeError as exc:
        code = str(exc.code)
    body = _assert_error(
        main.post("/v1/embeddings", json={"model": "m", "input": [_data_url(truncated)]}), 400, code
    )
    assert "input[0]" in body["error"]["message"]
    _ok(main)


@pytest.fixture(scope="module")
def dtype_apps(serve_cluster, tiny_llava, apps) -> dict[str, str]:
    """``main`` (float16, the default) plus one application per other output dtype."""
    others = {}
    for dtype in ("float32", "bfloat16"):
        args = tiny_app_args(tiny_llava, max_batch_size=8, request_timeout_s=60)
        args["encoder"] = {"output_dtype": dtype}
        others[f"out-{dtype}"] = (f"/{dtype}", args)
    urls = serve_cluster.deploy_many(others)
    return {"float16": apps["main"], **{dtype: urls[f"out-{dtype}"] for dtype in ("float32", "bfloat16")}}


@slow
@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_every_route_in_every_output_dtype(dtype_apps, tiny_llava, dtype):
    """Each encoding route and /healthz answer 200 with the in-process encoder's numbers, whatever
    ``encoder.output_dtype`` is (bfloat16 leaves as float32, widened exactly)."""
    config = load_config(None, {"model": {"checkpoint": str(tiny_llava)}, "encoder": {"output_dtype": dtype}})
    local = FeatureEncoder(config)
    served_dtype = np.float32 if dtype == "bfloat16" else np.dtype(dtype)
    names = ["a.png", "b.jpg"]
    want = {}
    for name in names:
        out = local.encode_pixels(local.encode_pre(IMAGES[name]).pixels[None], pooled=True)
        assert out.dtype == dtype and isinstance(out.projected, np.ndarray)
        want[name] = (H.response_array(out.projected[0], dtype), out.pooled[0])
    tolerance = 2**-7 if dtype == "bfloat16" else 2**-10  # one ulp of the stored dtype, relative
    with httpx.Client(base_url=dtype_apps[dtype], timeout=60) as client:

        def check(got: np.ndarray, name: str) -> None:
            ref = want[name][0]
            assert got.dtype == served_dtype and got.shape == ref.shape, (got.dtype, got.shape)
            scale = np.abs(ref).astype(np.float32) + 1e-3
            assert np.all(np.abs(got.astype(np.float32) - ref.astype(np.float32)) <= tolerance * scale)

        r = client.post("/v1/features", content=IMAGES["a.png"], headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        check(H.load_npy(r.content), "a.png")
        r = client.post("/v1/features?format=json", content=IMAGES["b.jpg"])
        assert r.status_code == 200, r.text
        check(H.decode_array_payload(r.json()), "b.jpg")
        r = client.post("/v1/features?pooled=true", content=IMAGES["a.png"])
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(H.load_npy(r.content), want["a.png"][1], rtol=1e-5, atol=1e-6)
        r = client.post("/v1/features:batch", files=[("file", (n, IMAGES[n])) for n in names])
        assert r.status_code == 200, r.text
        for name, item in zip(names, r.json(), strict=True):
            assert item["ok"], item
            check(H.decode_array_payload(item), name)
        r = client.post("/v1/embeddings", json={"model": "m", "input": [_data_url(IMAGES["a.png"])]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], want["a.png"][1], rtol=1e-5, atol=1e-6)
        r = client.get("/healthz")
        assert r.status_code == 200 and r.json()["status"] == "ok", r.text
        assert client.get("/v1/models").json()["data"][0]["output_dtype"] == dtype


@slow
def test_models_and_healthz(main, local_encoder):
    r = main.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    assert r.json()["forward_ms"] > 0
    models = main.get("/v1/models").json()
    assert models["object"] == "list"
    card = models["data"][0]
    assert card["object"] == "model" and card["id"] == "llava"
    assert card["fingerprint"] == local_encoder.fingerprint
    assert card["num_tokens"] == local_encoder.num_tokens and card["feature_dim"] == local_encoder.feature_dim
    assert card["resampler"] == local_encoder.info()["resampler"] != "pillow"


@slow
def test_unknown_route_and_wrong_method_are_our_errors(main):
    _assert_error(main.get("/v1/nope"), 404, "not_found")
    r = _assert_error(main.get("/v1/features"), 405, "method_not_allowed")
    assert "POST" in r["error"]["message"]
    _assert_error(main.post("/healthz"), 405, "method_not_allowed")
    _ok(main)


@slow
def test_openai_client_embeddings(main, expected):
    import openai

    client = openai.OpenAI(base_url=str(main.base_url).rstrip("/") + "/v1", api_key="unused", max_retries=0)
    names = ["a.png", "b.jpg", "c.png"]
    urls = [_data_url(IMAGES[n], "image/png" if n.endswith("png") else "image/jpeg") for n in names]
    response = client.embeddings.create(model="llava", input=urls)  # base64 encoding by default
    assert [d.index for d in response.data] == [0, 1, 2]
    for name, item in zip(names, response.data, strict=True):
        np.testing.assert_allclose(
            np.asarray(item.embedding, dtype=np.float32), expected[name][1], rtol=1e-5, atol=1e-6
        )
    single = client.embeddings.create(model="llava", input=urls[0], encoding_format="float")
    np.testing.assert_allclose(
        np.asarray(single.data[0].embedding, dtype=np.float32), expected["a.png"][1], rtol=1e-5, atol=1e-6
    )
    assert single.model == "llava" and single.usage.total_tokens == 0


@slow
def test_api_key(apps, strict):
    url = apps["strict"]
    with httpx.Client(base_url=url, timeout=60) as anonymous:
        for method, path in [
            ("POST", "/v1/features"),
            ("POST", "/v1/embeddings"),
            ("GET", "/v1/models"),
            ("GET", "/debug/stats"),
        ]:
            r = anonymous.request(method, path, content=IMAGES["a.png"])
            _assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
        r = anonymous.post("/v1/features", content=IMAGES["a.png"], headers={"authorization": "Bearer wrong"})
        _assert_error(r, 401, "unauthorized")
        assert anonymous.get("/healthz").status_code == 200
        _assert_error(anonymous.get("/openapi.json"), 401, "unauthorized")
    assert "/v1/features:batch" in strict.get("/openapi.json").json()["paths"]
    _ok(strict)
    card = strict.get("/v1/models").json()["data"][0]
    assert card["config"]["serve"]["api_key"] == "***"
    import openai

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).embeddings.create(
            model="llava", input=_data_url(IMAGES["a.png"])
        )
    ok = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0).embeddings.create(
        model="llava", input=_data_url(IMAGES["a.png"])
    )
    assert len(ok.data[0].embedding) > 0


@slow
def test_body_limit_413(strict):
    big = b"\xff\xd8" + bytes(STRICT_BODY_LIMIT + 10)
    _assert_error(strict.post("/v1/features", content=big), 413, "payload_too_large")
    _ok(strict)

    def chunked():  # no Content-Length: counted while streaming
        for _ in range(4):
            yield bytes(STRICT_BODY_LIMIT // 2)

    _assert_error(strict.post("/v1/features", content=chunked()), 413, "payload_too_large")
    _ok(strict)
    _assert_error(strict.post("/v1/features:batch", files={"f": ("x.jpg", big)}), 413, "payload_too_large")
    _ok(strict)


@slow
def test_stalled_body_gets_408(strict):
    """A body that stops arriving is answered 408 ``body_timeout`` after ``serve.body_timeout_s``."""

    def stalled_body():
        data = IMAGES["a.png"]
        yield data[:100]
        time.sleep(STRICT_BODY_TIMEOUT_S + 1.5)
        yield data[100:]

    started = time.perf_counter()
    try:
        r = strict.post("/v1/features", content=stalled_body())
    except httpx.TransportError:  # the server answered and closed while we were still sending
        pytest.fail("connection closed before the 408 could be read")
    _assert_error(r, 408, "body_timeout")
    assert time.perf_counter() - started < 30
    _ok(strict)


@slow
def test_overload_503_with_retry_after(apps, strict):
    """One request at a time + one queued on the encoder: 32 at once must shed some with 503."""
    barrier = threading.Barrier(32)

    def one(_: int) -> httpx.Response:
        with httpx.Client(
            base_url=apps["strict"], timeout=60, headers={"authorization": f"Bearer {API_KEY}"}
        ) as c:
            barrier.wait()
            return c.post("/v1/features", content=IMAGES["b.jpg"])

    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(one, range(32)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 503}, statuses
    shed = [r for r in responses if r.status_code == 503]
    assert shed, statuses
    assert 200 in statuses, statuses
    ours = [r for r in shed if r.headers.get("content-type", "").startswith("application/json")]
    for r in shed:  # shed by the ingress (our JSON body) or, past its queue, by Serve's proxy (text)
        assert int(r.headers["retry-after"]) >= 1
    for r in ours:
        assert r.json()["error"]["code"] == "overloaded"
    assert ours, "no request reached the encoder's max_queued_requests limit"
    _ok(strict)


def _proc_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes, from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


HOSTILE_SIDE = 9000
PEAK_BYTES_PER_PIXEL = 12
"""Bound on a replica's peak memory per pixel being decoded (docs/benchmarks.md measured ~10 for
RGB: Pillow's 4-byte pixels plus the array the resampler reads)."""


@slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_hostile_images_stay_within_the_decode_budget(serve_cluster, tiny_llava, expected):
    """Six 9000x9000 PNGs (~250 KB each, 81 M pixels declared: under the default pixel limit) at
    once on a replica with six decode threads: it decodes them within its pixel budget (the default,
    decode.max_image_pixels: one such image at a time), so its RSS grows by at most
    budget x PEAK_BYTES_PER_PIXEL, and it hands the memory back afterwards. (Measured: without the
    budget the six decode at once, +3.4 GB; without malloc_trim ~260 MB stay held.)"""
    buf = io.BytesIO()
    Image.new("RGB", (HOSTILE_SIDE, HOSTILE_SIDE), (120, 30, 200)).save(buf, "PNG")
    hostile = buf.getvalue()
    assert len(hostile) < 300_000
    url = serve_cluster.deploy(
        "memory", "/memory", tiny_app_args(tiny_llava, decode_threads=6, request_timeout_s=180)
    )
    with httpx.Client(base_url=url, timeout=180) as client:
        _ok(client)
        stats = client.get("/debug/stats").json()
        assert stats["decode_threads"] == 6
        budget = stats["decode_budget_pixels"]
        assert budget == load_config(None).decode.max_image_pixels < 2 * HOSTILE_SIDE**2
        pid = stats["pid"]
        before = _proc_memory(pid)["VmRSS"]
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        barrier = threading.Barrier(6)

        def one(_: int) -> httpx.Response:
            with httpx.Client(base_url=url, timeout=180) as c:
                barrier.wait()
                return c.post("/v1/features", content=hostile, headers={"content-type": "image/png"})

        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(one, range(6)))
        peak = _proc_memory(pid)["VmHWM"]
        for r in responses:
            assert r.status_code == 200, r.text[:300]
            assert H.load_npy(r.content).shape == expected["a.png"][0].shape
            assert (int(r.headers["x-image-width"]), int(r.headers["x-image-height"])) == (HOSTILE_SIDE,) * 2
        stats = client.get("/debug/stats").json()
        assert stats["decode_pixels_peak"] <= budget and stats["decode_budget_waits"] >= 5, stats
        assert stats["decode_pixels_in_flight"] == 0
        growth = peak - before
        assert growth <= budget * PEAK_BYTES_PER_PIXEL, (growth, budget)
        deadline = time.monotonic() + 30
        while True:  # memory goes back once the burst is over (malloc_trim on the decode pool)
            after = _proc_memory(pid)["VmRSS"]
            if after - before <= 150 * 2**20 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert after - before <= 150 * 2**20, (before, peak, after)
        assert client.get("/debug/stats").json()["memory_trims"] >= 1
        _ok(client)


@slow
def test_bench_serve_runs(serve_cluster, tiny_llava):
    from deployments.bench import ServeOptions, bench_serve

    config = load_config(None, {"model": {"checkpoint": str(tiny_llava)}, "serve": {"max_batch_size": 8}})
    options = ServeOptions(
        requests=20,
        concurrency=4,
        warmup=2,
        port=serve_cluster.port,
        ray_actor_options={"encoder": {"num_cpus": 0.1}},
    )
    figures = bench_serve(config, options)
    for key in (
        "serve_p50_ms",
        "serve_p99_ms",
        "serve_throughput_rps",
        "direct_p50_ms",
        "direct_p99_ms",
        "direct_throughput_ips",
        "direct_cpu_ms_per_image",
        "client_cpu_ms_per_request",
    ):
        assert figures[key] > 0, (key, figures)
    assert figures["serve_errors"] == 0
    assert "serve_cpu_ms_per_request" not in figures  # a Ray session shared with other apps: not measured
    assert "overhead_p50_ms" in figures


@slow
def test_killed_encoder_replica_is_replaced(main):
    """Last: kill the encoder replica; the endpoint recovers and serves again."""
    import ray

    before = main.get("/debug/stats").json()["replica"]
    ray.kill(ray.get_actor(before, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 120
    statuses = []
    while time.monotonic() < deadline:
        try:
            r = main.post("/v1/features", content=IMAGES["a.png"], timeout=10)
            statuses.append(r.status_code)
            if r.status_code == 200:
                break
            assert r.status_code in (500, 503), r.text  # while the replica is being replaced
        except httpx.TransportError:
            statuses.append(-1)
        time.sleep(0.5)
    assert statuses and statuses[-1] == 200, statuses
    after = main.get("/debug/stats").json()["replica"]
    assert after != before
    _ok(main)


@slow
def test_features_equal_offline_job(main, tiny_llava, tmp_path):
    """The endpoint and the offline job serve the same numbers for the same image (float16)."""
    from pipeline.offline import run_job
    from pipeline.table import read_features

    folder = tmp_path / "images"
    folder.mkdir()
    for name, data in IMAGES.items():
        (folder / name).write_bytes(data)
    config = load_config(None, {"model": {"checkpoint": str(tiny_llava)}, "job": {"num_cpus_per_actor": 0.5}})
    summary = run_job(config, str(folder), str(tmp_path / "out"))
    assert summary.ok == len(IMAGES)
    offline = read_features(str(tmp_path / "out"))
    assert offline.features.dtype == np.float16 and offline.state == "complete"
    assert offline.identity.fingerprint == summary.fingerprint and offline.num_rows == len(IMAGES)
    for row, name in enumerate(offline.image_ids):
        r = main.post("/v1/features", content=IMAGES[name])
        assert r.status_code == 200, r.text
        assert r.headers["x-model-fingerprint"] == summary.fingerprint
        assert_same_features(H.load_npy(r.content), offline.features[row])


SLOW_UPLOADS = 300
HOSTILE_BODY_TIMEOUT_S = 4.0


def _slow_uploads(port: int, prefix: str, n: int) -> list:
    """``n`` connections that each send the headers of a 100 kB upload and then nothing more yet."""
    import socket

    head = (
        f"POST {prefix}/v1/features HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
        "Content-Length: 100000\r\n\r\n"
    ).encode()
    socks = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(head + b"\xff")
        socks.append(sock)
    return socks


@slow
def test_slow_uploads_cannot_starve_admission(serve_cluster, tiny_llava):
    """Hundreds of uploads trickling in (1 byte every 2 s) hold no admission slot: a normal request
    still gets 200 quickly; each slow upload gets 408 once ``serve.body_timeout_s`` has passed; and at
    overload the refusals (503) come at once, before the bodies are read."""
    url = serve_cluster.deploy(
        "hostile",
        "/hostile",
        tiny_app_args(
            tiny_llava,
            max_batch_size=4,
            max_ongoing_requests=4,
            max_queued_requests=4,
            body_timeout_s=HOSTILE_BODY_TIMEOUT_S,
            request_timeout_s=60,
        ),
    )
    with httpx.Client(base_url=url, timeout=60) as client:
        _ok(client)
        # Overload: 48 requests at once (kept-alive connections, opened before) on 4 in progress + 4
        # waiting: those refused get their 503 at once.
        import http.client

        conns = [http.client.HTTPConnection("127.0.0.1", serve_cluster.port, timeout=60) for _ in range(48)]
        for conn in conns:
            conn.request("GET", "/hostile/v1/models")
            conn.getresponse().read()
        barrier = threading.Barrier(len(conns))

        def one(conn: http.client.HTTPConnection) -> tuple[int, float]:
            barrier.wait()
            t = time.perf_counter()
            conn.request(
                "POST", "/hostile/v1/features", body=IMAGES["b.jpg"], headers={"content-type": "image/jpeg"}
            )
            response = conn.getresponse()
            response.read()
            return response.status, time.perf_counter() - t

        with ThreadPoolExecutor(len(conns)) as pool:
            answers = list(pool.map(one, conns))
        for conn in conns:
            conn.close()
        refused = sorted(s for code, s in answers if code == 503)
        assert {code for code, _ in answers} <= {200, 503} and refused, answers
        p90 = refused[int(0.9 * (len(refused) - 1))]
        print(f"{len(refused)} refusals of {len(answers)}: p90 {p90:.3f}s, max {refused[-1]:.3f}s")
        assert p90 < 1.0, refused

        refused_before = client.get("/debug/stats").json()["requests_refused"]
        socks = _slow_uploads(serve_cluster.port, "/hostile", SLOW_UPLOADS)
        stop = threading.Event()

        def trickle() -> None:
            while not stop.wait(2.0):
                for sock in socks:
                    with contextlib.suppress(OSError):
                        sock.send(b"\x00")

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        try:
            time.sleep(1.0)  # every slow upload has reached the replica
            started = time.perf_counter()
            _ok(client)
            normal_s = time.perf_counter() - started
            stats = client.get("/debug/stats").json()
            # the slow uploads are past the proxy, yet none holds an admission slot
            assert stats["requests_inside"] == 0 and stats["requests_refused"] == refused_before, stats
            # each slow upload is answered 408 after body_timeout_s
            socks[0].settimeout(HOSTILE_BODY_TIMEOUT_S + 30)
            answer = ""
            while '"body_timeout"' not in answer and (chunk := socks[0].recv(4096)):
                answer += chunk.decode(errors="replace")
            assert answer.startswith("HTTP/1.1 408"), answer[:200]
            assert '"body_timeout"' in answer, answer[-300:]
        finally:
            stop.set()
            trickler.join()
            for sock in socks:
                sock.close()
        print(f"a normal request beside {SLOW_UPLOADS} slow uploads: {normal_s:.3f}s")
        assert normal_s < 10, normal_s
        _ok(client)
