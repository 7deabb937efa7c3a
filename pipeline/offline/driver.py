"""The job's driver: open the table, check the cluster, wire the stages, follow the run, finish.

:func:`run_job` plans (:mod:`~.plan`), opens the output (:class:`pipeline.table.TableWriter` refuses
what would corrupt it), reaches Ray once (:mod:`~.ray_runtime`), checks that the cluster can hold
the job (:mod:`~.resources`), claims the table, and streams the pending units through Ray Data:
decode tasks (:mod:`~.decode`) → the job's encoder actors (:mod:`~.actors`) or a Serve application's
replicas (:mod:`~.pool`). Its loop (:mod:`~.results`) sees each written file's summary before the
table's :class:`~pipeline.table.Committer` does: the progress (:mod:`~.progress`, :mod:`~.metrics`)
and the watchdog (:mod:`~.watchdog`) are fed there, once a second.

A run that stops before its table is complete — stalled, a storage fault, the shared pool gone,
SIGINT or SIGTERM — commits what is ready, and raises a typed
:class:`~pipeline.model.errors.JobStoppedError` (:mod:`~.faults`) with the run's summary: what it
committed is kept, and ``--resume`` continues.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..memory import release_free_memory
from ..model.errors import ErrorCode, JobStoppedError, LlavaFeaturesError
from ..records import PoolInfo, ShardTarget
from ..storage import InputPlan, Unit
from ..table import IdSet, Outcome, TableRun, TableWriter
from .actors import EncodeShardActor, shard_target
from .decode import decode_task_memory, decode_unit, read_options
from .faults import stopped_error
from .metrics import JobMetrics
from .plan import held_units, make_plan, output_location, planned_units, run_plan
from .pool import SEND_TASK_CPUS, SEND_TASK_ENV, check_pool, describe_pool, send_shards
from .progress import ProgressTracker
from .ray_runtime import RaySession, ray_session, worker_runtime_env
from .ray_warnings import spend_actor_restart_warning
from .resources import Demand, actor_cpus, preflight, read_nodes
from .results import follow
from .summary import JobSummary, Progress, WriteMode
from .watchdog import Watchdog, diagnose

if TYPE_CHECKING:
    from ..model import ResolvedModel

logger = logging.getLogger(__name__)

__all__ = ["new_table_run", "run_job"]

DECODE_CPUS = 1.0
"""CPUs a decode task reserves."""

ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class _Workers:
    """What the pipeline's workers reserve on this cluster."""

    decode: Demand
    actor: Demand | None
    """An encoder actor (None: the Serve application's replicas encode)."""


def run_job(
    config: Config,
    input_uri: str,
    output_uri: str,
    *,
    mode: WriteMode = "create",
    progress: ProgressCallback | None = None,
) -> JobSummary:
    """Encode every input of ``input_uri`` into the feature table at ``output_uri``.

    ``mode``: ``create`` a new table (an existing one is refused), ``resume`` the table's last plan
    (the same inputs and options: only its missing units are encoded), or ``append`` the inputs the
    table does not hold yet (by ``image_id``) to a complete table of the same encoder and schema.
    ``progress`` is called with a :class:`~pipeline.offline.summary.Progress` about once a second while
    the pipeline runs, and once at its end. Raises :class:`~pipeline.model.errors.JobStoppedError` (with
    the run's summary) when the run stops before the table is complete.
    """
    from ..encoder import describe_encoder
    from ..model import resolve_model
    from ..shards import table_identity

    job = config.job  # every value was checked (types, ranges) when the config was loaded
    location = output_location(config, output_uri)
    plan = make_plan(config, input_uri)
    release_free_memory()  # the heap planning freed, before the model and torch are loaded
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
    if not pending:  # every unit is committed: the run only finishes the table (no Ray)
        run = writer.start(run_plan(plan, source))
        try:
            outcome = run.finish(units, max_error_fraction=job.max_error_fraction)
        finally:
            run.close()
        _count(summary, outcome, run)
        return summary
    by_index = {u.index: u for u in plan.units}
    work = [(by_index[u.index], u.key) for u in pending]
    # Ray first, then the shared pool and the cluster's room: when any of them fails, nothing has
    # been written to the output.
    with ray_session(job.address) as session:
        pool = None
        if job.serve_app:  # the shared pool's replicas: their features must be the plan's
            pool = describe_pool(job.serve_app)
            check_pool(job.serve_app, pool, description.fingerprint)
            logger.info(
                "Encoding through Serve application %r (up to %d replicas, %d files in flight each)",
                job.serve_app,
                pool.max_replicas,
                pool.max_offline_shards,
            )
        config, workers = _reserve(session, config, resolved, pool)
        run = writer.start(run_plan(plan, source))
        try:
            run.remove_orphans()  # an interrupted run's files: this run writes those units again
            _pipeline(
                session,
                config=config,
                resolved=resolved,
                run=run,
                plan=plan,
                work=work,
                workers=workers,
                target=shard_target(config, run, description.fingerprint),
                summary=summary,
                pool=pool,
                held=held,
                progress=progress,
            )
            outcome = run.finish(units, max_error_fraction=job.max_error_fraction)
        finally:
            run.close()
    _count(summary, outcome, run)
    return summary


