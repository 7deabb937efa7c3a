"""``llava-features bench pipeline``: the offline job end to end vs encoder-only, and the sink rate.

On generated photo-like JPEGs (scikit-image's bundled photographs, randomly cropped, flipped and
resized to e.g. 640×480; smooth noise without scikit-image), on one device:

- ``encoder_only``: a :class:`FeatureEncoder` loaded from the same checkpoint encodes already
  preprocessed pixels shard by shard with :meth:`~FeatureEncoder.encode_pixels` (host uint8 →
  host features in the stored dtype), exactly the call an offline-job actor makes per shard;
- the job (:func:`pipeline.offline.run_job`: listing, decode + preprocess tasks, encoder actors,
  Parquet shards) on a local Ray started beforehand (its start-up is not counted): first on one
  shard (discarded: it pays Ray Data's first-run costs), then on all images.
  ``job_images_per_s`` is the run's own figure (actor start-up and model loading included);
  ``job_steady_images_per_s`` is the streaming rate between the first and the last shard
  commit (Parquet file modification times), which excludes start-up and pipeline fill:
  ``ratio`` = steady / encoder-only is the figure the target (≥ 0.85) is about. When the
  decode tasks finish before the encoder actor is ready (a short run behind a slow actor
  start), the commits measure the encoder + sink only: ``decode_capacity_images_per_s``
  (single-core preprocess rate × the CPUs the actors leave) and ``ratio_decode_bounded`` =
  min(steady, decode capacity) / encoder-only guard against reading too much into it;
- the sink: bytes of Parquet written per second of the job, and between the first and last
  commits (``sink_steady_mb_per_s``).

When the configured model is not available locally, a random-weight checkpoint of its
architecture is written to the work folder first (``--tiny``: the tiny LLaVA checkpoint).
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..measure.environment import environment
from ..measure.images import iter_photos, write_jpegs
from ..measure.options import BenchOptions
from ..measure.session import ray_session
from ..measure.timing import time_wall
from ..model.config import setting
from ..model.constants import ComputeDtype
from .models import loadable_config
from .report import format_table

if TYPE_CHECKING:
    from ..config import Config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineOptions(BenchOptions):
    """Options of ``bench pipeline`` (on Ray, or ``in_process``)."""

    SECTION: ClassVar[str] = "bench.pipeline"

    tiny: bool = False
    """The tiny test checkpoint instead of the config's model (a random-weight one when it is not on disk)."""
    in_process: bool = False
    """The job's decode → encode → data file stages in this process, without Ray."""
    images: int | None = setting(None, ge=1)
    """JPEGs generated (default 8 shards on Ray, 4 in process)."""
    image_size: tuple[int, int] = setting((640, 480), ge=1)
    """(width, height) of the generated JPEGs."""
    quality: int = setting(90, ge=1, le=100)
    """JPEG quality of the generated images."""
    batch_size: int | None = setting(None, ge=1)
    """Encoder batch size (default: 16 tiny, else the config's)."""
    shard_size: int | None = setting(None, ge=1)
    """Rows per output file (default: the batch size on a CPU, at least the config's on a GPU)."""
    actors: tuple[int, int] | None = setting(None, ge=1)
    """(min, max) encoder actors of the job on Ray (default: the config's)."""
    decode_workers: int | None = setting(None, ge=1)
    """In process: decode threads (default: the CPUs less one, 1 to 8)."""
    device: str | None = None
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (default: the config's ``model.device``)."""
    dtype: ComputeDtype | None = None
    """Compute dtype (default: the config's ``model.dtype``)."""
    compile: bool | None = None
    """``torch.compile`` the encoder (default: the config's ``model.compile``)."""
    repeats: int = setting(3, ge=1)
    """Timed runs of encoder-only (the median is reported)."""
    workdir: str | None = None
    """Keep the generated images, checkpoint and outputs here (default: a temporary folder, removed)."""


def _dir_bytes(path: Path, suffix: str = ".parquet") -> int:
    return sum(p.stat().st_size for p in path.rglob(f"*{suffix}") if p.is_file())


def _commits(out_dir: Path) -> list[tuple[float, int, int]]:
    """(modification time, rows, bytes) of every Parquet shard of a job's output, by time."""
    import pyarrow.parquet as pq

    out = []
    for f in out_dir.rglob("*.parquet"):
        if f.is_file() and not f.name.startswith((".", "_")):
            st = f.stat()
            out.append((st.st_mtime, pq.read_metadata(f).num_rows, st.st_size))
    return sorted(out)


def steady_rates(commits: list[tuple[float, int, int]]) -> tuple[float | None, float | None]:
    """(images/s, MB/s) between the first and the last shard commit (None with < 3 shards)."""
    if len(commits) < 3:
        return None, None
    span = commits[-1][0] - commits[0][0]
    if span <= 0:
        return None, None
    rows = sum(c[1] for c in commits[1:])
    data = sum(c[2] for c in commits[1:])
    return rows / span, data / span / 1e6


def _encoder_only(config: Any, files: list[Path], *, shard_size: int, repeats: int) -> dict[str, Any]:
    """Encoder-only throughput on as many preprocessed images as ``files``, one ``encode_pixels`` call per
    shard (the first shard's files preprocessed once, repeated)."""
    import numpy as np
    import torch

    from ..encoder import FeatureEncoder

    n = len(files)
    encoder = FeatureEncoder(config)
    started = time.perf_counter()
    unique = [encoder.encode_pre(f.read_bytes(), str(f)).pixels for f in files[: min(n, shard_size)]]
    preprocess_s = time.perf_counter() - started
    pool = np.stack(unique)
    reps = -(-n // len(pool))
    pixels = np.concatenate([pool] * reps)[:n] if reps > 1 else pool[:n]
    warm_s = encoder.warmup(config.encoder.batch_size)

    def run() -> None:
        for start in range(0, n, shard_size):
            encoder.encode_pixels(pixels[start : start + shard_size])

    # three warm runs: first-call allocations (pinned host blocks, cuBLAS workspaces, CPU kernels)
    seconds = time_wall(run, encoder.device, warmup=3, repeats=repeats).median_s
    result = {
        "images": n,
        "seconds": seconds,
        "images_per_s": n / seconds,
        "warmup_s": warm_s,
        "preprocess_images_per_s_one_core": len(unique) / preprocess_s if preprocess_s > 0 else None,
        "device": str(encoder.device),
        "dtype": str(encoder.dtype).removeprefix("torch."),
    }
    encoder.close()  # release the device memory (and compiled graphs) before the job runs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _run_job(config: Any, images_dir: Path, out_dir: Path, limit: int | None) -> dict[str, Any]:
    from ..offline import run_job

    cfg = replace(config, job=replace(config.job, limit=limit))
    started = time.perf_counter()
    summary = run_job(cfg, str(images_dir), str(out_dir))
    wall = time.perf_counter() - started
    steady, steady_mb = steady_rates(_commits(out_dir))
    return {
        "images": summary.read,
        "ok": summary.ok,
        "errors": dict(summary.errors),
        "seconds": summary.seconds,
        "wall_s": wall,
        "images_per_s": summary.images_per_s,
        "bytes_written": _dir_bytes(out_dir),
        "steady_images_per_s": steady,
        "steady_mb_per_s": steady_mb,
    }


@dataclass(frozen=True)
class _Inputs:
    """What both pipeline benchmarks run on: the loadable config with the options applied, the generated JPEGs."""

    config: Config
    device: Any
    batch: int
    shard: int
    images_dir: Path
    files: list[Path]
    size: tuple[int, int]
    """(width, height) of the JPEGs."""
    jpeg_bytes: int


def _prepare(config: Config | None, options: PipelineOptions, root: Path, *, default_shards: int) -> _Inputs:
    """The loadable config (a random-weight checkpoint of its architecture when the model is not on disk,
    the tiny one with ``tiny``) with the options applied, and the JPEGs generated under ``root``."""
    from ..config import Config
    from ..model import resolve_device

    base = config if config is not None else Config()
    dev = resolve_device(options.device or base.model.device)
    cfg = loadable_config(base, tiny=options.tiny, workdir=root / "model")
    batch = int(options.batch_size or (16 if options.tiny else cfg.encoder.batch_size))
    shard = int(options.shard_size or (batch if dev.type != "cuda" else max(batch, cfg.job.shard_size)))
    n = int(options.images or default_shards * shard)
    model_over: dict[str, Any] = {"device": str(dev)}
    if options.dtype:
        model_over["dtype"] = options.dtype
    if options.compile is not None:
        model_over["compile"] = options.compile
    job_over: dict[str, Any] = {"shard_size": shard}
    if options.actors:
        job_over["actors"] = options.actors
    cfg = replace(
        cfg,
        model=replace(cfg.model, **model_over),
        encoder=replace(cfg.encoder, batch_size=batch, features="projected"),
        job=replace(cfg.job, **job_over),
    )
    width, height = options.image_size
    images_dir = root / "images"
    t0 = time.perf_counter()
    files = write_jpegs(iter_photos(n, height, width), images_dir, quality=options.quality)
    jpeg_bytes = sum(f.stat().st_size for f in files)
    logger.info(
        "bench pipeline: %d JPEGs %dx%d (%.0f KB avg) in %.1fs",
        n,
        width,
        height,
        jpeg_bytes / n / 1e3,
        time.perf_counter() - t0,
    )
    return _Inputs(
        config=cfg,
        device=dev,
        batch=batch,
        shard=shard,
        images_dir=images_dir,
        files=files,
        size=(width, height),
        jpeg_bytes=jpeg_bytes,
    )


def _run_header(bench: str, inputs: _Inputs) -> dict[str, Any]:
    """The figures both pipeline benchmarks start their result with: what ran, on what, on which inputs."""
    cfg, n = inputs.config, len(inputs.files)
    return {
        "bench": bench,
        "env": environment(inputs.device),
        "device": str(inputs.device),
        "model": {
            "checkpoint": cfg.model.checkpoint,
            "vision_tower": cfg.model.vision_tower,
            "dtype": cfg.model.dtype,
            "compile": cfg.model.compile,
        },
        "images": n,
        "image_size": list(inputs.size),
        "jpeg_kb_mean": inputs.jpeg_bytes / n / 1e3,
        "batch_size": inputs.batch,
        "shard_size": inputs.shard,
    }


def bench_pipeline(config: Config | None, options: PipelineOptions) -> dict[str, Any]:
    """Offline job end to end vs encoder-only on the same device, and the sink's MB/s."""
    import ray  # first: without Ray this benchmark cannot run, and nothing is generated for it
    import torch

    root = Path(options.workdir) if options.workdir else Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        inputs = _prepare(config, options, root, default_shards=8)
        cfg, shard, images_dir = inputs.config, inputs.shard, inputs.images_dir
        enc = _encoder_only(cfg, inputs.files, shard_size=shard, repeats=options.repeats)
        logger.info("encoder-only: %.1f images/s", enc["images_per_s"])

        # Ray starts after encoder-only (its processes would share the CPU with it) and before the job (so
        # that its start-up is not in the job's figures).
        with ray_session(
            address=os.environ.get("RAY_ADDRESS") or None, logging_level=logging.WARNING
        ) as ray_:
            cluster_cpus = float(ray.cluster_resources().get("CPU", 0))
            # A first run pays one-off costs (Ray Data's workers and imports, compile caches):
            # run one shard first and discard it (and its output), then all images.
            warm = _run_job(cfg, images_dir, root / "out-warm", limit=shard)
            shutil.rmtree(root / "out-warm", ignore_errors=True)
            full = _run_job(cfg, images_dir, root / "out-full", limit=None)

        steady, sink_steady = full["steady_images_per_s"], full["steady_mb_per_s"]
        # Decode tasks (1 CPU each) get the CPUs the encoder actors leave; at the single-core
        # preprocess rate measured above this is what decode can sustain in steady state.
        decode_cpus = max(0.0, cluster_cpus - cfg.job.num_cpus_per_actor * cfg.job.actors[1])
        per_core = enc.get("preprocess_images_per_s_one_core") or 0.0
        decode_capacity = per_core * decode_cpus if decode_cpus else None
        encoder_ips = enc["images_per_s"]
        result = {
            **_run_header("pipeline", inputs),
            "actors": list(cfg.job.actors),
            "encoder_only": enc,
            "ray_start_s": ray_.start_s,
            "job_warm": warm,
            "job": full,
            "job_images_per_s": full["images_per_s"],
            "job_steady_images_per_s": steady,
            "encoder_only_images_per_s": encoder_ips,
            "ratio": steady / encoder_ips if steady else None,
            "decode_cpus": decode_cpus,
            "decode_capacity_images_per_s": decode_capacity,
            "ratio_decode_bounded": (
                min(steady, decode_capacity) / encoder_ips if steady and decode_capacity else None
            ),
            "ratio_including_startup": full["images_per_s"] / encoder_ips if encoder_ips else None,
            "sink_mb_per_s": full["bytes_written"] / full["seconds"] / 1e6 if full["seconds"] else None,
            "sink_steady_mb_per_s": sink_steady,
            "output_mb_per_image": full["bytes_written"] / max(1, full["ok"]) / 1e6,
            "target_ratio": 0.85,
        }
        if inputs.device.type == "cuda":
            torch.cuda.empty_cache()
        return result
    finally:
        if not options.workdir:
            shutil.rmtree(root, ignore_errors=True)


def format_pipeline_report(result: dict[str, Any]) -> str:
    """A short table of :func:`bench_pipeline`'s result."""
    enc = result["encoder_only"]
    rows = [
        {"what": "encoder only (encode_pixels per shard)", "images_per_s": enc["images_per_s"], "ratio": 1.0},
        {
            "what": "job, steady (first → last shard commit)",
            "images_per_s": result["job_steady_images_per_s"],
            "ratio": result["ratio"],
            "mb_s": result["sink_steady_mb_per_s"],
        },
        {
            "what": "decode capacity (1-core rate × free CPUs)",
            "images_per_s": result["decode_capacity_images_per_s"],
            "ratio": (
                result["decode_capacity_images_per_s"] / enc["images_per_s"]
                if result["decode_capacity_images_per_s"]
                else None
            ),
        },
        {
            "what": "job, whole run (incl. actor start-up)",
            "images_per_s": result["job_images_per_s"],
            "ratio": result["ratio_including_startup"],
            "mb_s": result["sink_mb_per_s"],
        },
    ]
    return format_table(
        rows,
        [
            ("what", "pipeline", ""),
            ("images_per_s", "images/s", ",.1f"),
            ("ratio", "× encoder", ".2f"),
            ("mb_s", "Parquet MB/s", ",.1f"),
        ],
        title=(
            f"pipeline: {result['images']} JPEGs {result['image_size'][0]}x{result['image_size'][1]} "
            f"({result['jpeg_kb_mean']:.0f} KB), batch {result['batch_size']}, shard {result['shard_size']}, "
            f"actors {result['actors']} on {result['env'].get('device_name')} ({result['device']})"
        ),
    )


def bench_pipeline_inprocess(config: Config | None, options: PipelineOptions) -> dict[str, Any]:
    """The job's per-file work in this process, no Ray: :func:`~pipeline.offline.decode.decode_unit` on
    ``decode_workers`` threads feeding one :class:`~pipeline.offline.actors.EncodeShardActor` called from two
    threads (as Ray Data calls it: ``max_concurrent_calls_per_actor=2``), vs encoder-only.

    Measured on the same generated JPEGs: ``encoder_only`` (as in :func:`bench_pipeline`),
    ``decode_only`` (the decode stage alone on its threads), ``actor_only`` (encode + Parquet
    commit of already decoded shards: the most the job can reach with enough decode CPUs) and
    the whole chain, whose steady rate (first → last shard commit) over encoder-only is
    ``ratio``: the job's ratio without Ray's scheduling. Every run's output is read back: one row
    per input, each image id once.
    """
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq
    import torch

    from ..model import resolve_model
    from ..offline import make_plan, new_table_run, planned_units
    from ..offline.actors import EncodeShardActor, shard_target
    from ..offline.decode import decode_unit, read_options, unit_batch
    from ..table.layout import DataFileName

    root = Path(options.workdir) if options.workdir else Path(tempfile.mkdtemp(prefix="bench-inprocess-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        inputs = _prepare(config, options, root, default_shards=4)
        cfg, shard, images_dir, n = inputs.config, inputs.shard, inputs.images_dir, len(inputs.files)
        workers = int(options.decode_workers or max(1, min(8, (os.cpu_count() or 2) - 1)))
        enc = _encoder_only(cfg, inputs.files, shard_size=shard, repeats=options.repeats)
        logger.info("encoder-only: %.1f images/s", enc["images_per_s"])

        resolved = resolve_model(cfg.model)
        plan = make_plan(cfg, str(images_dir))
        keys = [u.key for u in planned_units(plan)]
        batches = [unit_batch([u], [k]) for u, k in zip(plan.units, keys, strict=True)]
        read = read_options(cfg)

        def decode(b: dict[str, Any]) -> list[dict[str, Any]]:
            """One unit's output files, decoded (one batch each)."""
            return list(decode_unit(b, config=cfg, resolved=resolved, read=read, shard_size=shard))

        # The actor writes the data files of a table's run (what the job's actors do); the commits to the
        # table's log are the driver's, measured by `bench table`: the files are read back directly.
        out_dir = root / "out"
        run = new_table_run(cfg, plan, str(out_dir), resolved=resolved)
        actor = EncodeShardActor(cfg, resolved, shard_target(cfg, run, run.identity.fingerprint))

        def read_back() -> dict[str, Any]:
            files = sorted(p for p in out_dir.iterdir() if DataFileName.parse(p.name) is not None)
            ids = pq.read_table(files, columns=["image_id", "status"]).to_pydict()
            data = sum(f.stat().st_size for f in files)
            for f in files:
                f.unlink()
            return {
                "rows": len(ids["image_id"]),
                "unique_ids": len(set(ids["image_id"])),
                "ok": sum(1 for s in ids["status"] if s == "ok"),
                "bytes": data,
            }

        # decode alone (kept: the actor-only run encodes these)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            decoded = [piece for pieces in pool.map(decode, batches) for piece in pieces]
        decoded_files = len(decoded)
        decode_s = time.perf_counter() - t0

        commits: list[tuple[float, int]] = []

        def call(b: dict[str, Any]) -> None:
            summary = actor(b)
            commits.append((time.perf_counter(), int(summary["rows"].sum())))

        # the actor alone: encode + Parquet commit of decoded shards, two calls at a time
        actor(copy.deepcopy(decoded[0]))  # warm: first-shard allocations, pinned buffers, Parquet writer
        read_back()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(call, decoded))
        actor_s = time.perf_counter() - t0
        actor_rows = read_back()
        del decoded

        # the chain: decode threads → the actor (two calls at a time), shards as they are decoded
        commits.clear()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as decoders, ThreadPoolExecutor(2) as calls:
            pending = [
                calls.submit(call, piece)
                for f in [decoders.submit(decode, b) for b in batches]
                for piece in f.result()
            ]
            for future in pending:
                future.result()
        chain_s = time.perf_counter() - t0
        chain_commits = sorted(commits)
        chain_rows = read_back()
        steady = None  # rows committed after the first commit, over the span of the commits
        if len(chain_commits) >= 3 and chain_commits[-1][0] > chain_commits[0][0]:
            span = chain_commits[-1][0] - chain_commits[0][0]
            steady = sum(rows for _, rows in chain_commits[1:]) / span
        encoder_ips = enc["images_per_s"]
        chain_ips = n / chain_s
        result = {
            **_run_header("pipeline-inprocess", inputs),
            "shards": decoded_files,
            "decode_workers": workers,
            "encoder_only": enc,
            "encoder_only_images_per_s": encoder_ips,
            "decode_only_images_per_s": n / decode_s,
            "actor_only_images_per_s": n / actor_s,
            "inprocess_images_per_s": chain_ips,
            "inprocess_steady_images_per_s": steady,
            "ratio": (steady or chain_ips) / encoder_ips,
            "ratio_actor_only": n / actor_s / encoder_ips,
            "ratio_whole_run": chain_ips / encoder_ips,
            "sink_mb_per_s": chain_rows["bytes"] / chain_s / 1e6,
            "output_mb_per_image": chain_rows["bytes"] / max(1, chain_rows["ok"]) / 1e6,
            "rows": {"actor_only": actor_rows, "inprocess": chain_rows},
            "exactly_once": all(r["rows"] == n and r["unique_ids"] == n for r in (actor_rows, chain_rows)),
            "target_ratio": 0.85,
        }
        actor.writer.encoder.close()
        run.close()
        if inputs.device.type == "cuda":
            torch.cuda.empty_cache()
        return result
    finally:
        if not options.workdir:
            shutil.rmtree(root, ignore_errors=True)


def format_inprocess_report(result: dict[str, Any]) -> str:
    """A short table of :func:`bench_pipeline_inprocess`'s result."""
    enc = result["encoder_only_images_per_s"]
    rows = [
        {"what": "encoder only (encode_pixels per shard)", "images_per_s": enc},
        {
            "what": f"decode only ({result['decode_workers']} threads)",
            "images_per_s": result["decode_only_images_per_s"],
        },
        {
            "what": "actor only (encode + Parquet commit, 2 calls)",
            "images_per_s": result["actor_only_images_per_s"],
        },
        {
            "what": "decode → actor, steady (first → last commit)",
            "images_per_s": result["inprocess_steady_images_per_s"],
        },
        {"what": "decode → actor, whole run", "images_per_s": result["inprocess_images_per_s"]},
    ]
    for row in rows:
        row["ratio"] = row["images_per_s"] / enc if row["images_per_s"] else None
    return format_table(
        rows,
        [
            ("what", "in-process job (no Ray)", ""),
            ("images_per_s", "images/s", ",.1f"),
            ("ratio", "× encoder", ".2f"),
        ],
        title=(
            f"pipeline in-process: {result['images']} JPEGs {result['image_size'][0]}x{result['image_size'][1]}, "
            f"batch {result['batch_size']}, shard {result['shard_size']} on {result['env'].get('device_name')} "
            f"({result['device']}); rows exactly once: {result['exactly_once']}"
        ),
    )
