"""The offline job: object storage → CPU decode → GPU encoder actor pool → Parquet feature tables.

Plan (driver, metadata only; :func:`pipeline.storage.plan_inputs`): list the inputs and cut them
into *units* — groups of listed image files, row ranges of a manifest, WebDataset tars, row
groups of Parquet files of images — in a deterministic order. The plan costs memory in
proportion to its units; the driver never reads an image, a tar member or a Parquet image row.
Fingerprint the plan and the encoder, and check the output location (``_job.json`` records both).

Run (Ray Data, streaming): one row per pending unit → ``decode_unit`` CPU tasks, which expand
their unit (read bytes, decode guard, preprocess to uint8; bad inputs become error records, never
exceptions) into one typed :class:`~pipeline.records.DecodedShard` per output file of
``job.shard_size`` inputs → :class:`EncodeShardActor`, an autoscaling actor pool where each actor
holds one :class:`~pipeline.encoder.FeatureEncoder` replica, encodes the file's ok images in
batches and commits the Parquet file itself (:class:`pipeline.shards.ShardWriter`: temporary name +
rename locally, final-name PUT on object stores). Feature tensors therefore never travel back through the object store or the
driver; only a small per-file summary does. Once every file of a unit is committed, the driver
writes the unit's commit record (``_commits/unit-NNNNNN.json``): a unit is committed exactly
when its record exists, and ``--resume`` rewrites exactly the units without one. A file that is
retried (actor killed, node lost) is rewritten under the same name, so every input row appears
exactly once.

With ``job.serve_app`` (``encode --serve-app NAME``) the encode + commit stage runs on the encoder
replicas of a running Serve application instead (one GPU pool for both front doors): the job asks
the application for its encoder fingerprint first and refuses another one before anything is
written; tasks of :func:`send_shards` hand each decoded file to a replica through a deployment
handle (``pipeline.constants.SERVE_ENCODER_DEPLOYMENT``), at most ``serve.max_offline_shards`` ×
``serve.max_replicas`` at once, and send a file again when its replica died. The replica commits it
with the same :class:`pipeline.shards.ShardWriter` and returns the same summary, so the commit
records and ``_SUCCESS`` are the driver's, as above.

Finish: counts come from the commit records, files no record names (leftovers of interrupted
writers) are removed, and ``_SUCCESS`` is written last (unless more than ``max_error_fraction``
of the inputs failed: then the job exits non-zero after writing everything it has).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import Config, config_to_dict
from .constants import (
    CONFIG_KEY,
    FINGERPRINT_KEY,
    JOB_FILE,
    SERVE_DESCRIBE_METHOD,
    SERVE_ENCODER_DEPLOYMENT,
    SERVE_SHARD_METHOD,
    SUCCESS_FILE,
)
from .model.errors import (
    ConfigError,
    DecodeError,
    ErrorBudgetExceededError,
    ErrorCode,
    InputReadError,
    LlavaFeaturesError,
    OutputError,
)
from .ray_warnings import spend_actor_restart_warning
from .records import DecodedShard, PoolInfo, ShardSummary, ShardTarget, rows_of_batch, rows_to_batch
from .storage import (
    InputOptions,
    InputPlan,
    ReadOptions,
    Unit,
    absolute_uri,
    join_path,
    read_json,
    split_uri,
    write_json,
)

if TYPE_CHECKING:  # torch is imported when the model is resolved, after planning (see dry_run)
    from .model import ResolvedModel

logger = logging.getLogger(__name__)

RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor for the driver of a submitted job: its runtime environment (as JSON),
whose ``working_dir`` says the driver runs in a temporary copy of the submitted folder."""
_RAY_PROBE_TIMEOUT_S = 5.0
_COMMIT_THREADS = 4