def _reserve(
    session: RaySession, config: Config, resolved: ResolvedModel, pool: PoolInfo | None
) -> tuple[Config, _Workers]:
    """The workers' reservations on this cluster (the decode reserve), checked by the preflight; the
    config as the workers see it (the actors' CPU share, the device of CPU actors)."""
    ray, job = session.ray, config.job
    decode = Demand(cpus=DECODE_CPUS, memory=float(decode_task_memory(config, resolved)))
    nodes = read_nodes(ray)
    actor = None
    if pool is None:
        gpus = job.num_gpus_per_actor
        if gpus is None:
            gpus = 1.0 if sum(n.total.get("GPU", 0.0) for n in nodes) >= 1 else 0.0
        cpus = actor_cpus(
            nodes, requested=job.num_cpus_per_actor, actors_max=job.actors[1], gpus=gpus, decode=decode
        )
        if cpus < job.num_cpus_per_actor:
            logger.info(
                "Encoder actors reserve %.2g CPU each (job.num_cpus_per_actor %g): on the smallest node, as many "
                "actors as fit there still leave a decode task its CPU, also after a node loss",
                cpus,
                job.num_cpus_per_actor,
            )
        actor = Demand(cpus=cpus, gpus=gpus)
        config = replace(config, job=replace(job, num_cpus_per_actor=cpus, num_gpus_per_actor=gpus))
    if (pool is not None or actor is None or actor.gpus == 0) and config.model.device == "auto":
        config = replace(config, model=replace(config.model, device="cpu"))  # the decode tasks' view
    preflight(
        lambda: read_nodes(ray),
        actor=actor,
        actors=job.actors,
        decode=decode,
        shard_size=job.shard_size,
        wait_s=job.resource_wait_s,
    )
    return config, _Workers(decode=decode, actor=actor)


def _pipeline(
    session: RaySession,
    *,
    config: Config,
    resolved: ResolvedModel,
    run: TableRun,
    plan: InputPlan,
    work: list[tuple[Unit, str]],
    workers: _Workers,
    target: ShardTarget,
    summary: JobSummary,
    pool: PoolInfo | None,
    held: IdSet | None,
    progress: ProgressCallback | None,
) -> None:
    """Run the stages over ``work`` (the pending units with their content keys), committing as files
    arrive; a run that stops raises JobStoppedError with ``summary`` (see the module docstring)."""
    job = config.job
    ray = session.ray
    rows = [u.rows for u, _ in work]
    known = all(r is not None for r in rows) and held is None  # an append drops held rows as it reads
    tracker = ProgressTracker(
        images_planned=sum(rows) if known else None,  # type: ignore[arg-type]
        units_planned=len(work),
        metrics=JobMetrics(run.job),
    )

    def diagnosis() -> str:
        return diagnose(ray, actor=workers.actor, decode=workers.decode)

    watchdog = Watchdog(warn_s=job.stall_warn_s, fail_s=job.stall_fail_s, diagnose=diagnosis)
    ds = _dataset(
        ray, config=config, resolved=resolved, work=work, workers=workers, target=target, pool=pool, held=held
    )
    committer = run.committer(
        {u.index: u for u in planned_units(plan)},
        interval_s=job.commit_interval_s,
        max_units=job.commit_max_units,
    )
    started = time.perf_counter()
    stopped: JobStoppedError | None = None
    try:
        try:
            for done in follow(ds, tracker=tracker, run=run, watchdog=watchdog, progress=progress):
                if done.fault_code:  # a file its worker could not write: stop (what is ready is committed)
                    raise LlavaFeaturesError(done.fault, code=ErrorCode(done.fault_code))
                if done.commit_to(committer):  # a retried file reports again: counted once
                    tracker.file(done)
                    summary.read += done.rows
                    summary.files_written += 1 if done.file is not None else 0
                    summary.bytes_written += done.file.size if done.file is not None else 0
        finally:
            committer.close()  # what is ready is committed, whatever stopped the loop
    except BaseException as exc:
        stopped = stopped_error(exc, run=run, stall_s=job.stall_fail_s, diagnose=diagnosis)
        if stopped is None:
            raise
    finally:
        summary.seconds = time.perf_counter() - started
        summary.images_per_s = summary.read / summary.seconds if summary.seconds > 0 else 0.0
        summary.units_written = len(run.committed)
        tracker.committed(len(run.committed))
        if progress is not None:
            progress(tracker.snapshot(done=True))
    if stopped is not None:  # this run's counts: the table's are for a run that finishes
        summary.state, summary.version = "interrupted", run.snapshot.version
        summary.ok, summary.errors = tracker.ok, dict(tracker.errors)
        stopped.summary = summary
        raise stopped


