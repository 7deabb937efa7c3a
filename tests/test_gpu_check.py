"""``scripts/gpu-check`` on a CPU, and the torch-level product without Ray, FastAPI and python-multipart.

- The GPU machine has torch, transformers, torchvision, pyarrow, Pillow and numpy but no Ray,
  FastAPI, python-multipart or deltalake: with those made unimportable (the script's import blocker),
  the torch-level modules (the table package included) import and ``bench encoder --tiny`` runs
  through the command line.
- The script's dry run (every step on the CPU, tiny sizes), with the same modules blocked, writes
  its JSON and Markdown with real values; its helpers (a step that hangs is stopped, figures and
  tables from results) are checked directly.
"""

from __future__ import annotations

import gzip
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu-check"
BLOCKED = "ray,fastapi,multipart,python_multipart,starlette"
TABLE_READERS = "deltalake,duckdb,polars"
"""Not on the GPU machine either: the table's modules import without them (delta-rs is loaded when a
table is opened), and ``bench encoder`` never opens one."""


def load_script() -> ModuleType:
    """``scripts/gpu-check`` as a module (it has no ``.py`` suffix)."""
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    loader.exec_module(module)
    return module


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OUT")}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    return env


def test_torch_level_product_imports_and_benchmarks_without_ray_fastapi_multipart(tmp_path):
    gpu_check = load_script()
    out = tmp_path / "bench.json"
    program = gpu_check.IMPORT_BLOCKER + textwrap.dedent(
        f"""
        import json, sys
        for name in ("ray", "fastapi", "multipart", "python_multipart", "starlette", "deltalake", "deployments.app"):
            try:
                __import__(name)
            except ImportError:
                pass
            else:
                raise SystemExit(f"{{name}} could be imported: the blocker does not work")
        import pipeline.encoder, pipeline.images, pipeline.images.gpu_decode, pipeline.table, pipeline.shards
        import pipeline.bench.encoder, pipeline.bench.pipeline, pipeline.bench.profile, pipeline.offline
        from llava_features.cli import main
        rc = main(["bench", "encoder", "--tiny", "--device", "cpu", "--batch-sizes", "2", "--warmup", "1",
                   "--repeats", "1", "--ceiling-size", "64", "--anyres-images", "0", "--error-images", "1",
                   "--host-batches", "1", "--json", {str(out)!r}])
        blocked = {tuple(f"{BLOCKED},{TABLE_READERS}".split(","))!r}
        print("LOADED", json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in blocked)))
        sys.exit(rc)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", program],
        cwd=REPO,
        env=_env(GPU_CHECK_BLOCK_IMPORTS=f"{BLOCKED},{TABLE_READERS}"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "LOADED []"
    encoder = json.loads(out.read_text())["results"]["encoder"]
    row = encoder["rows"][0]
    assert row["ours_images_per_s"] > 0 and row["seed_images_per_s"] > 0 and row["ours_host_images_per_s"] > 0
    assert encoder["rel_error"]["ours_vs_fp32_seed"] < 1e-5


def test_dry_run_without_ray_writes_the_report(tmp_path):
    gpu_check = load_script()
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
        cwd=REPO,
        env=_env(GPU_CHECK_BLOCK_IMPORTS=BLOCKED),
        capture_output=True,
        text=True,
        timeout=400,
    )
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # What the device tool brings back: at most 8 plain files, 16 MiB each, no folders.
    files = sorted(tmp_path.iterdir())
    assert all(p.is_file() for p in files) and len(files) <= 8
    assert {p.name for p in files} == set(gpu_check.OUTPUT_FILES)
    assert all(p.stat().st_size < 16 * 2**20 for p in files)

    payload = json.loads((tmp_path / "gpu-check.json").read_text())
    assert payload["mode"] == "dry-run" and 0 < payload["seconds"] <= seconds
    steps = payload["steps"]
    for name in ("env", "build", "tests", "encoder", "pipeline", "profile"):
        assert steps[name]["status"] == "ok", (name, steps[name])
        assert steps[name]["seconds"] > 0
    assert steps["serve"]["status"] == "skipped" and "not importable" in steps["serve"]["reason"]

    env = payload["env"]
    assert env["python"] and env["torch"] and env["versions"]["transformers"] and env["versions"]["pyarrow"]
    assert env["importable"]["deltalake"] is True and env["versions"]["deltalake"]  # the table's log
    assert env["cuda_available"] is False  # CUDA hidden in a dry run
    assert env["importable"]["ray"] is False and env["importable"]["fastapi"] is False
    assert env["serve_importable"] is False
    build = payload["results"]["build"]
    assert build["built"] in ("built", "no") and build["route"] in ("compiled-avx2", "compiled", "pillow")
    if build["built"] == "built":
        assert build["verify"]["loads"] and build["verify"]["resize_window"]

    f = payload["figures"]
    for key in (
        "ceiling_tflops",
        "ceiling_images_per_s",
        "seed_images_per_s",
        "plain_images_per_s",
        "fast_images_per_s",
        "fast_fraction_of_ceiling",
        "fast_ratio_vs_seed",
        "host_images_per_s",
        "encoder_images_per_s",
        "encoder_fraction_of_ceiling",
        "encoder_ratio_vs_seed",
        "anyres_tiles_images_per_s",
        "anyres_packed_images_per_s",
        "pipeline_encoder_only_images_per_s",
        "pipeline_decode_only_images_per_s",
        "pipeline_actor_only_images_per_s",
        "pipeline_inprocess_images_per_s",
        "pipeline_sink_mb_per_s",
        "job_ratio",
        "profile_ms_per_batch",
        "tests_tests",
    ):
        assert isinstance(f[key], int | float) and f[key] > 0, (key, f[key])
    assert f["fast_rel_error_vs_fp32"] < 1e-5 and f["plain_rel_error_vs_fp32"] < 1e-5
    assert f["pipeline_exactly_once"] is True
    assert f["profile_gemm_share"] > 0
    assert sum(f[f"profile_{k}_share"] for k in ("gemm", "attention", "other")) == pytest.approx(1.0)
    assert f["tests_skipped"] == f["tests_tests"] and f["tests_failures"] == 0  # no CUDA: all skipped
    assert "CUDA is not available" in next(iter(payload["results"]["tests"]["skip_reasons"]))
    assert payload["results"]["encoder_compiled"]["skipped"].startswith("dry run")
    assert f["met"]["endpoint_p50_ms"] is None  # not measured: Serve is blocked

    md = (tmp_path / "gpu-check.md").read_text()
    assert md.startswith("# llava-features gpu-check (dry-run)")
    assert f"torch {env['torch']}" in md and "driver:" in md and "CUDA (torch build):" in md
    for label in (
        "encoder images/s",
        "fraction of the measured bf16 matmul ceiling",
        "ours ÷ seed",
        "relative error vs the fp32 seed path",
        "job in process (no Ray)",
        "endpoint saturated",
        "endpoint single-image p50",
    ):
        assert f"| {label}" in md, label
    assert "| pipeline | ok |" in md and "| serve | skipped |" in md

    junit = ET.parse(tmp_path / "junit.xml").getroot()
    assert sum(int(s.get("tests", 0)) for s in junit.iter("testsuite")) == f["tests_tests"]
    assert "Self CPU" in (tmp_path / "profile.txt").read_text()
    with gzip.open(tmp_path / "trace.json.gz", "rt") as trace:
        assert json.load(trace)["traceEvents"]
    assert json.loads((tmp_path / "bench-encoder.json").read_text())["results"]["encoder"]["rows"]
    log = (tmp_path / "gpu-check.log").read_text()
    assert "===== encoder:" in log and "===== profile:" in log


def test_a_hanging_step_is_stopped_at_its_timeout(tmp_path):
    gpu_check = load_script()
    check = gpu_check.Check(tmp_path, dry_run=True, budget_s=60, python=sys.executable, keep=False)
    try:
        pidfile = tmp_path / "child.pid"
        code = (
            "import os, subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(pidfile)!r}, 'w').write(str(child.pid))\n"
            "print('started', flush=True)\n"
            "time.sleep(120)\n"
        )
        started = time.monotonic()
        outcome = check.run("hang", [sys.executable, "-c", code], timeout_s=3)
        assert time.monotonic() - started < 20
        assert outcome.status == "timeout" and "started" in outcome.tail
        child = int(pidfile.read_text())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.1)
        assert not _alive(child), "the step's own child process outlived the timeout"
    finally:
        check.close()


def test_the_pipeline_step_needs_deltalake(tmp_path):
    """Without delta-rs (not on the GPU machine unless carried) the job cannot write its table: the step
    fails at once, saying so, instead of after loading the model."""
    gpu_check = load_script()
    check = gpu_check.Check(tmp_path, dry_run=True, budget_s=60, python=sys.executable, keep=False)
    try:
        check.results["env"] = {"importable": {"deltalake": False}}
        started = time.monotonic()
        outcome = check.step_pipeline(timeout_s=60)
        assert time.monotonic() - started < 5
        assert outcome.status == "failed" and "deltalake is not importable" in outcome.reason
        assert check.results["pipeline"] == {"failed": outcome.reason}
    finally:
        check.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not yet reaped by its parent's parent) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_figures_and_markdown_from_results():
    gpu_check = load_script()
    row = {
        "batch_size": 256,
        "seed_images_per_s": 900.0,
        "ours_host_images_per_s": 1100.0,
        "variants": {
            "plain": {"images_per_s": 1000.0, "fraction_of_ceiling": 0.5, "ratio_vs_seed": 1.11},
            "fast": {"images_per_s": 1200.0, "fraction_of_ceiling": 0.6, "ratio_vs_seed": 1.33},
        },
    }
    compiled_row = {
        "batch_size": 256,
        "seed_images_per_s": 890.0,
        "ours_images_per_s": 1400.0,
        "ours_fraction_of_ceiling": 0.70,
        "ratio_vs_seed": 1.57,
        "variants": {"compiled": {"peak_memory_gib": 7.5, "warmup_s": 80.0}},
    }
    results = {
        "encoder": {
            "rows": [row],
            "ceiling": {"tflops": 780.0, "images_per_s": 2000.0},
            "rel_error": {
                "variants_vs_fp32_seed": {"plain": 0.013, "fast": 0.0131},
                "seed_vs_fp32_seed": 0.001,
            },
        },
        "encoder_compiled": {"rows": [compiled_row], "rel_error": {"ours_vs_fp32_seed": 0.0132}},
        "pipeline": {"ratio": 0.8, "exactly_once": True},
        "serve": {"serve_throughput_rps": 900.0, "direct_throughput_ips": 1000.0, "serve_p50_ms": 30.0},
        "tests": {
            "tests": 3,
            "passed": 3,
            "failures": 0,
            "errors": 0,
            "skipped": 0,
            "figures": {
                "memory_vit_l_bf16_eager": {
                    "default_batch_size": 256,
                    "per_batch": {"256": {"peak_gib": 6.2}},
                },
                "vit_l_float32_qkv_on_gelu_on_projected_max_abs": 3e-5,
                "vit_l_bfloat16_qkv_on_gelu_on_projected_rel_error": 0.012,
            },
        },
    }
    f = gpu_check.collect_figures(results)
    assert f["best_variant"] == "compiled" and f["encoder_images_per_s"] == 1400.0
    assert f["encoder_rows"]["256"] == {
        "plain": 1000.0,
        "fast": 1200.0,
        "compiled": 1400.0,
        "seed": 900.0,
        "host": 1100.0,
    }
    assert f["endpoint_ratio"] == pytest.approx(0.9)
    assert f["peak_memory_gib"] == {"256": 6.2}
    assert f["tests_vit_l_fp32_max_abs"] == 3e-5 and f["tests_vit_l_bf16_rel_error"] == 0.012
    assert f["met"] == {
        "encoder_images_per_s": True,
        "encoder_fraction_of_ceiling": True,
        "encoder_ratio_vs_seed": True,
        "rel_error_bf16_vs_fp32": True,
        "job_ratio": False,
        "endpoint_ratio": True,
        "endpoint_p50_ms": False,
    }
    payload = {
        "mode": "gpu",
        "env": {"device_name": "NVIDIA H200", "driver": "570.1", "torch": "2.11.0", "versions": {}},
        "figures": f,
        "steps": {"env": {"status": "ok", "seconds": 1.0}},
        "results": results,
        "finished": "now",
        "seconds": 1.0,
        "budget_s": 470.0,
    }
    md = gpu_check.markdown(payload)
    assert "- device: NVIDIA H200" in md and "driver: 570.1" in md
    assert "| encoder images/s, batch 256 (compiled) | ≥ 1,300 | 1,400 | yes |" in md
    assert "| job in process (no Ray), steady ÷ encoder-only | ≥ 0.85 | 0.80 | no |" in md
    assert "| 256 | 1,000.0 | 1,200.0 | 1,400.0 | 900.0 | 1,100.0 |" in md
    assert "| 256 (default) | 6.20 | 16 GB |" in md