@dataclass
class JobSummary:
    """What a run did (also written, with the fingerprints, into ``_SUCCESS``)."""

    output: str
    """Where the Parquet dataset is (local paths absolute)."""
    fingerprint: str
    """Encoder fingerprint of every row in the output."""
    input: str = ""
    """What was read (local paths absolute)."""
    input_kind: str = ""
    """``images``, ``manifest``, ``webdataset`` or ``parquet``."""
    inputs: int = 0
    """Input rows of the whole job (including units committed by earlier runs)."""
    read: int = 0
    """Input rows processed by this run."""
    ok: int = 0
    """Rows with status ok in the whole output."""
    errors: dict[str, int] = field(default_factory=dict)
    """Error rows by error code in the whole output."""
    units_total: int = 0
    """Units in the plan (the unit of resume)."""
    units_written: int = 0
    """Units committed by this run."""
    units_skipped: int = 0
    """Units already committed (``--resume``)."""
    shards_total: int = 0
    """Output files in the whole output."""
    shards_written: int = 0
    """Output files written by this run."""
    seconds: float = 0.0
    """Wall time of this run's pipeline."""
    images_per_s: float = 0.0
    """Input rows processed by this run per second of its pipeline."""
    error_fraction: float = 0.0
    """Error rows / rows in the whole output."""
    max_error_fraction: float = 0.0
    """The error budget this run's decision was made with."""
    error_budget_exceeded: bool = False
    """True when error_fraction > max_error_fraction (no _SUCCESS is written then)."""
    up_to_date: bool = False
    """True when a ``--resume`` found every unit committed and wrote nothing."""
    recorded: dict[str, Any] | None = None
    """With ``up_to_date``: the ``_SUCCESS`` the finished output holds (counts, budget, time), if any."""

    def format(self) -> str:
        errs = ", ".join(f"{code}: {n}" for code, n in sorted(self.errors.items())) or "none"
        lines = [
            f"input:         {self.input} ({self.input_kind})",
            f"images read:   {self.read} this run ({self.inputs} in the job)",
            f"ok:            {self.ok}",
            f"errors:        {sum(self.errors.values())} ({errs})",
            f"units:         {self.units_written} written, {self.units_skipped} already committed, "
            f"{self.units_total} in total",
            f"shards:        {self.shards_written} written, {self.shards_total} in the output",
            f"throughput:    {self.images_per_s:.1f} images/s ({self.seconds:.1f} s)",
            f"output:        {self.output}",
            f"fingerprint:   {self.fingerprint[:16]}",
        ]
        if self.up_to_date:
            if self.recorded is not None:
                lines.append(
                    f"up to date:    every unit was committed already; counts as recorded in {SUCCESS_FILE} "
                    f"({self.recorded.get('finished', '?')}, max_error_fraction "
                    f"{self.recorded.get('max_error_fraction', '?')}), left as it is"
                )
            elif self.error_budget_exceeded:
                lines.append("up to date:    every unit was committed already; nothing was written")
            else:
                lines.append(
                    f"up to date:    every unit was committed already; nothing was encoded again, {SUCCESS_FILE} written"
                )
        if self.error_budget_exceeded:
            lines.append(
                f"ERROR BUDGET EXCEEDED: {self.error_fraction:.2%} of inputs failed "
                f"(max_error_fraction {self.max_error_fraction:.2%})"
            )
        return "\n".join(lines)


# -- stage 1: decode (CPU tasks) --------------------------------------------------------------


def read_options(config: Config) -> ReadOptions:
    """What decode tasks need to expand units, from the config."""
    return ReadOptions(
        s3_endpoint=config.job.s3_endpoint,
        threads=config.job.decode_threads,
        max_bytes=config.decode.max_bytes,
        timeout_s=config.job.read_timeout_s,
        image_column=config.input.image_column,
        id_column=config.input.id_column,
        keep_columns=config.input.keep_columns,
    )


def _decode_piece(
    samples: list[Any],
    unit: int,
    piece: int,
    last: bool,
    preprocessor: Any,
    device_decode: bool,
    keep: tuple[str, ...],
) -> DecodedShard:
    record = DecodedShard(
        shard=unit, piece=piece, last=last, data=[] if device_decode else None, carried={c: [] for c in keep}
    )
    ok_pixels = []
    for sample in samples:
        try:
            if sample.error is not None:
                raise sample.error
            if device_decode:
                record.data.append(sample.data)  # type: ignore[union-attr]
                record.add_ok(sample.image_id, sample.uri, carried=sample.carried)
                continue
            prepared = preprocessor(sample.data, sample.uri)
            tiles = prepared.tiles  # (1, 3, S, S); anyres: the base image and the grid's tiles
            ok_pixels.append(tiles)
            grid = (prepared.grid.rows, prepared.grid.cols) if prepared.grid is not None else (0, 0)
            record.add_ok(
                sample.image_id,
                sample.uri,
                prepared.width,
                prepared.height,
                carried=sample.carried,
                tiles=len(tiles),
                grid=grid,
            )
        except (DecodeError, InputReadError) as exc:
            record.add_error(sample.image_id, sample.uri, str(exc.code), exc.message, carried=sample.carried)
        except Exception as exc:  # a bug must not take the job down: record it on the row
            logger.exception("Unexpected failure on %s", sample.uri)
            record.add_error(
                sample.image_id,
                sample.uri,
                str(ErrorCode.INTERNAL),
                f"{type(exc).__name__}: {exc}",
                sample.carried,
            )
        sample.data = None  # the encoded bytes are not needed any more
    if ok_pixels:
        record.pixels = np.concatenate(ok_pixels)
    else:
        spec = preprocessor.spec
        record.pixels = np.zeros((0, 3, spec.crop_height, spec.crop_width), np.uint8)
    return record


def decode_unit(
    batch: dict[str, np.ndarray],
    *,
    config: Config,
    resolved: ResolvedModel,
    read: ReadOptions,
    shard_size: int,
) -> Iterator[dict[str, Any]]:
    """Expand every unit row of ``batch`` into its output files: one :class:`DecodedShard` row each,
    ``shard_size`` inputs at a time, yielded as they are ready. Never raises for an input.

    With ``decode.nvjpeg`` the encoder decodes on its own device: inputs are only read here.
    """
    from .encoder import preprocess_spec
    from .images.preprocess import Preprocessor
    from .storage import expand_unit

    preprocessor = Preprocessor(preprocess_spec(resolved, config.decode), config.decode)
    device_decode = config.decode.nvjpeg
    keep = tuple(read.keep_columns)
    for row in rows_of_batch(batch):
        unit = Unit.from_row(row)
        pieces = expand_unit(unit, shard_size, read)
        current = next(pieces, None)
        if current is None:  # a unit without rows (an empty tar): committed with no file
            yield rows_to_batch(
                [_decode_piece([], unit.index, 0, True, preprocessor, device_decode, keep).to_row()]
            )
            continue
        piece = 0
        while current is not None:
            record = _decode_piece(current, unit.index, piece, False, preprocessor, device_decode, keep)
            current = next(pieces, None)  # read ahead: is this the unit's last file?
            record.last = current is None
            yield rows_to_batch([record.to_row()])
            piece += 1


