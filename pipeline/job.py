"""The offline job: object storage → CPU decode → GPU encoder actor pool → the feature table (Delta Lake).

Plan (driver, metadata only; :func:`pipeline.storage.plan_inputs`): list the inputs and cut them
into *units* — groups of listed image files, row ranges of a manifest, WebDataset tars, row
groups of Parquet files of images — in a deterministic order, each with a content key (what it
reads). The plan costs memory in proportion to its units; the driver never reads an image, a tar
member or a Parquet image row. Open the output (:class:`pipeline.table.TableWriter`): a new table,
a ``--resume`` of its last plan, or an ``--append`` of new inputs; anything that would corrupt the
table (another job's, another schema, other values, another plan) is refused before anything is
written.

Run (Ray Data, streaming): one row per pending unit → ``decode_unit`` CPU tasks, which expand
their unit (read bytes, decode guard, preprocess to uint8; bad inputs become error records, never
exceptions) into one typed :class:`~pipeline.records.DecodedShard` per output file of
``job.shard_size`` inputs → :class:`EncodeShardActor`, an autoscaling actor pool where each actor
holds one :class:`~pipeline.encoder.FeatureEncoder` replica, encodes the file's ok images in
batches and writes the data file itself (:class:`pipeline.shards.ShardWriter`). Feature tensors never
travel back through the object store or the driver; only a small per-file summary does. The
driver's committer (:class:`pipeline.table.Committer`) commits complete units to the table's Delta
log in batches: a unit's files become visible in one commit, and two runs can never both commit a
unit. A file that is retried (actor killed, node lost) is rewritten under the same name, so every
input row appears exactly once.

With ``job.serve_app`` (``encode --serve-app NAME``) the encode + write stage runs on the encoder
replicas of a running Serve application instead (one GPU pool for both front doors): the job asks
the application for its encoder fingerprint first and refuses another one before anything is
written; tasks of :func:`send_shards` hand each decoded file to a replica through a deployment
handle (``pipeline.constants.SERVE_ENCODER_DEPLOYMENT``), at most ``serve.max_offline_shards`` ×
``serve.max_replicas`` at once, and send a file again when its replica died. The replica writes it
with the same :class:`pipeline.shards.ShardWriter` and returns the same summary; the commits are the
driver's, as above.

Finish (:meth:`pipeline.table.TableRun.finish`): every unit of the plan must be in the table with
all its rows; the counts and the error-budget decision are recorded in the log, ``_SUCCESS`` is
written when the table is complete (unless more than ``max_error_fraction`` of the inputs failed:
then the job exits non-zero after committing everything it has), and files no commit references
that this run (or a run that died) wrote are removed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .config import Config
from .constants import SERVE_DESCRIBE_METHOD, SERVE_ENCODER_DEPLOYMENT, SERVE_SHARD_METHOD
from .model.errors import (
    ConfigError,
    DecodeError,
    ErrorBudgetExceededError,
    ErrorCode,
    InputReadError,
    LlavaFeaturesError,
)
from .ray_warnings import spend_actor_restart_warning
from .records import DecodedShard, PoolInfo, ShardSummary, ShardTarget, rows_of_batch, rows_to_batch
from .storage import InputOptions, InputPlan, ReadOptions, Unit, absolute_uri, split_uri
from .table import (
    SUCCESS_FILE,
    Committer,
    IdSet,
    Outcome,
    PlannedUnit,
    RunPlan,
    TableLocation,
    TableRun,
    TableWriter,
)

if TYPE_CHECKING:  # torch is imported when the model is resolved, after planning (see dry_run)
    from .model import ResolvedModel

logger = logging.getLogger(__name__)

RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor for the driver of a submitted job: its runtime environment (as JSON),
whose ``working_dir`` says the driver runs in a temporary copy of the submitted folder."""
_RAY_PROBE_TIMEOUT_S = 5.0

WriteMode = Literal["create", "resume", "append"]
"""How the job treats an existing table: refuse it, continue its last plan (``--resume``), or add the
inputs it does not hold yet (``--append``)."""


