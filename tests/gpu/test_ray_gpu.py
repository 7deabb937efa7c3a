"""The two front doors on a GPU, through Ray: the offline job on a GPU actor (``num_gpus=1``) and the
endpoint on a GPU replica, at parity with each other. Marked ``ray``: skipped where Ray is not
installed (and, like every test here, without CUDA). One local Ray for the module (the Serve
fixture's), which sees the machine's GPUs.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import load_config
from tests.corpus import write_bad_corpus, write_real_photos
from tests.gpu.common import rel_error

pytestmark = pytest.mark.ray

CONCURRENCY = 32
PARITY_REL_ERROR = 1e-3
"""Endpoint vs job features (both float32 on the GPU, other batch compositions): ‖Δ‖ / ‖job‖."""


@pytest.fixture(autouse=True)
def tf32_off() -> None:
    """Torch's own TF32 defaults in this module: the test process's numbers are compared with the
    Ray workers', which run with them (cuDNN convolutions in TF32)."""


def _settings(checkpoint: Path) -> dict[str, Any]:
    return {"model": {"checkpoint": str(checkpoint), "device": "cuda", "dtype": "float32"}}


@pytest.fixture(scope="module")
def job_output(serve_cluster, tiny_models, tmp_path_factory) -> dict[str, Any]:
    """The job on the tiny checkpoint, one GPU per encoder actor, over photos and bad inputs."""
    from pipeline.offline import run_job

    folder = tmp_path_factory.mktemp("ray-gpu-corpus")
    expected: dict[str, str | None] = {p.name: None for p in write_real_photos(folder, n=6)}
    expected.update(write_bad_corpus(folder))
    manifest = folder.parent / f"{folder.name}.csv"
    manifest.write_text("\n".join(["image_id,uri", *(f"{n},{folder / n}" for n in sorted(expected))]) + "\n")
    settings = _settings(tiny_models["llava"])
    settings["job"] = {
        "shard_size": 4,
        "num_gpus_per_actor": 1,
        "num_cpus_per_actor": 0.5,
        "max_error_fraction": 0.9,
    }
    config = load_config(None, settings)
    out = tmp_path_factory.mktemp("ray-gpu-job") / "out"
    summary = run_job(config, str(manifest), str(out))
    return {"summary": summary, "out": out, "expected": expected, "folder": folder, "config": config}


def test_job_on_a_gpu_actor_writes_every_row_once(job_output):
    from pipeline.encoder import FeatureEncoder
    from pipeline.table import SUCCESS_FILE, read_features

    summary, out, expected = job_output["summary"], job_output["out"], job_output["expected"]
    assert summary.inputs == len(expected) and summary.read == len(expected)
    assert (out / SUCCESS_FILE).exists()
    everything = read_features(str(out), status=None)
    assert everything.identity.encoder["compute_dtype"] == "float32" and everything.state == "complete"
    table = everything.table
    ids = table.column("image_id").to_pylist()
    assert sorted(ids) == sorted(expected) and len(set(ids)) == len(ids)
    codes = dict(zip(ids, table.column("error_code").to_pylist(), strict=True))
    assert codes == expected
    ok = read_features(str(out))
    local = FeatureEncoder(job_output["config"])  # the same settings, in this process's CUDA context
    for row, uri in enumerate(ok.table.column("uri").to_pylist()):
        ref = local.encode_pixels(local.encode_pre(Path(uri).read_bytes()).pixels[None]).projected[0]
        assert rel_error(ok.features[row], ref) <= PARITY_REL_ERROR, uri
    local.close()


def test_endpoint_on_a_gpu_replica_matches_the_job(serve_cluster, tiny_models, job_output):
    """A GPU replica (``serve.num_gpus_per_replica: 1``): /healthz, the model card on cuda, and 32
    concurrent requests answered with the job's features."""
    import httpx

    from deployments import http as H
    from pipeline.table import read_features
    from tests.fixtures.serve import tiny_app_args

    args = tiny_app_args(tiny_models["llava"], num_gpus_per_replica=1, max_batch_size=16)
    args["model"] = _settings(tiny_models["llava"])["model"]
    url = serve_cluster.deploy("gpu", "/gpu", args)
    offline = read_features(str(job_output["out"]))
    rows = {image_id: offline.features[i] for i, image_id in enumerate(offline.image_ids)}
    folder = job_output["folder"]
    names = [list(rows)[i % len(rows)] for i in range(CONCURRENCY)]
    with httpx.Client(base_url=url, timeout=120) as client:
        health = client.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok", health.text
        card = client.get("/v1/models").json()["data"][0]
        assert str(card.get("device", "")).startswith("cuda"), card.get("device")
        assert card["fingerprint"] == job_output["summary"].fingerprint

        def one(name: str) -> tuple[str, int, bytes]:
            r = client.post("/v1/features", content=(folder / name).read_bytes())
            return name, r.status_code, r.content

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(one, names))
    for name, status, content in results:
        assert status == 200, content[:300]
        served = H.load_npy(content)
        assert served.shape == rows[name].shape
        assert rel_error(served, rows[name]) <= PARITY_REL_ERROR, name
