"""The offline job: object storage → CPU decode → GPU encoder actor pool → Parquet feature tables.

Plan (driver, metadata only): list the inputs in a deterministic order, cut them into shards of
``job.shard_size`` (the unit of output files and of resume), fingerprint the encoder, and check
the output location (``_job.json`` records the plan and the fingerprint).

Run (Ray Data, streaming): one row per pending shard →
``decode_shard`` CPU tasks (read bytes, decode guard, preprocess to uint8; bad inputs become error
records, never exceptions), each producing one typed :class:`~pipeline.records.DecodedShard` →
:class:`EncodeShardActor`, an autoscaling actor pool where each actor
holds one :class:`~pipeline.encoder.FeatureEncoder` replica, encodes the shard's ok images in
batches and commits the shard's Parquet file itself (temporary name + rename locally, final-name
PUT on object stores). Feature tensors therefore never travel back through the object store or
the driver; only a small per-shard summary does. A shard that is retried (actor killed, node lost)
is rewritten under the same name, so every input appears exactly once.

Finish: counts are read back from the committed files' ``status`` column, ``_SUCCESS`` is written
last (unless more than ``max_error_fraction`` of the inputs failed: then the job exits non-zero
after writing everything it has).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np

from .config import Config, config_to_dict
from .constants import CONFIG_KEY, FINGERPRINT_KEY, JOB_FILE, SUCCESS_FILE
from .encoder import FeatureEncoder, describe_encoder, preprocess_spec
from .model import ResolvedModel, resolve_model
from .model.anyres import AnyresGrid
from .model.errors import (
    DecodeError,
    ErrorBudgetExceededError,
    ErrorCode,
    InputReadError,
    OutputError,
)
from .ray_warnings import spend_actor_restart_warning
from .records import DecodedShard, rows_of_batch, rows_to_batch
from .storage import join_path

logger = logging.getLogger(__name__)


@dataclass
class JobSummary:
    """What a run did (also written, with the fingerprint, into ``_SUCCESS``)."""

    output: str
    """Where the Parquet dataset is."""
    fingerprint: str
    """Encoder fingerprint of every row in the output."""
    inputs: int = 0
    """Inputs in the plan (the whole job, including shards committed by earlier runs)."""
    read: int = 0
    """Inputs processed by this run."""
    ok: int = 0
    """Rows with status ok in the whole output."""
    errors: dict[str, int] = field(default_factory=dict)
    """Error rows by error code in the whole output."""
    shards_total: int = 0
    """Shards in the plan."""
    shards_written: int = 0
    """Shards written by this run."""
    shards_skipped: int = 0
    """Shards already committed (``--resume``)."""
    seconds: float = 0.0
    """Wall time of this run's pipeline."""
    images_per_s: float = 0.0
    """Inputs processed by this run per second of its pipeline."""
    error_fraction: float = 0.0
    """Error rows / rows in the whole output."""
    error_budget_exceeded: bool = False
    """True when error_fraction > max_error_fraction (no _SUCCESS is written then)."""

    def format(self) -> str:
        errs = ", ".join(f"{code}: {n}" for code, n in sorted(self.errors.items())) or "none"
        return "\n".join(
            [
                f"images read:   {self.read} this run ({self.inputs} in the job)",
                f"ok:            {self.ok}",
                f"errors:        {sum(self.errors.values())} ({errs})",
                f"shards:        {self.shards_written} written, {self.shards_skipped} already committed, "
                f"{self.shards_total} in total",
                f"throughput:    {self.images_per_s:.1f} images/s ({self.seconds:.1f} s)",
                f"output:        {self.output}",
                f"fingerprint:   {self.fingerprint[:16]}",
            ]
            + (
                [f"ERROR BUDGET EXCEEDED: {self.error_fraction:.2%} of inputs failed"]
                if self.error_budget_exceeded
                else []
            )
        )


# -- stage 1: decode (CPU tasks) --------------------------------------------------------------