@dataclass
class JobSummary:
    """What a run did, and what the table holds of its plan."""

    output: str
    """Where the table is (local paths absolute)."""
    fingerprint: str
    """Encoder fingerprint of every row of the table."""
    input: str = ""
    """What was read (local paths absolute)."""
    input_kind: str = ""
    """``images``, ``manifest``, ``webdataset`` or ``parquet``."""
    mode: WriteMode = "create"
    """How the run treated the output: a new table, a ``--resume``, an ``--append``."""
    inputs: int = 0
    """Rows of the plan in the table (including units committed by earlier runs)."""
    read: int = 0
    """Input rows processed by this run."""
    ok: int = 0
    """Rows of the plan with status ok."""
    errors: dict[str, int] = field(default_factory=dict)
    """Error rows of the plan by error code."""
    units_total: int = 0
    """Units in the plan (the unit of resume)."""
    units_written: int = 0
    """Units committed by this run."""
    units_skipped: int = 0
    """Units the table held already (``--resume``, ``--append``)."""
    files_total: int = 0
    """Data files of the plan in the table."""
    files_written: int = 0
    """Data files written by this run."""
    seconds: float = 0.0
    """Wall time of this run's pipeline."""
    images_per_s: float = 0.0
    """Input rows processed by this run per second of its pipeline."""
    error_fraction: float = 0.0
    """Error rows / rows of the plan."""
    max_error_fraction: float = 0.0
    """The error budget this run's decision was made with."""
    error_budget_exceeded: bool = False
    """True when error_fraction > max_error_fraction (the table is then ``failed``, without _SUCCESS)."""
    state: str = ""
    """The table's state after the run: ``complete`` or ``failed``."""
    version: int = 0
    """The table's version after the run."""
    up_to_date: bool = False
    """True when the table held every unit already and the run wrote nothing."""
    recorded: dict[str, Any] | None = None
    """With ``up_to_date``: the totals the run that finished the table recorded (budget, counts)."""

    def format(self) -> str:
        errs = ", ".join(f"{code}: {n}" for code, n in sorted(self.errors.items())) or "none"
        skipped = {"create": "", "resume": " already committed", "append": " already in the table"}[self.mode]
        lines = [
            f"input:         {self.input} ({self.input_kind})",
            f"images read:   {self.read} this run ({self.inputs} in the plan)",
            f"ok:            {self.ok}",
            f"errors:        {sum(self.errors.values())} ({errs})",
            f"units:         {self.units_written} written, {self.units_skipped}{skipped or ' skipped'}, "
            f"{self.units_total} in total",
            f"files:         {self.files_written} written, {self.files_total} in the table for this plan",
            f"throughput:    {self.images_per_s:.1f} images/s ({self.seconds:.1f} s)",
            f"output:        {self.output} (Delta table version {self.version}, {self.state})",
            f"fingerprint:   {self.fingerprint[:16]}",
        ]
        if self.up_to_date and self.mode == "append" and not self.units_total:
            lines.append("up to date:    the table holds every input already; nothing was appended")
        elif self.up_to_date:
            if (
                self.recorded is not None
                and self.recorded.get("max_error_fraction") != self.max_error_fraction
            ):
                lines.append(
                    "up to date:    every unit was committed already; the table is left as its last run recorded "
                    f"it (max_error_fraction {self.recorded.get('max_error_fraction')})"
                )
            else:
                lines.append("up to date:    every unit was committed already; nothing was encoded again")
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
    *,
    unit: Unit,
    key: str,
    piece: int,
    preprocessor: Any,
    device_decode: bool,
    keep: tuple[str, ...],
) -> DecodedShard:
    record = DecodedShard(shard=unit.index, key=key, piece=piece, data=[] if device_decode else None)
    record.rows.carried = {c: [] for c in keep}
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
                width=prepared.width,
                height=prepared.height,
                carried=sample.carried,
                tiles=len(tiles),
                grid=grid,
            )
        except (DecodeError, InputReadError) as exc:
            record.add_error(
                sample.image_id, sample.uri, code=str(exc.code), message=exc.message, carried=sample.carried
            )
        except Exception as exc:  # a bug must not take the job down: record it on the row
            logger.exception("Unexpected failure on %s", sample.uri)
            record.add_error(
                sample.image_id,
                sample.uri,
                code=str(ErrorCode.INTERNAL),
                message=f"{type(exc).__name__}: {exc}",
                carried=sample.carried,
            )
        sample.data = None  # the encoded bytes are not needed any more
    if ok_pixels:
        record.pixels = np.concatenate(ok_pixels)
    else:
        spec = preprocessor.spec
        record.pixels = np.zeros((0, 3, spec.crop_height, spec.crop_width), np.uint8)
    return record


def _new_samples(pieces: Iterator[list[Any]], held: IdSet | None) -> Iterator[list[Any]]:
    """``pieces`` less the inputs a table holds already (``--append``); pieces left empty are dropped."""
    for samples in pieces:
        if held is not None and len(held):
            flags = held.contains([s.image_id for s in samples])
            samples = [s for s, present in zip(samples, flags, strict=True) if not present]
        if samples:
            yield samples