def unit_batch(units: Sequence[Unit]) -> dict[str, np.ndarray]:
    """The numpy batch of plan rows that :func:`decode_unit` receives for ``units``, as the job hands
    them to Ray Data. For running the job's stages in one process (the in-process benchmark, the GPU
    tests)."""
    return rows_to_batch([u.to_row() for u in units])


# -- stage 2: encode + commit (actor pool) ----------------------------------------------------


class EncodeShardActor:
    """Ray Data actor: one FeatureEncoder replica; encodes output files' inputs and commits the files
    (:class:`pipeline.shards.ShardWriter`, which the shared pool's Serve replicas run too).

    Two calls may run at once on an actor: the device work is serialised by a lock, so one file's
    Parquet write overlaps the next one's encode.
    """

    def __init__(self, config: Config, resolved: ResolvedModel, target: ShardTarget) -> None:
        from .encoder import FeatureEncoder
        from .shards import ShardWriter

        encoder = FeatureEncoder(config, resolved)
        encoder.warmup(min(config.encoder.batch_size, 8))
        self.writer = ShardWriter(encoder, target)
        self.lock = threading.Lock()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        summaries = []
        for row in rows_of_batch(batch):
            record = DecodedShard.from_row(row)
            encoded = None
            if len(record):
                with self.lock:
                    encoded = self.writer.encode(record)
            summaries.append(self.writer.write(record, encoded).to_row())
        return rows_to_batch(summaries)


def shard_target(
    config: Config, output_uri: str, job_record: dict[str, Any], carried: dict[str, str] | None = None
) -> ShardTarget:
    """Where and how this job's files are written (``carried``: the plan's carried column types), for
    whichever pool encodes them."""
    return ShardTarget(
        output=output_uri,
        fingerprint=job_record["fingerprint"],
        metadata=shard_metadata(job_record),
        features=config.encoder.features,
        pooled=config.encoder.pooled,
        tensor_format=config.job.tensor_format,
        compression=config.job.compression,
        s3_endpoint=config.job.s3_endpoint,
        carried_types=dict(carried or {}),
    )


# -- stage 2 on the shared pool: a Serve application's encoder replicas ---------------------------

SEND_TASK_CPUS = 0.0
"""CPUs a task handing files to the Serve replicas reserves: none, it only waits for their answers
(reserving some would take them from the decode tasks while the replicas hold theirs; the tasks in
flight are bounded by their concurrency instead)."""
SHARD_ATTEMPTS = 4
"""Tries of a file whose replica died (or was not reachable) before the job fails."""
_SHARD_RETRY_S = 2.0
_DESCRIBE_TIMEOUT_S = 120.0


def _pool_handle(app: str) -> Any:
    from ray import serve

    return serve.get_deployment_handle(SERVE_ENCODER_DEPLOYMENT, app_name=app)


def describe_pool(app: str) -> PoolInfo:
    """What the encoder replicas of Serve application ``app`` are (their fingerprint, the offline
    settings); a typed ``unavailable`` error when no such application answers on this Ray cluster."""
    try:
        info = (
            getattr(_pool_handle(app), SERVE_DESCRIBE_METHOD).remote().result(timeout_s=_DESCRIBE_TIMEOUT_S)
        )
    except Exception as exc:
        raise LlavaFeaturesError(
            f"No Serve application {app!r} with a {SERVE_ENCODER_DEPLOYMENT} deployment answers on this Ray "
            f"cluster ({type(exc).__name__}: {exc}). Start it first (serve run configs/serve.yaml, or "
            "llava-features serve) on the cluster the job runs on (--address). Nothing was written.",
            code=ErrorCode.UNAVAILABLE,
        ) from exc
    if not isinstance(info, PoolInfo):
        raise LlavaFeaturesError(
            f"Serve application {app!r} is not a llava-features application (its {SERVE_DESCRIBE_METHOD} "
            f"gave {type(info).__name__})",
            code=ErrorCode.UNAVAILABLE,
        )
    return info


def check_pool(app: str, pool: PoolInfo, fingerprint: str) -> None:
    """Refuse (ConfigError, nothing written) a pool whose features would not be the plan's."""
    if pool.fingerprint != fingerprint:
        raise ConfigError(
            f"Serve application {app!r} encodes with fingerprint {pool.fingerprint[:16]}, this job's is "
            f"{fingerprint[:16]}: its features would not be the ones this config asks for. Serve the same "
            "model and settings (llava-features info shows the fingerprint of a config), or run without "
            "--serve-app. Nothing was written.",
            code=ErrorCode.FINGERPRINT_MISMATCH,
        )


