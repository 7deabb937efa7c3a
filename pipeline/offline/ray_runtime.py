"""Starting, reaching and stopping Ray for the job.

The job runs on the cluster named by ``job.address`` (``--address``) or ``RAY_ADDRESS``, else on a
new local Ray it starts itself — never one it happens to find on the host. An address where nothing
answers is a typed ``unavailable`` error within seconds (``ray.init`` would wait minutes), before
anything is written.

A local Ray the job started is the job's: :func:`ray_session` stops it completely when the job ends,
whatever the end (done, an error, SIGINT or SIGTERM: both unwind the job as ``KeyboardInterrupt``,
so that what is ready is committed first): ``ray.shutdown()``, then what is left of its processes (Ray's
dashboard and runtime-env agents outlive it otherwise, and ignore SIGTERM for seconds). A driver that
is killed outright (SIGKILL) cannot clean up: a small reaper process (:mod:`pipeline.offline.reaper`)
waits for its end and stops them then.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

from ..model.errors import ErrorCode, LlavaFeaturesError

logger = logging.getLogger(__name__)

__all__ = ["FORWARDED_ENV", "RaySession", "quiet_logger", "ray_session", "worker_runtime_env"]

_RAY_PROBE_TIMEOUT_S = 5.0
_REAPER_WAIT_S = 30.0
TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
"""Ray's logger of the notice "Token authentication is enabled for this Ray cluster" (a WARNING at
every ``ray.init`` of a local Ray). On a local Ray the job starts for itself the token is Ray's own
default and nothing to act on: the job lowers that logger to ERROR while it starts one."""

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


def worker_runtime_env(extra: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The runtime environment of the job's tasks and actors: :data:`FORWARDED_ENV` as set here, and
    ``extra`` variables."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env.update(extra or {})
    return {"env_vars": env} if env else None


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


@contextlib.contextmanager
def quiet_logger(logger_name: str) -> Iterator[None]:
    """Only errors of logger ``logger_name`` while in the block (a notice of Ray's that means nothing here)."""
    named = logging.getLogger(logger_name)
    level = named.level
    named.setLevel(logging.ERROR)
    try:
        yield
    finally:
        named.setLevel(level)


class RaySession:
    """Ray as the job uses it: the module, and whether the job started it (then it stops it)."""

    def __init__(self, ray: Any, *, started: bool) -> None:
        self.ray = ray
        self.started = started
        """Whether this job started a local Ray (and stops it at the end)."""
        self._head_pids: list[int] = []
        self._reaper: subprocess.Popen[bytes] | None = None

    @property
    def gcs_address(self) -> str:
        return str(self.ray.get_runtime_context().gcs_address)

    def _watch(self) -> None:
        """Start the reaper of this local Ray's processes (see the module docstring)."""
        try:
            node = self.ray._private.worker._global_node  # the head's processes (private API)
            self._head_pids = [info.process.pid for infos in node.all_processes.values() for info in infos]
        except Exception as exc:  # Ray's internals moved: the end of the job still stops Ray itself
            logger.debug("no reaper for the local Ray (%s)", exc)
            return
        if not self._head_pids:
            return
        self._reaper = subprocess.Popen(
            [sys.executable, "-m", "pipeline.offline.reaper", *map(str, self._head_pids)],
            stdin=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C of the terminal is the driver's, not the reaper's
        )

    def stop(self) -> None:
        """Stop a local Ray this job started, and every process of it (nothing when it did not start one)."""
        if not self.started:
            return
        self.started = False
        self.ray.shutdown()
        reaper, self._reaper = self._reaper, None
        if reaper is None:
            return
        if reaper.stdin is not None:
            reaper.stdin.close()  # the reaper's cue: stop what is left
        try:
            reaper.wait(timeout=_REAPER_WAIT_S)
        except subprocess.TimeoutExpired:
            logger.warning("the local Ray's processes did not stop in %.0f s", _REAPER_WAIT_S)


def _init(address: str | None) -> RaySession:
    import ray

    if ray.is_initialized():
        return RaySession(ray, started=False)
    target = _ray_target(address)
    if target is not None:
        _probe_ray(target, "--address / job.address" if address else "RAY_ADDRESS")
    try:
        with quiet_logger(TOKEN_NOTICE_LOGGER) if target is None else contextlib.nullcontext():
            ray.init(address=target or "local", logging_level=logging.WARNING)
    except Exception as exc:
        where = f"the Ray cluster at {target}" if target else "a local Ray"
        raise LlavaFeaturesError(
            f"Could not start {where}: {type(exc).__name__}: {exc}. Nothing was written.",
            code=ErrorCode.UNAVAILABLE,
        ) from exc
    session = RaySession(ray, started=target is None)
    if session.started:
        session._watch()
    return session


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[RaySession]:
    """Ray for this job: the one already initialised in this process, else the cluster at ``address``
    (``job.address``) or ``RAY_ADDRESS``, else a new local Ray (see the module docstring). Raises a
    typed error (code ``unavailable``) when Ray cannot be started or reached.

    While the job runs (in the main thread), SIGTERM unwinds it like SIGINT (``KeyboardInterrupt``):
    ``ray.init`` installs a handler that exits at once instead."""
    session = _init(address)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        yield session
    finally:
        try:
            session.stop()
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