def decode_shard(batch: dict[str, np.ndarray], *, config: Config, resolved: ResolvedModel) -> dict[str, Any]:
    """Read, decode and preprocess every input of the shard rows in ``batch`` into one
    :class:`DecodedShard` row each. Never raises for an input.

    With ``decode.nvjpeg`` the encoder decodes on its own device: inputs are only read here.
    """
    from .images.preprocess import Preprocessor
    from .storage import read_bytes

    preprocessor = Preprocessor(preprocess_spec(resolved, config.decode), config.decode)
    device_decode = config.decode.nvjpeg
    rows = []
    for shard, image_ids, uris in zip(batch["shard"], batch["image_id"], batch["uri"], strict=True):
        record = DecodedShard(shard=int(shard), data=[] if device_decode else None)
        datas = read_bytes(
            [str(u) for u in uris],
            s3_endpoint=config.job.s3_endpoint,
            threads=config.job.decode_threads,
            max_bytes=config.decode.max_bytes,
        )
        ok_pixels = []
        for image_id, uri, data in zip(image_ids, uris, datas, strict=True):
            image_id, uri = str(image_id), str(uri)
            try:
                if isinstance(data, InputReadError):
                    raise data
                if device_decode:
                    record.data.append(data)  # type: ignore[union-attr]
                    record.add_ok(image_id, uri)
                    continue
                prepared = preprocessor(data, uri)
                tiles = prepared.tiles
                ok_pixels.append(tiles)
                grid = (prepared.grid.rows, prepared.grid.cols) if prepared.grid is not None else (0, 0)
                record.add_ok(image_id, uri, prepared.width, prepared.height, tiles=len(tiles), grid=grid)
            except (DecodeError, InputReadError) as exc:
                record.add_error(image_id, uri, str(exc.code), exc.message)
            except Exception as exc:  # a bug must not take the job down: record it on the row
                logger.exception("Unexpected failure on %s", uri)
                record.add_error(image_id, uri, str(ErrorCode.INTERNAL), f"{type(exc).__name__}: {exc}")
        if ok_pixels:
            record.pixels = np.concatenate(ok_pixels)
        else:
            spec = preprocessor.spec
            record.pixels = np.zeros((0, 3, spec.crop_height, spec.crop_width), np.uint8)
        rows.append(record.to_row())
    return rows_to_batch(rows)


# -- stage 2: encode + commit (actor pool) ----------------------------------------------------


class EncodeShardActor:
    """Ray Data actor: one FeatureEncoder replica; encodes shards and commits their Parquet files.

    Two calls may run at once on an actor: the device work is serialised by a lock, so one shard's
    Parquet write overlaps the next shard's encode.
    """

    def __init__(
        self, config: Config, resolved: ResolvedModel, output: str, metadata: dict[str, str]
    ) -> None:
        from .sink import ensure_registered
        from .storage import resolve_filesystem

        ensure_registered()
        self.config = config
        self.encoder = FeatureEncoder(config, resolved)
        self.encoder.warmup(min(config.encoder.batch_size, 8))
        self.fs, self.out_path = resolve_filesystem(output, s3_endpoint=config.job.s3_endpoint)
        self.metadata = metadata
        self.lock = threading.Lock()

    def _encode(self, record: DecodedShard) -> Any:
        """The shard's features (the inputs that fail the device decode become error rows)."""
        if record.data is None:
            with self.lock:
                if self.encoder.anyres_output is None:
                    return self.encoder.encode_pixels(record.pixels)
                ok = record.ok
                tile = self.encoder.spec.crop_height
                grids = [
                    AnyresGrid((int(w), int(h)), (int(cols) * tile, int(rows) * tile), tile)
                    for w, h, rows, cols in zip(
                        record.width[ok],
                        record.height[ok],
                        record.grid_rows[ok],
                        record.grid_cols[ok],
                        strict=True,
                    )
                ]
                return self.encoder.encode_tiles(record.pixels, record.tiles[ok].tolist(), grids)
        ok_rows = np.flatnonzero(record.ok)
        with self.lock:
            prepared = self.encoder.prepare_many(record.data, [record.uri[i] for i in ok_rows])
            good = [p for p in prepared if not isinstance(p, DecodeError)]
            encoded = self.encoder.encode_prepared(good)
        for row, result in zip(ok_rows, prepared, strict=True):
            if isinstance(result, DecodeError):
                record.ok[row] = False
                record.error_code[row], record.error_message[row] = str(result.code), result.message
            else:
                record.width[row], record.height[row] = result.width, result.height
        return encoded

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .sink import ShardRows, build_table, write_shard

        summaries = []
        job = self.config.job
        for row in rows_of_batch(batch):
            record = DecodedShard.from_row(row)
            encoded = self._encode(record)
            rows = ShardRows.from_record(record)
            table = build_table(
                rows,
                features=encoded.projected,
                tower_features=encoded.tower,
                pooled=encoded.pooled,
                dtype=encoded.dtype,
                tensor_format=job.tensor_format,
                metadata=self.metadata,
                grids=encoded.grids,
            )
            write_shard(table, self.out_path, record.shard, filesystem=self.fs, compression=job.compression)
            summaries.append({"shard": record.shard, "rows": len(rows), "ok": rows.num_ok})
        return rows_to_batch(summaries)


# -- the driver -------------------------------------------------------------------------------


def _read_json(fs: Any, path: str) -> dict[str, Any] | None:
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def _write_json(fs: Any, path: str, value: dict[str, Any]) -> None:
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(value, indent=2, sort_keys=True, default=str).encode())