def _dataset(
    ray: Any,
    *,
    config: Config,
    resolved: ResolvedModel,
    work: list[tuple[Unit, str]],
    workers: _Workers,
    target: ShardTarget,
    pool: PoolInfo | None,
    held: IdSet | None,
) -> Any:
    """The Ray Dataset of the pipeline: units → decode tasks → encoder actors (or send tasks)."""
    job = config.job
    ds = ray.data.from_items([{**u.to_row(), "key": key} for u, key in work], override_num_blocks=len(work))
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
        num_cpus=workers.decode.cpus,
        # What a decode task holds: one output file's encoded bytes and uint8 pixels. Reserving
        # it also keeps the decode tasks a separate pool (Ray Data fuses stages with equal resource
        # requests, which would move decoding into the encoder actors on CPU-only clusters).
        memory=workers.decode.memory,
        runtime_env=worker_runtime_env(),
        batch_format="numpy",
    )
    if pool is not None:
        from ray.data import TaskPoolStrategy

        # Tasks that hand each decoded file to the application's replicas and wait for its summary:
        # at most max_offline_shards x max_replicas files in flight (backpressure on the decode stage).
        ds = ds.map_batches(
            send_shards,
            fn_kwargs={"app": job.serve_app, "target": target},
            batch_size=1,
            batch_format="numpy",
            num_cpus=SEND_TASK_CPUS,
            # (never more tasks than units: Ray Data warns about a limit it cannot reach)
            compute=TaskPoolStrategy(
                size=max(1, min(pool.max_offline_shards * pool.max_replicas, len(work)))
            ),
            runtime_env=worker_runtime_env(SEND_TASK_ENV),
        )
    else:
        assert workers.actor is not None
        # Ray Data's actor pools always trigger one harmless ERROR line of Ray's (the pool's own
        # arguments are object refs; see pipeline/offline/ray_warnings.py): spend it here, out of sight.
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
            num_gpus=workers.actor.gpus,
            num_cpus=workers.actor.cpus,
            runtime_env=worker_runtime_env(),
        )
    context = ds.context
    context.enable_progress_bars = False  # the job's own progress instead (its callback)
    if hasattr(context, "execution_no_progress_timeout_s"):  # Ray Data's guard stops with the watchdog
        context.execution_no_progress_timeout_s = job.stall_fail_s
    return ds


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


def new_table_run(config: Config, plan: InputPlan, output_uri: str, *, resolved: ResolvedModel) -> TableRun:
    """A new table at ``output_uri`` and this process's run of it, for running the job's stages in one
    process (the in-process benchmark, the GPU tests): its actors write to ``shard_target(config, run,
    run.identity.fingerprint)``; :meth:`TableRun.committer` and :meth:`TableRun.finish` commit."""
    from ..encoder import describe_encoder
    from ..shards import table_identity

    identity = table_identity(
        config, resolved, describe_encoder(config, resolved), carried=dict(plan.carried)
    )
    writer = TableWriter.open(output_location(config, output_uri), identity=identity, mode="create")
    return writer.start(run_plan(plan))
