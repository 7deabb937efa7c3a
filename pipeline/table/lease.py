"""Run leases: which runs are writing a table right now.

A run (one driver process writing a table) keeps a lease file, ``_llava_features/runs/<run>.json``
(host, pid, start, last heartbeat), rewritten every :data:`HEARTBEAT_S` seconds by a thread. A run is
live while its lease is fresh (a heartbeat within :data:`LEASE_TIMEOUT_S`; on the same host, while
its process exists) and not ended. The lease tells

- ``inspect`` and a second job whether the table is being written now (``in_progress``) or was left
  by a run that died (``interrupted``), and which unreferenced files are a live run's files in flight;
- a run which files it may delete: files no commit references, written by itself or by runs that are
  no longer live (a live run's files are never touched).

A run commits only while it holds its lease: one that could not renew it for longer than half the
timeout stops (:meth:`LeaseKeeper.check`), so a run another one took for dead never commits files
that may have been removed meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass

import pyarrow.fs as pafs

from ..model.errors import OutputError
from ..storage import write_json
from .layout import RUNS_DIR, lease_path
from .location import TableLocation

logger = logging.getLogger(__name__)

__all__ = ["HEARTBEAT_S", "LEASE_TIMEOUT_S", "Lease", "LeaseKeeper", "read_leases"]

HEARTBEAT_S = 5.0
"""How often a running job renews its lease."""
LEASE_TIMEOUT_S = 60.0
"""A lease not renewed for this long belongs to a run that is gone (its driver died or lost the store).
Clocks of the hosts writing one table must agree to well within this."""


@dataclass(frozen=True)
class Lease:
    """A run's lease."""

    run: str
    job: str
    host: str
    pid: int
    started: float
    """When the run started (seconds since the epoch)."""
    heartbeat: float
    """When it last renewed the lease."""
    ended: bool = False
    """Set when the run stopped cleanly (the file is then removed; an ended lease may be left by a failed removal)."""

    def age(self, now: float | None = None) -> float:
        """Seconds since the last heartbeat."""
        return (time.time() if now is None else now) - self.heartbeat

    def is_live(self, now: float | None = None) -> bool:
        """Whether the run is still writing (see the module docstring)."""
        if self.ended or self.age(now) > LEASE_TIMEOUT_S:
            return False
        # On this host a run whose process is gone is over at once (no need to wait out the timeout).
        return self.host != socket.gethostname() or _process_exists(self.pid)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def read_leases(location: TableLocation) -> list[Lease]:
    """The leases of every run that left one (live or not)."""
    fs = location.filesystem
    selector = pafs.FileSelector(location.join(RUNS_DIR), allow_not_found=True)
    out = []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File or not info.base_name.endswith(".json"):
            continue
        try:
            with fs.open_input_stream(info.path) as f:
                value = json.loads(f.read().decode())
            out.append(Lease(**value))
        except (OSError, ValueError, TypeError) as exc:  # being rewritten, or not ours
            logger.debug("unreadable lease %s: %s", info.path, exc)
    return out


def live_runs(location: TableLocation, now: float | None = None) -> dict[str, Lease]:
    """``{run: lease}`` of the runs writing the table now."""
    return {lease.run: lease for lease in read_leases(location) if lease.is_live(now)}


class LeaseKeeper:
    """Holds a run's lease: writes it now, renews it on a thread, removes it when the run ends."""

    def __init__(self, location: TableLocation, *, run: str, job: str) -> None:
        self.location = location
        now = time.time()
        self.lease = Lease(
            run=run, job=job, host=socket.gethostname(), pid=os.getpid(), started=now, heartbeat=now
        )
        self._renewed = time.monotonic()
        self._stop = threading.Event()
        self._write()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{run}", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        self.lease = Lease(**{**asdict(self.lease), "heartbeat": time.time()})
        write_json(
            self.location.filesystem, self.location.join(lease_path(self.lease.run)), asdict(self.lease)
        )
        self._renewed = time.monotonic()

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except OSError as exc:  # a slow or failing store: check() stops the run if it lasts
                logger.warning("could not renew the lease of run %s: %s", self.lease.run, exc)

    def check(self) -> None:
        """OutputError when the lease has not been renewed for half its timeout (see the module docstring)."""
        stale = time.monotonic() - self._renewed
        if stale > LEASE_TIMEOUT_S / 2:
            raise OutputError(
                f"Run {self.lease.run} could not renew its lease on {self.location.uri} for {stale:.0f} s: another "
                "run may have taken it for dead, so it commits nothing more (--resume continues the job)"
            )

    def release(self) -> None:
        """Stop renewing and remove the lease (the run ended)."""
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_S + 5)
        with contextlib.suppress(OSError):
            self.location.filesystem.delete_file(self.location.join(lease_path(self.lease.run)))