def _check_output(
    fs: Any, out_path: str, output: str, job_record: dict[str, Any], resume: bool, s3_endpoint: str | None
) -> None:
    from .storage import output_is_empty

    if output_is_empty(output, s3_endpoint=s3_endpoint):
        return
    existing = _read_json(fs, join_path(out_path, JOB_FILE))
    if not resume:
        raise OutputError(
            f"Output {output} is not empty. Pass --resume to continue the job that wrote it, or choose "
            "another output location (nothing is ever deleted for you)."
        )
    if existing is None:
        raise OutputError(
            f"Output {output} is not empty and holds no {JOB_FILE}: it was not written by this tool"
        )
    if existing.get("fingerprint") != job_record["fingerprint"]:
        raise OutputError(
            f"Output {output} was written with encoder fingerprint {existing.get('fingerprint', '?')[:16]}, this run's "
            f"is {job_record['fingerprint'][:16]}: refusing to mix features of different encoders. "
            "Use another output location, or the original settings.",
            code=ErrorCode.FINGERPRINT_MISMATCH,
        )
    if existing.get("plan_fingerprint") != job_record["plan_fingerprint"]:
        raise OutputError(
            f"Output {output} was written for a different input plan (inputs, order, --limit or shard size changed): "
            "resuming would mix shards. Use the original input and options, or another output location.",
            code=ErrorCode.FINGERPRINT_MISMATCH,
        )


def _count_output(fs: Any, out_path: str) -> tuple[int, Counter[str]]:
    import pyarrow.dataset as pads

    from .sink import ensure_registered

    ensure_registered()
    ds = pads.dataset(
        out_path, filesystem=fs, format="parquet", exclude_invalid_files=False, ignore_prefixes=[".", "_"]
    )
    import pyarrow.compute as pc

    table = ds.to_table(columns=["status", "error_code"])
    ok = int(pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0)
    counts = pc.value_counts(table.column("error_code").drop_null()).to_pylist()
    return ok, Counter({c["values"]: c["counts"] for c in counts})


def _init_ray() -> Any:
    import ray

    if not ray.is_initialized():
        # RAY_ADDRESS (set by `ray job submit`, or by the user) connects to a cluster; otherwise a
        # local Ray starts for this process.
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, logging_level=logging.WARNING)
    return ray


def run_job(config: Config, input_uri: str, output_uri: str, *, resume: bool = False) -> JobSummary:
    """Encode every input under ``input_uri`` into a Parquet dataset at ``output_uri``."""
    from .storage import ensure_output_dir, list_inputs, plan_fingerprint, plan_shards, resolve_filesystem

    job = config.job  # every value was checked (types, ranges) when the config was loaded

    resolved = resolve_model(config.model)
    description = describe_encoder(config, resolved)
    items = list_inputs(input_uri, s3_endpoint=job.s3_endpoint, limit=job.limit)
    shards = plan_shards(items, job.shard_size)
    job_record = {
        "fingerprint": description.fingerprint,
        "plan_fingerprint": plan_fingerprint(items, job.shard_size),
        "input": input_uri,
        "inputs": len(items),
        "shards": len(shards),
        "shard_size": job.shard_size,
        "encoder": description.fields,
        "config": config_to_dict(config),
        "created": datetime.now(UTC).isoformat(),
    }
    fs, out_path = resolve_filesystem(output_uri, s3_endpoint=job.s3_endpoint)
    _check_output(fs, out_path, output_uri, job_record, resume, job.s3_endpoint)
    ensure_output_dir(output_uri, s3_endpoint=job.s3_endpoint)
    if _read_json(fs, join_path(out_path, JOB_FILE)) is None:
        _write_json(fs, join_path(out_path, JOB_FILE), job_record)

    from .sink import committed_shards, remove_stale_temp_files

    remove_stale_temp_files(out_path, fs)
    done = committed_shards(out_path, fs)
    pending = [s for s in shards if s.index not in done]
    summary = JobSummary(
        output=output_uri,
        fingerprint=description.fingerprint,
        inputs=len(items),
        shards_total=len(shards),
        shards_skipped=len(shards) - len(pending),
    )
    logger.info(
        "%d inputs in %d shards; %d already committed, %d to write",
        len(items),
        len(shards),
        len(done),
        len(pending),
    )
    started = time.perf_counter()
    if pending:
        _run_pipeline(config, resolved, pending, output_uri, job_record, summary)
        # A writer that died mid-shard (actor or node lost) left its temporary file; the shard was
        # written again by the retry and no writer of this job is running any more.
        remove_stale_temp_files(out_path, fs)
    summary.seconds = time.perf_counter() - started
    summary.images_per_s = summary.read / summary.seconds if summary.seconds > 0 else 0.0

    ok, errors = _count_output(fs, out_path)
    summary.ok, summary.errors = ok, dict(errors)
    total = ok + sum(errors.values())
    summary.error_fraction = (total - ok) / total if total else 0.0
    summary.error_budget_exceeded = summary.error_fraction > job.max_error_fraction
    if total != len(items):
        raise OutputError(f"Output {output_uri} holds {total} rows for {len(items)} inputs: it is incomplete")
    if not summary.error_budget_exceeded:
        _write_json(
            fs,
            join_path(out_path, SUCCESS_FILE),
            {**asdict(summary), "finished": datetime.now(UTC).isoformat()},
        )
    return summary