def decode_unit(
    batch: dict[str, np.ndarray],
    *,
    config: Config,
    resolved: ResolvedModel,
    read: ReadOptions,
    shard_size: int,
    held: IdSet | None = None,
) -> Iterator[dict[str, Any]]:
    """Expand every unit row of ``batch`` into its output files: one :class:`DecodedShard` row each,
    ``shard_size`` inputs at a time, yielded as they are ready. Never raises for an input.

    With ``decode.nvjpeg`` the encoder decodes on its own device: inputs are only read here. With
    ``held`` (``--append``) the inputs whose id the table holds already are left out. A unit without
    rows gives one empty file (so that the table records it as done).
    """
    from .encoder import preprocess_spec
    from .images.preprocess import Preprocessor
    from .storage import expand_unit

    preprocessor = Preprocessor(preprocess_spec(resolved, config.decode), config.decode)
    options = {
        "preprocessor": preprocessor,
        "device_decode": config.decode.nvjpeg,
        "keep": tuple(read.keep_columns),
    }
    for row in rows_of_batch(batch):
        unit = Unit.from_row(row)
        key = str(row["key"])
        pieces = _new_samples(expand_unit(unit, shard_size, read), held)
        current = next(pieces, None)
        if current is None:  # a unit without (new) rows: one empty file
            yield rows_to_batch([_decode_piece([], unit=unit, key=key, piece=0, **options).to_row()])
            continue
        piece = 0
        while current is not None:
            record = _decode_piece(current, unit=unit, key=key, piece=piece, **options)
            current = next(pieces, None)  # read ahead: is this the unit's last file?
            record.last = current is None
            yield rows_to_batch([record.to_row()])
            piece += 1


def unit_batch(units: Sequence[Unit], keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The numpy batch of plan rows that :func:`decode_unit` receives for ``units`` (with their content
    keys), as the job hands them to Ray Data. For running the job's stages in one process (the
    in-process benchmark, the GPU tests)."""
    keys = keys if keys is not None else ["0" * 64] * len(units)
    return rows_to_batch([{**u.to_row(), "key": k} for u, k in zip(units, keys, strict=True)])


# -- stage 2: encode + commit (actor pool) ----------------------------------------------------


class EncodeShardActor:
    """Ray Data actor: one FeatureEncoder replica; encodes output files' inputs and writes the data files
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
            with self.lock:
                encoded = self.writer.encode(record)
            summaries.append(self.writer.write(record, encoded).to_row())
        return rows_to_batch(summaries)