def send_shard(handle: Any, target: ShardTarget, record: DecodedShard) -> ShardSummary:
    """One file through the replicas: encoded and committed there, its summary back. A file whose
    replica died is sent again (it is rewritten under the same name; the unit's commit record names
    it once), up to :data:`SHARD_ATTEMPTS` tries."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    for attempt in range(1, SHARD_ATTEMPTS + 1):
        try:
            return getattr(handle, SERVE_SHARD_METHOD).remote(target, record).result()  # type: ignore[no-any-return]
        except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as exc:
            if attempt == SHARD_ATTEMPTS:
                raise
            logger.warning(
                "File %d/%d: its replica was lost (%s); sending it again (try %d of %d)",
                record.shard,
                record.piece,
                type(exc).__name__,
                attempt + 1,
                SHARD_ATTEMPTS,
            )
            time.sleep(_SHARD_RETRY_S * attempt)
    raise AssertionError("unreachable")


def send_shards(batch: dict[str, np.ndarray], *, app: str, target: ShardTarget) -> dict[str, np.ndarray]:
    """Ray Data task: the decoded files of ``batch`` through Serve application ``app`` → their summaries."""
    handle = _pool_handle(app)
    return rows_to_batch(
        [send_shard(handle, target, DecodedShard.from_row(row)).to_row() for row in rows_of_batch(batch)]
    )


# -- commit records (driver) --------------------------------------------------------------------


class _Commits:
    """Collects the actors' per-file summaries and writes each unit's commit record once all of its
    files are in (on a few threads, so slow stores do not hold up the pipeline)."""

    def __init__(self, fs: Any, out_path: str, units: dict[int, Unit]) -> None:
        self.fs, self.out_path, self.units = fs, out_path, units
        self.pieces: dict[int, dict[int, ShardSummary]] = {}
        self.last: dict[int, int] = {}
        self.committed: dict[int, Any] = {}
        self.pool = ThreadPoolExecutor(max_workers=_COMMIT_THREADS, thread_name_prefix="commit")
        self.futures: list[Future[str]] = []

    def add(self, row: dict[str, Any]) -> bool:
        """Record one file's summary (a :class:`~pipeline.records.ShardSummary` row); True when it is
        new (a retried file reports again)."""
        from .sink import UnitCommit, commit_unit

        summary = ShardSummary.from_row(row)
        unit, piece = summary.shard, summary.piece
        pieces = self.pieces.setdefault(unit, {})
        new = piece not in pieces
        pieces[piece] = summary
        if summary.last:
            self.last[unit] = piece
        last = self.last.get(unit)
        if last is None or any(p not in pieces for p in range(last + 1)):
            return new
        files = [pieces[p] for p in range(last + 1)]
        errors: Counter[str] = Counter()
        for f in files:
            errors.update(f.errors)
        commit = UnitCommit(
            unit=unit,
            rows=sum(f.rows for f in files),
            ok=sum(f.ok for f in files),
            errors=dict(errors),
            files=[(f.file, f.rows) for f in files if f.file],
        )
        planned = self.units[unit].rows
        if planned is not None and commit.rows != planned:
            raise OutputError(f"Unit {unit} wrote {commit.rows} rows for its {planned} inputs")  # a bug
        self.committed[unit] = commit
        self.futures.append(self.pool.submit(commit_unit, self.out_path, self.fs, commit))
        return new

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for future in self.futures:
            future.result()  # a failed commit write fails the job (its unit is rewritten on resume)


# -- the driver -------------------------------------------------------------------------------


def _check_output(
    fs: Any, out_path: str, output: str, job_record: dict[str, Any], resume: bool, s3_endpoint: str | None
) -> dict[str, Any] | None:
    """The existing ``_job.json`` of a resumable output (None for an empty one); OutputError otherwise."""
    from .storage import output_is_empty

    if output_is_empty(output, s3_endpoint=s3_endpoint):
        return None
    existing = read_json(fs, join_path(out_path, JOB_FILE))
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
            f"Output {output} was written for a different input plan (inputs changed, or their order, sizes or "
            "modification times, --limit, --shard-size or the input options): resuming would mix units. "
            "Use the original input and options, or another output location.",
            code=ErrorCode.FINGERPRINT_MISMATCH,
        )
    return existing


def ray_job_working_dir() -> str | None:
    """The ``working_dir`` of the Ray job this driver runs in (``ray job submit --working-dir``), if any."""
    raw = os.environ.get(RAY_JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        runtime_env = (json.loads(raw) or {}).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    working_dir = runtime_env.get("working_dir") if isinstance(runtime_env, dict) else None
    return str(working_dir) if working_dir else None


def resolve_output(output_uri: str) -> str:
    """``output_uri`` with a local path made absolute on the driver. Raises ConfigError for a relative
    local path when the driver runs inside a Ray job's working directory: Ray deletes that folder
    (with everything written into it) when the job ends."""
    raw = output_uri.strip()
    scheme, _ = split_uri(raw)
    if scheme == "local":
        written = raw[len("file://") :] if raw.lower().startswith("file://") else raw
        if not os.path.isabs(os.path.expanduser(written)):
            working_dir = ray_job_working_dir()
            if working_dir is not None:
                raise ConfigError(
                    f"--output {output_uri!r} is a relative path, and this driver runs in the temporary copy of "
                    f"the job's working directory that Ray made ({os.getcwd()}, from {working_dir}) and deletes "
                    "when the job ends: the features would be lost. Give an absolute path on storage that "
                    "outlives the job (a shared filesystem), or an s3:// / gs:// URI."
                )
    return absolute_uri(raw) if scheme == "local" else raw.rstrip("/")


def make_plan(config: Config, input_uri: str) -> InputPlan:
    """The input plan of ``config`` for ``input_uri`` (:func:`pipeline.storage.plan_inputs`)."""
    from .sink import OUTPUT_COLUMNS
    from .storage import plan_inputs

    clash = sorted(set(config.input.keep_columns) & OUTPUT_COLUMNS)
    if clash:
        raise ConfigError(f"input.keep_columns {clash}: the output has column(s) of that name already")
    i, job = config.input, config.job
    return plan_inputs(
        input_uri,
        options=InputOptions(i.format, i.image_column, i.id_column, i.keep_columns),
        shard_size=job.shard_size,
        limit=job.limit,
        s3_endpoint=job.s3_endpoint,
        timeout_s=job.read_timeout_s,
    )


def _ray_target(address: str | None) -> str | None:
    return address or os.environ.get("RAY_ADDRESS") or None


def _probe_ray(target: str, source: str) -> None:
    """Fail fast, with a typed error, when nothing answers at a Ray address (``ray.init`` waits minutes)."""
    hostport = target.split("://", 1)[1] if "://" in target else target
    if target == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            hostport = canonicalize_bootstrap_address("auto") or ""
        except Exception as exc:  # no cluster found, or Ray's private helper moved
            raise LlavaFeaturesError(
                f"Could not find the Ray cluster for address 'auto': {exc}", code=ErrorCode.UNAVAILABLE
            ) from exc
    host, _, port = hostport.rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return  # not host:port: let ray.init say what is wrong
    try:
        with socket.create_connection((host, int(port)), timeout=_RAY_PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        raise LlavaFeaturesError(
            f"No Ray cluster answers at {target} (from {source}): {exc}. Start the cluster, or leave "
            "--address and RAY_ADDRESS unset to run on a new local Ray. Nothing was written.",
            code=ErrorCode.UNAVAILABLE,
        ) from exc


def _init_ray(address: str | None = None) -> Any:
    """Ray for this job: the one already initialised in this process, else the cluster at ``address``
    (``job.address``) or ``RAY_ADDRESS``, else a new local Ray (never one found running on the host).
    Raises a typed error (code ``unavailable``) when Ray cannot be started or reached."""
    import ray

    if ray.is_initialized():
        return ray
    target = _ray_target(address)
    if target is not None:
        _probe_ray(target, "--address / job.address" if address else "RAY_ADDRESS")
    try:
        ray.init(address=target or "local", logging_level=logging.WARNING)
    except Exception as exc:
        where = f"the Ray cluster at {target}" if target else "a local Ray"
        raise LlavaFeaturesError(
            f"Could not start {where}: {type(exc).__name__}: {exc}. Nothing was written.",
            code=ErrorCode.UNAVAILABLE,
        ) from exc
    return ray


def _job_record(config: Config, plan: InputPlan, description: Any) -> dict[str, Any]:
    return {
        "fingerprint": description.fingerprint,
        "plan_fingerprint": plan.fingerprint,
        "input": plan.input,
        "input_kind": plan.kind,
        "input_options": plan.options,
        "carried_columns": plan.carried,
        "source_files": plan.files,
        "units": len(plan.units),
        "rows": plan.rows,
        "shard_size": plan.shard_size,
        "encoder": description.fields,
        "config": config_to_dict(config),
        "created": datetime.now(UTC).isoformat(),
    }


def run_job(config: Config, input_uri: str, output_uri: str, *, resume: bool = False) -> JobSummary:
    """Encode every input of ``input_uri`` into a Parquet dataset at ``output_uri``."""
    from .encoder import describe_encoder
    from .model import resolve_model
    from .sink import committed_units, remove_stale_temp_files
    from .storage import ensure_output_dir, resolve_filesystem

    job = config.job  # every value was checked (types, ranges) when the config was loaded
    output_uri = resolve_output(output_uri)
    plan = make_plan(config, input_uri)
    release_memory()
    resolved = resolve_model(config.model)
    description = describe_encoder(config, resolved)
    job_record = _job_record(config, plan, description)
    fs, out_path = resolve_filesystem(output_uri, s3_endpoint=job.s3_endpoint)
    existing = _check_output(fs, out_path, output_uri, job_record, resume, job.s3_endpoint)
    done = committed_units(out_path, fs) if existing is not None else set()
    pending = [u for u in plan.units if u.index not in done]
    summary = JobSummary(
        output=output_uri,
        fingerprint=description.fingerprint,
        input=plan.input,
        input_kind=plan.kind,
        units_total=len(plan.units),
        units_skipped=len(plan.units) - len(pending),
        max_error_fraction=job.max_error_fraction,
    )
    logger.info(
        "%d unit(s) (%s rows) to %s: %d already committed, %d to write",
        len(plan.units),
        plan.rows if plan.rows is not None else "unknown",
        output_uri,
        len(done),
        len(pending),
    )
    if not pending:
        return _finish_up_to_date(config, plan, fs, out_path, summary)

    # Ray first: when it cannot start, nothing has been written to the output.
    _init_ray(job.address)
    pool = None
    if job.serve_app:  # and the shared pool's replicas: their features must be the plan's
        pool = describe_pool(job.serve_app)
        check_pool(job.serve_app, pool, description.fingerprint)
        logger.info(
            "Encoding through Serve application %r (up to %d replicas, %d files in flight each)",
            job.serve_app,
            pool.max_replicas,
            pool.max_offline_shards,
        )
    ensure_output_dir(output_uri, s3_endpoint=job.s3_endpoint)
    if existing is None:
        write_json(fs, join_path(out_path, JOB_FILE), job_record)
    remove_stale_temp_files(out_path, fs)
    _remove_uncommitted(fs, out_path, {u.index for u in pending})
    commits = _Commits(fs, out_path, {u.index: u for u in plan.units})
    started = time.perf_counter()
    try:
        target = shard_target(config, output_uri, job_record, dict(plan.carried))
        _run_pipeline(config, resolved, pending, target, summary, commits, pool)
    finally:
        commits.close()
    # A writer that died mid-file (actor or node lost) left its temporary file; the file was
    # written again by the retry and no writer of this job is running any more.
    remove_stale_temp_files(out_path, fs)
    summary.seconds = time.perf_counter() - started
    summary.images_per_s = summary.read / summary.seconds if summary.seconds > 0 else 0.0
    summary.units_written = len(commits.committed)
    return _finish(config, plan, fs, out_path, summary, commits.committed, done)


def _remove_uncommitted(fs: Any, out_path: str, units: set[int]) -> None:
    """Remove the output files of ``units`` (uncommitted: an interrupted run's) before rewriting them."""
    from .sink import output_files, remove_files

    remove_files(
        out_path, fs, [name for name, (unit, _) in output_files(out_path, fs).items() if unit in units]
    )


def _count(summary: JobSummary, commits: dict[int, Any], max_error_fraction: float) -> None:
    errors: Counter[str] = Counter()
    for commit in commits.values():
        errors.update(commit.errors)
    summary.ok = sum(c.ok for c in commits.values())
    summary.errors = dict(errors)
    summary.inputs = sum(c.rows for c in commits.values())
    summary.shards_total = sum(len(c.files) for c in commits.values())
    summary.error_fraction = (summary.inputs - summary.ok) / summary.inputs if summary.inputs else 0.0
    summary.error_budget_exceeded = summary.error_fraction > max_error_fraction


def _write_success(fs: Any, out_path: str, summary: JobSummary, plan: InputPlan) -> None:
    record = {
        **asdict(summary),
        "plan_fingerprint": plan.fingerprint,
        "finished": datetime.now(UTC).isoformat(),
    }
    record.pop("recorded", None)
    write_json(fs, join_path(out_path, SUCCESS_FILE), record)


def _finish(
    config: Config,
    plan: InputPlan,
    fs: Any,
    out_path: str,
    summary: JobSummary,
    written: dict[int, Any],
    done: set[int],
) -> JobSummary:
    from .sink import output_files, read_commits, remove_files

    commits = {**read_commits(out_path, fs, done - set(written)), **written}
    missing = [u.index for u in plan.units if u.index not in commits]
    if missing:
        raise OutputError(
            f"Output {summary.output} is incomplete: {len(missing)} unit(s) have no commit record (e.g. unit "
            f"{missing[0]}); run again with --resume"
        )
    for unit in plan.units:
        if unit.rows is not None and commits[unit.index].rows != unit.rows:
            raise OutputError(
                f"Output {summary.output}: unit {unit.index} holds {commits[unit.index].rows} rows for its "
                f"{unit.rows} inputs"
            )
    present = output_files(out_path, fs)
    named = {name for c in commits.values() for name, _ in c.files}
    lost = sorted(named - set(present))
    if lost:
        raise OutputError(f"Output {summary.output} is missing {len(lost)} committed file(s), e.g. {lost[0]}")
    remove_files(out_path, fs, set(present) - named)  # left by writers of an earlier attempt
    _count(summary, commits, config.job.max_error_fraction)
    if not summary.error_budget_exceeded:
        _write_success(fs, out_path, summary, plan)
    return summary


def _finish_up_to_date(
    config: Config, plan: InputPlan, fs: Any, out_path: str, summary: JobSummary
) -> JobSummary:
    """A resume with nothing to write: the recorded summary, this run's own budget decision, and a
    ``_SUCCESS`` that is never rewritten (it says what the run that finished the output decided)."""
    summary.up_to_date = True
    recorded = read_json(fs, join_path(out_path, SUCCESS_FILE))
    if recorded is not None and recorded.get("plan_fingerprint") == plan.fingerprint:
        summary.recorded = recorded
        summary.ok = int(recorded.get("ok", 0))
        summary.errors = {str(k): int(v) for k, v in dict(recorded.get("errors") or {}).items()}
        summary.inputs = int(recorded.get("inputs", 0))
        summary.shards_total = int(recorded.get("shards_total", 0))
        summary.error_fraction = (summary.inputs - summary.ok) / summary.inputs if summary.inputs else 0.0
        summary.error_budget_exceeded = summary.error_fraction > config.job.max_error_fraction
        return summary
    # Every unit is committed but no run wrote _SUCCESS (one exceeded its budget): decide now.
    return _finish(config, plan, fs, out_path, summary, {}, {u.index for u in plan.units})


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
    from .encoder import preprocess_spec

    spec = preprocess_spec(resolved, config.decode)
    # One output file's uint8 pixels (anyres: the base image and the tiles of the largest canvas), its
    # encoded inputs and the next file's (read ahead).
    tiles = 1 + max(
        (w * h // (spec.crop_height * spec.crop_width) for w, h in spec.grid_pinpoints), default=0
    )
    per_image = tiles * 3 * spec.crop_height * spec.crop_width + 2 * 4 * 1024 * 1024
    return _DECODE_WORKER_BASE_BYTES + config.job.shard_size * per_image


def shard_metadata(job_record: dict[str, Any]) -> dict[str, str]:
    """Key-value metadata of every shard file of a job (``job_record``: what ``_job.json`` holds):
    the encoder fingerprint and the resolved config + encoder description as JSON."""
    return {
        FINGERPRINT_KEY: job_record["fingerprint"],
        CONFIG_KEY: json.dumps(
            {"config": job_record["config"], "encoder": job_record["encoder"]}, default=str
        ),
    }


def _run_pipeline(
    config: Config,
    resolved: ResolvedModel,
    pending: list[Unit],
    target: ShardTarget,
    summary: JobSummary,
    commits: _Commits,
    pool: PoolInfo | None = None,
) -> None:
    """Decode tasks → the job's own encoder actors, or (``pool``) the Serve application's replicas."""
    ray = _init_ray(config.job.address)
    job = config.job
    gpus = job.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    if (pool is not None or gpus == 0) and config.model.device == "auto":
        config = replace(config, model=replace(config.model, device="cpu"))  # the decode tasks' view
    ds = ray.data.from_items([u.to_row() for u in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(
        decode_unit,
        fn_kwargs={
            "config": config,
            "resolved": resolved,
            "read": read_options(config),
            "shard_size": job.shard_size,
        },
        batch_size=1,
        num_cpus=1,
        # What a decode task holds: one output file's encoded bytes and uint8 pixels. Reserving
        # it also keeps the decode tasks a separate pool (Ray Data fuses stages with equal resource
        # requests, which would move decoding into the encoder actors on CPU-only clusters).
        memory=_decode_task_memory(config, resolved),
        runtime_env=_worker_runtime_env(),
        batch_format="numpy",
    )
    if pool is not None:
        # Tasks that hand each decoded file to the application's replicas and wait for its summary:
        # at most max_offline_shards x max_replicas files in flight (backpressure on the decode stage).
        ds = ds.map_batches(
            send_shards,
            fn_kwargs={"app": job.serve_app, "target": target},
            batch_size=1,
            batch_format="numpy",
            num_cpus=SEND_TASK_CPUS,
            concurrency=pool.max_offline_shards * pool.max_replicas,
            runtime_env=_worker_runtime_env(),
        )
    else:
        # Ray Data's actor pools always trigger one harmless ERROR line of Ray's (the pool's own
        # arguments are object refs; see pipeline/ray_warnings.py): spend it here, out of sight.
        spend_actor_restart_warning()
        from ray.data import ActorPoolStrategy

        ds = ds.map_batches(
            EncodeShardActor,
            fn_constructor_kwargs={"config": config, "resolved": resolved, "target": target},
            batch_size=1,
            batch_format="numpy",
            compute=ActorPoolStrategy(
                min_size=job.actors[0], max_size=job.actors[1], max_concurrent_calls_per_actor=2
            ),
            num_gpus=gpus,
            num_cpus=job.num_cpus_per_actor,
            runtime_env=_worker_runtime_env(),
        )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for row in rows_of_batch(batch):
            if commits.add(row):  # a retried file reports again; it was replaced, not duplicated
                summary.read += int(row["rows"])
                summary.shards_written += 1 if row["file"] else 0


def budget_error(summary: JobSummary, config: Config) -> ErrorBudgetExceededError | None:
    """The typed error for a run above ``max_error_fraction`` (None when within budget)."""
    if not summary.error_budget_exceeded:
        return None
    if summary.up_to_date and summary.recorded is not None:
        return ErrorBudgetExceededError(
            f"{summary.error_fraction:.2%} of the inputs failed, above max_error_fraction "
            f"{config.job.max_error_fraction:.2%}; nothing was written (every unit was committed already), and "
            f"{SUCCESS_FILE}, written by the run that allowed "
            f"{float(summary.recorded.get('max_error_fraction', 0)):.2%}, is left as it is"
        )
    return ErrorBudgetExceededError(
        f"{summary.error_fraction:.2%} of the inputs failed, above max_error_fraction "
        f"{config.job.max_error_fraction:.2%}; every row was written, {SUCCESS_FILE} was not. "
        f"See the failures with `llava-features inspect {summary.output}`; to accept them, raise the "
        f"budget with --max-error-fraction F (job.max_error_fraction) and rerun with --resume, "
        f"which writes {SUCCESS_FILE} without encoding anything again"
    )


# -- dry run ----------------------------------------------------------------------------------


@dataclass
class DryRun:
    """What ``encode --dry-run`` reports: the plan, the output it would write, and the output's state."""

    plan: InputPlan
    output: str
    plan_seconds: float
    bytes_per_row: int
    """Feature bytes per ok row (tokens × dim × itemsize of each stored tensor, + pooled)."""
    feature_shapes: dict[str, list[int]]
    output_state: str
    plan_peak_rss_mb: float | None = None
    """The driver's peak resident memory when planning ended (before the model is loaded)."""
    serve_app: str | None = None
    """``job.serve_app``: the Serve application whose replicas would encode (not asked: no Ray)."""

    @property
    def estimated_bytes(self) -> int:
        """Feature bytes of the rows the plan knows (a lower bound when some rows are unknown)."""
        return self.plan.known_rows * self.bytes_per_row

    def format(self) -> str:
        plan = self.plan
        rows = (
            f"{plan.rows}"
            if plan.rows is not None
            else (f"{plan.known_rows} known; {plan.unknown_units} unit(s) counted when read")
        )
        shards = plan.shards()
        shapes = ", ".join(f"{k} {v}" for k, v in self.feature_shapes.items())
        size = _human(self.estimated_bytes) + (
            "" if plan.rows is not None else " + the rows of the unknown units"
        )
        source = _human(plan.source_bytes) if plan.source_bytes is not None else "unknown"
        return "\n".join(
            [
                f"input:         {plan.input} ({plan.kind}: {plan.files} file(s), {source})",
                f"units:         {len(plan.units)}",
                f"rows:          {rows}",
                f"shards:        {shards if shards is not None else 'at least ' + str(len(plan.units))} "
                f"(up to {plan.shard_size} rows each)",
                f"features:      {shapes} ({_human(self.bytes_per_row)} per row)",
                f"output bytes:  ~{size}",
                f"carried:       {', '.join(f'{c} ({t})' for c, t in plan.carried.items()) or 'none'}",
                f"output:        {self.output} ({self.output_state})",
                "encoders:      "
                + (
                    f"the replicas of Serve application {self.serve_app!r} (its fingerprint is checked when the job starts)"
                    if self.serve_app
                    else "the job's own actor pool"
                ),
                f"plan:          {plan.fingerprint[:16]} (planned in {self.plan_seconds:.2f} s"
                + (f", driver peak RSS {self.plan_peak_rss_mb:.0f} MB)" if self.plan_peak_rss_mb else ")"),
            ]
        )


def _human(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "PB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} PB"


def feature_bytes(config: Config, resolved: ResolvedModel) -> tuple[int, dict[str, list[int]]]:
    """Bytes per ok row of the stored features, and their shapes by column."""
    from .encoder import output_dtype_name

    itemsize = 4 if output_dtype_name(config) == "float32" else 2
    tokens = resolved.num_tokens
    shapes: dict[str, list[int]] = {}
    if config.encoder.features in ("projected", "both"):
        shapes["features"] = [tokens, resolved.feature_dim]
    if config.encoder.features in ("tower", "both"):
        shapes["tower_features"] = [tokens, resolved.mm_hidden_size]
    total = sum(a * b * itemsize for a, b in shapes.values())
    if config.encoder.pooled:
        first = next(iter(shapes.values()))
        shapes["pooled"] = [first[1]]
        total += 4 * first[1]
    return total, shapes


def release_memory() -> None:
    """Hand the heap that planning freed back to the system (glibc keeps it otherwise), before the
    model and torch are loaded; a no-op where the C library has no ``malloc_trim``."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def dry_run(config: Config, input_uri: str, output_uri: str) -> DryRun:
    """Plan the job and describe what it would write, without starting Ray or writing anything.

    The plan is made first, before the model (and torch) is loaded to know the feature shapes.
    """
    from .sink import committed_units
    from .storage import output_is_empty, resolve_filesystem

    output_uri = resolve_output(output_uri)
    started = time.perf_counter()
    plan = make_plan(config, input_uri)
    plan_seconds = time.perf_counter() - started
    plan_rss = peak_rss_mb()
    release_memory()
    from .encoder import describe_encoder  # torch and transformers from here on
    from .model import resolve_model

    resolved = resolve_model(config.model)
    per_row, shapes = feature_bytes(config, resolved)
    fs, out_path = resolve_filesystem(output_uri, s3_endpoint=config.job.s3_endpoint)
    if output_is_empty(output_uri, s3_endpoint=config.job.s3_endpoint):
        state = "empty: a new job"
    else:
        existing = read_json(fs, join_path(out_path, JOB_FILE))
        if existing is None:
            state = f"not empty and no {JOB_FILE}: the job would refuse it"
        elif existing.get("plan_fingerprint") != plan.fingerprint:
            state = "written for another plan: --resume would refuse it"
        elif existing.get("fingerprint") != describe_encoder(config, resolved).fingerprint:
            state = "written by another encoder: --resume would refuse it"
        else:
            done = len(committed_units(out_path, fs) & {u.index for u in plan.units})
            finished = read_json(fs, join_path(out_path, SUCCESS_FILE)) is not None
            state = f"{done} of {len(plan.units)} unit(s) committed{', finished' if finished else ''}: --resume continues it"
    return DryRun(plan, output_uri, plan_seconds, per_row, shapes, state, plan_rss, config.job.serve_app)


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, in MiB: ``VmHWM`` (Linux; reset by ``exec``, unlike
    ``ru_maxrss``, which a child started by ``fork`` + ``exec`` inherits from its parent), else
    ``ru_maxrss``; None where neither exists."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # pragma: no cover - not a Unix
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
