"""Stage 2 on the shared pool: the encoder replicas of a running Serve application (``--serve-app``).

The job asks the application what its replicas are (:func:`describe_pool`: their fingerprint and
offline settings) and refuses another fingerprint before anything is written (:func:`check_pool`).
Tasks of :func:`send_shards` then hand each decoded file to a replica through a deployment handle of
the ``pipeline.constants.SERVE_ENCODER_DEPLOYMENT`` deployment (its ``describe_pool`` and
``encode_shard`` methods, ``SERVE_DESCRIBE_METHOD`` / ``SERVE_SHARD_METHOD``), at most
``serve.max_offline_shards`` × ``serve.max_replicas`` at once, and send a file again when its replica
died. The replica writes it with the same :class:`pipeline.shards.ShardWriter` as the job's own actors
and returns the same summary; the commits are the driver's.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ..constants import SERVE_DESCRIBE_METHOD, SERVE_ENCODER_DEPLOYMENT
from ..model.errors import ConfigError, ErrorCode, LlavaFeaturesError
from ..records import DecodedShard, PoolInfo, ShardSummary, ShardTarget, rows_of_batch, rows_to_batch

logger = logging.getLogger(__name__)

__all__ = [
    "SEND_TASK_CPUS",
    "SEND_TASK_ENV",
    "SHARD_ATTEMPTS",
    "check_pool",
    "describe_pool",
    "send_shard",
    "send_shards",
]

SEND_TASK_CPUS = 0.0
"""CPUs a task handing files to the Serve replicas reserves: none, it only waits for their answers
(reserving some would take them from the decode tasks while the replicas hold theirs; the tasks in
flight are bounded by their concurrency instead)."""
SEND_TASK_ENV = {
    "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "1.0",
    "RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "5.0",
}
"""Environment of the send tasks: how long their handle waits for a replica's queue length before it
picks one without it (Serve: 0.1 s, up to 1 s, with a warning each time it gives up). A replica busy
with an offline file answers later than that, and is working as meant; the job's files take seconds,
so a longer wait costs nothing."""
SHARD_ATTEMPTS = 4
"""Tries of a file whose replica died (or was not reachable) before the job stops."""
APP_CHECK_S = 10.0
"""While a file waits for its replica's answer, how often the send task checks that the application
is still deployed."""
_SHARD_RETRY_S = 2.0
_DESCRIBE_TIMEOUT_S = 120.0


def _pool_handle(app: str) -> Any:
    from ray import serve

    return serve.get_deployment_handle(SERVE_ENCODER_DEPLOYMENT, app_name=app)


def describe_pool(app: str) -> PoolInfo:
    """What the encoder replicas of Serve application ``app`` are (their fingerprint, the offline
    settings); a typed ``unavailable`` error when no such application answers on this Ray cluster."""
    try:
        info = _pool_handle(app).describe_pool.remote().result(timeout_s=_DESCRIBE_TIMEOUT_S)
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


def _gone(app: str) -> bool:
    """Whether Serve no longer runs application ``app`` (deleted, or being deleted); False when it
    cannot tell (the job's watchdog has the last word then)."""
    from ray import serve

    try:
        apps = serve.status().applications
    except Exception as exc:
        logger.debug("could not ask Serve for its applications: %s", exc)
        return False
    return app not in apps or str(apps[app].status) == "DELETING"


def _gone_error(app: str, why: str) -> LlavaFeaturesError:
    return LlavaFeaturesError(
        f"Serve application {app!r} stopped answering: {why}", code=ErrorCode.UNAVAILABLE
    )


def _answer(handle: Any, target: ShardTarget, record: DecodedShard, app: str) -> ShardSummary:
    """The replica's answer for one file; a summary that says ``unavailable`` when the application is
    deleted while it waits (Serve would hold the request for a replica that never comes)."""
    response = handle.encode_shard.remote(target, record)
    while True:
        try:
            return response.result(timeout_s=APP_CHECK_S)  # type: ignore[no-any-return]
        except TimeoutError:  # a file may take long: wait on while the application is there
            if _gone(app):
                response.cancel()
                return ShardSummary.failed(
                    record,
                    _gone_error(app, f"it was deleted while file {record.shard}/{record.piece} waited"),
                )


def send_shard(handle: Any, target: ShardTarget, record: DecodedShard, *, app: str = "") -> ShardSummary:
    """One file through the replicas: encoded and written there, its summary back. A file whose replica
    died is sent again (it is rewritten under the same name before any commit references it), up to
    :data:`SHARD_ATTEMPTS` tries; then its summary says ``unavailable`` (the application is gone), as it
    says ``output_write_failed`` for a file the replica could not write: the driver stops the job."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    for attempt in range(1, SHARD_ATTEMPTS + 1):
        try:
            return _answer(handle, target, record, app)
        except LlavaFeaturesError as exc:  # the replica could not write the file (disk full, read-only)
            if exc.code != ErrorCode.OUTPUT_WRITE_FAILED:
                raise
            return ShardSummary.failed(record, exc)
        except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as exc:
            if attempt == SHARD_ATTEMPTS:  # the application is gone: the driver stops the job
                why = f"file {record.shard}/{record.piece} found no replica in {SHARD_ATTEMPTS} tries"
                return ShardSummary.failed(record, _gone_error(app, f"{why} ({type(exc).__name__})"))
            logger.info(
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
    """Ray Data task: the decoded files of ``batch`` through Serve application ``app`` → their summaries
    (an application deleted meanwhile: summaries that say ``unavailable``)."""
    records = [DecodedShard.from_row(row) for row in rows_of_batch(batch)]
    try:
        handle = _pool_handle(app)
    except Exception as exc:  # Serve no longer knows the application: it was deleted
        gone = _gone_error(app, f"it is no longer deployed ({type(exc).__name__})")
        return rows_to_batch([ShardSummary.failed(record, gone).to_row() for record in records])
    return rows_to_batch([send_shard(handle, target, record, app=app).to_row() for record in records])