_DECODE_WORKER_BASE_BYTES = 512 * 1024 * 1024  # a Python worker with PIL, numpy and the decode guard loaded


# Storage settings of the submitting environment that the job's workers need too: on a local Ray
# (or one started before these were set) worker processes would not see them otherwise.
FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_EC2_METADATA_DISABLED",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "STORAGE_EMULATOR_HOST",
)


def _worker_runtime_env() -> dict[str, Any] | None:
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    return {"env_vars": env} if env else None


def _decode_task_memory(config: Config, resolved: ResolvedModel) -> int:
    spec = preprocess_spec(resolved, config.decode)
    # anyres: the base image and the tiles of the largest canvas
    tiles = 1 + max(
        (w * h // (spec.crop_height * spec.crop_width) for w, h in spec.grid_pinpoints), default=0
    )
    per_image = tiles * 3 * spec.crop_height * spec.crop_width + 4 * 1024 * 1024  # pixels + an encoded photo
    return _DECODE_WORKER_BASE_BYTES + config.job.shard_size * per_image


def _run_pipeline(
    config: Config,
    resolved: ResolvedModel,
    pending: list[Any],
    output_uri: str,
    job_record: dict[str, Any],
    summary: JobSummary,
) -> None:
    ray = _init_ray()
    # Ray Data's actor pools always trigger one harmless ERROR line of Ray's (the pool's own
    # arguments are object refs; see pipeline/ray_warnings.py): spend it here, out of sight.
    spend_actor_restart_warning()
    job = config.job
    gpus = job.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    if gpus == 0 and config.model.device == "auto":
        config = replace(config, model=replace(config.model, device="cpu"))
    metadata = {
        FINGERPRINT_KEY: job_record["fingerprint"],
        CONFIG_KEY: json.dumps(
            {"config": job_record["config"], "encoder": job_record["encoder"]}, default=str
        ),
    }
    from ray.data import ActorPoolStrategy

    ds = ray.data.from_items(
        [
            {"shard": s.index, "image_id": [i.image_id for i in s.items], "uri": [i.uri for i in s.items]}
            for s in pending
        ],
        override_num_blocks=len(pending),
    )
    ds = ds.map_batches(
        decode_shard,
        fn_kwargs={"config": config, "resolved": resolved},
        batch_size=1,
        num_cpus=1,
        # What a decode task holds: the shard's encoded bytes and its uint8 pixels. Reserving it
        # also keeps the decode tasks a separate pool (Ray Data fuses stages with equal resource
        # requests, which would move decoding into the encoder actors on CPU-only clusters).
        memory=_decode_task_memory(config, resolved),
        runtime_env=_worker_runtime_env(),
        batch_format="numpy",
    )
    ds = ds.map_batches(
        EncodeShardActor,
        fn_constructor_kwargs={
            "config": config,
            "resolved": resolved,
            "output": output_uri,
            "metadata": metadata,
        },
        batch_size=1,
        batch_format="numpy",
        compute=ActorPoolStrategy(
            min_size=job.actors[0], max_size=job.actors[1], max_concurrent_calls_per_actor=2
        ),
        num_gpus=gpus,
        num_cpus=job.num_cpus_per_actor,
        runtime_env=_worker_runtime_env(),
    )
    seen: set[int] = set()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for shard, rows in zip(batch["shard"], batch["rows"], strict=True):
            if int(shard) in seen:  # a retried task reports again; the file was replaced, not duplicated
                continue
            seen.add(int(shard))
            summary.read += int(rows)
            summary.shards_written += 1


def budget_error(summary: JobSummary, config: Config) -> ErrorBudgetExceededError | None:
    """The typed error for a run above ``max_error_fraction`` (None when within budget)."""
    if not summary.error_budget_exceeded:
        return None
    return ErrorBudgetExceededError(
        f"{summary.error_fraction:.2%} of the inputs failed, above max_error_fraction "
        f"{config.job.max_error_fraction:.2%}; every row was written, _SUCCESS was not. "
        f"See the failures with `llava-features inspect {summary.output}`; to accept them, raise the "
        f"budget with --max-error-fraction F (job.max_error_fraction) and rerun with --resume, "
        f"which writes _SUCCESS without encoding anything again"
    )