def shard_target(config: Config, run: TableRun, fingerprint: str) -> ShardTarget:
    """What the encoders need to write this run's data files, whichever pool encodes them."""
    return ShardTarget(
        fingerprint=fingerprint,
        features=config.encoder.features,
        pooled=config.encoder.pooled,
        table=run.target(config.job.compression),
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


# -- the driver -------------------------------------------------------------------------------


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
    from .storage import plan_inputs
    from .table import OUTPUT_COLUMNS

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


def planned_units(plan: InputPlan) -> list[PlannedUnit]:
    """The plan's units as the table sees them: index, content key, input rows."""
    return [PlannedUnit(u.index, key, u.rows) for u, key in zip(plan.units, plan.unit_keys(), strict=True)]


def held_units(plan: InputPlan, committed: set[str]) -> set[str]:
    """The unit keys of ``plan`` (full digests, as :meth:`InputPlan.without` takes them) of the units a
    table holds: ``committed`` is the snapshot's keys, which keep a key's first digits only."""
    return {key for key in plan.unit_keys() if PlannedUnit(0, key).key in committed}


def _run_plan(plan: InputPlan, source: InputPlan | None = None) -> RunPlan:
    return RunPlan(
        plan=plan.fingerprint,
        input=plan.input,
        input_kind=plan.kind,
        units=len(plan.units),
        rows=plan.rows,
        source_plan=source.fingerprint if source is not None else "",
    )


def output_location(config: Config, output_uri: str) -> TableLocation:
    """The table location of ``--output`` (local paths absolute, see :func:`resolve_output`)."""
    return TableLocation(resolve_output(output_uri), s3_endpoint=config.job.s3_endpoint)


def new_table_run(config: Config, plan: InputPlan, output_uri: str, *, resolved: ResolvedModel) -> TableRun:
    """A new table at ``output_uri`` and this process's run of it, for running the job's stages in one
    process (the in-process benchmark, the GPU tests): its actors write to ``shard_target(config, run,
    run.identity.fingerprint)``; :meth:`TableRun.committer` and :meth:`TableRun.finish` commit."""
    from .encoder import describe_encoder
    from .shards import table_identity

    identity = table_identity(
        config, resolved, describe_encoder(config, resolved), carried=dict(plan.carried)
    )
    writer = TableWriter.open(output_location(config, output_uri), identity=identity, mode="create")
    return writer.start(_run_plan(plan))


def run_job(config: Config, input_uri: str, output_uri: str, *, mode: WriteMode = "create") -> JobSummary:
    """Encode every input of ``input_uri`` into the feature table at ``output_uri``.

    ``mode``: ``create`` a new table (an existing one is refused), ``resume`` the table's last plan
    (the same inputs and options: only its missing units are encoded), or ``append`` the inputs the
    table does not hold yet (by ``image_id``) to a complete table of the same encoder and schema.
    """
    from .encoder import describe_encoder
    from .model import resolve_model
    from .shards import table_identity

    job = config.job  # every value was checked (types, ranges) when the config was loaded
    location = output_location(config, output_uri)
    plan = make_plan(config, input_uri)
    release_memory()
    resolved = resolve_model(config.model)
    description = describe_encoder(config, resolved)
    identity = table_identity(config, resolved, description, carried=dict(plan.carried))
    writer = TableWriter.open(location, identity=identity, mode=mode)
    held: IdSet | None = None
    source = None
    if mode == "append" and writer.snapshot is not None:
        held = writer.existing_ids()
        source, plan = plan, plan.without(held.contains, held_units(plan, writer.snapshot.committed_keys()))
        logger.info("%d of the input's units hold inputs the table does not have yet", len(plan.units))
    units = planned_units(plan)
    done = writer.snapshot.committed_keys() if writer.snapshot is not None else set()
    pending = [u for u in units if u.key not in done]
    summary = JobSummary(
        output=location.uri,
        fingerprint=description.fingerprint,
        input=plan.input,
        input_kind=plan.kind,
        mode=mode,
        units_total=len(units),
        units_skipped=len(units) - len(pending),
        max_error_fraction=job.max_error_fraction,
    )
    logger.info(
        "%d unit(s) (%s rows) to %s: %d in the table already, %d to write",
        len(units),
        plan.rows if plan.rows is not None else "unknown",
        location.uri,
        len(units) - len(pending),
        len(pending),
    )
    if mode == "append" and writer.snapshot is not None and not units:
        summary.up_to_date, summary.state = True, "complete"
        summary.version = writer.snapshot.version
        logger.info("The table holds every input of %s already: nothing to append", plan.input)
        return summary
    pool = None
    if pending:
        # Ray first: when it cannot start, nothing has been written to the output.
        _init_ray(job.address)
        if job.serve_app:  # and the shared pool's replicas: their features must be the plan's
            pool = describe_pool(job.serve_app)
            check_pool(job.serve_app, pool, description.fingerprint)
            logger.info(
                "Encoding through Serve application %r (up to %d replicas, %d files in flight each)",
                job.serve_app,
                pool.max_replicas,
                pool.max_offline_shards,
            )
    run = writer.start(_run_plan(plan, source))
    try:
        if pending:
            run.remove_orphans()  # an interrupted run's files: this run writes those units again
            committer = run.committer(
                {u.index: u for u in units}, interval_s=job.commit_interval_s, max_units=job.commit_max_units
            )
            started = time.perf_counter()
            try:
                target = shard_target(config, run, description.fingerprint)
                by_index = {u.index: u for u in plan.units}
                work = [(by_index[u.index], u.key) for u in pending]
                _run_pipeline(config, resolved, work, target, summary, committer, pool=pool, held=held)
            finally:
                committer.close()
            summary.seconds = time.perf_counter() - started
            summary.images_per_s = summary.read / summary.seconds if summary.seconds > 0 else 0.0
            summary.units_written = len(run.committed)
        outcome = run.finish(units, max_error_fraction=job.max_error_fraction)
    finally:
        run.close()
    _count(summary, outcome, run)
    return summary


def _count(summary: JobSummary, outcome: Outcome, run: TableRun) -> None:
    summary.inputs, summary.ok, summary.errors = outcome.rows, outcome.ok, outcome.errors
    summary.files_total = outcome.files
    summary.error_fraction = outcome.error_fraction
    summary.error_budget_exceeded = outcome.budget_exceeded
    summary.state = outcome.state
    summary.version = run.snapshot.version
    summary.up_to_date = outcome.up_to_date
    if outcome.recorded is not None:
        summary.recorded = dict(outcome.recorded.totals)


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


def _run_pipeline(
    config: Config,
    resolved: ResolvedModel,
    pending: list[tuple[Unit, str]],
    target: ShardTarget,
    summary: JobSummary,
    committer: Committer,
    *,
    pool: PoolInfo | None = None,
    held: IdSet | None = None,
) -> None:
    """Decode tasks → the job's own encoder actors, or (``pool``) the Serve application's replicas;
    ``pending``: the units to write, with their content keys."""
    ray = _init_ray(config.job.address)
    job = config.job
    gpus = job.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    if (pool is not None or gpus == 0) and config.model.device == "auto":
        config = replace(config, model=replace(config.model, device="cpu"))  # the decode tasks' view
    ds = ray.data.from_items(
        [{**u.to_row(), "key": key} for u, key in pending], override_num_blocks=len(pending)
    )
    ds = ds.map_batches(
        decode_unit,
        fn_kwargs={
            "config": config,
            "resolved": resolved,
            "read": read_options(config),
            "shard_size": job.shard_size,
            "held": held if held is not None and len(held) else None,
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
            done = ShardSummary.from_row(row)
            new = committer.add(
                unit=done.shard,
                piece=done.piece,
                last=done.last,
                file=done.file,
                rows=done.rows,
                ok=done.ok,
                errors=done.errors,
            )
            if new:  # a retried file reports again; it was replaced, not duplicated
                summary.read += done.rows
                summary.files_written += 1 if done.file is not None else 0


def budget_error(summary: JobSummary, config: Config) -> ErrorBudgetExceededError | None:
    """The typed error for a run above ``max_error_fraction`` (None when within budget)."""
    if not summary.error_budget_exceeded:
        return None
    if summary.up_to_date and summary.recorded is not None and summary.state == "complete":
        return ErrorBudgetExceededError(
            f"{summary.error_fraction:.2%} of the inputs failed, above max_error_fraction "
            f"{config.job.max_error_fraction:.2%}; nothing was written (every unit was committed already), and "
            "the table, completed by the run that allowed "
            f"{float(summary.recorded.get('max_error_fraction', 0)):.2%}, is left as it is"
        )
    return ErrorBudgetExceededError(
        f"{summary.error_fraction:.2%} of the inputs failed, above max_error_fraction "
        f"{config.job.max_error_fraction:.2%}; every row was committed and the table is marked failed (no "
        f"{SUCCESS_FILE}). See the failures with `llava-features inspect {summary.output}`; to accept them, raise "
        "the budget with --max-error-fraction F (job.max_error_fraction) and rerun with --resume, which marks "
        "the table complete without encoding anything again"
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


def dry_run(config: Config, input_uri: str, output_uri: str, *, mode: WriteMode = "create") -> DryRun:
    """Plan the job and describe what it would write, without starting Ray or writing anything.

    The plan is made first, before the model (and torch) is loaded to know the feature shapes: the
    planning's peak memory is its own (``bench plan`` measures it).
    """
    location = output_location(config, output_uri)
    started = time.perf_counter()
    plan = make_plan(config, input_uri)
    plan_seconds = time.perf_counter() - started
    plan_rss = peak_rss_mb()
    release_memory()
    from .encoder import describe_encoder  # torch and transformers from here on
    from .model import resolve_model
    from .shards import table_identity

    resolved = resolve_model(config.model)
    per_row, shapes = feature_bytes(config, resolved)
    identity = table_identity(
        config, resolved, describe_encoder(config, resolved), carried=dict(plan.carried)
    )
    try:
        writer = TableWriter.open(location, identity=identity, mode=mode)
    except LlavaFeaturesError as exc:
        state = f"the job would refuse it: {exc.message}"
    else:
        if writer.snapshot is None:
            state = "empty: a new table"
        else:
            done = writer.snapshot.committed_keys()
            if mode == "append":
                plan = plan.without(writer.existing_ids().contains, held_units(plan, done))
            held = sum(u.key in done for u in planned_units(plan))
            verb = {"resume": "--resume continues it", "append": "--append adds the rest"}.get(mode, "")
            state = f"a table (version {writer.snapshot.version}); {held} of {len(plan.units)} unit(s) of this plan in it: {verb}"
    return DryRun(plan, location.uri, plan_seconds, per_row, shapes, state, plan_rss, config.job.serve_app)


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
