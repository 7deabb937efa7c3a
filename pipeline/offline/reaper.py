"""Stops what is left of a local Ray once the job's driver is gone: ``python -m pipeline.offline.reaper PID...``.

Started by the driver (:class:`pipeline.offline.ray_runtime.RaySession`) with the pids of the local
Ray's head processes (GCS, raylet, dashboard, monitors) and a pipe on stdin that only the driver holds.
While the pipe is open it notes, every few seconds, those processes and their descendants (the raylet's
agents and workers), each with its start time. When the pipe closes — the driver stopped Ray and closed
it, or the driver died in any way, SIGKILL included — it sends SIGTERM to the noted processes that still
run, and SIGKILL to those still there a few seconds later (Ray's dashboard and runtime-env agents ignore
SIGTERM for longer). A pid reused by another process is never touched (its start time differs).
Pure standard library: it runs beside a driver that may be gone.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from pathlib import Path

POLL_S = 2.0
"""How often the processes are noted while the driver runs."""
GRACE_S = 3.0
"""How long processes get to stop after SIGTERM, before SIGKILL."""


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time, state) of ``pid``, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[1]), int(rest[19]), rest[0]


def note(roots: list[int], noted: dict[int, int]) -> None:
    """Add ``roots`` and their descendants that run now to ``noted`` (``{pid: start time}``)."""
    table: dict[int, tuple[int, int, str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            table[int(entry.name)] = st
    found = {pid for pid in roots if pid in table} | {pid for pid in noted if pid in table}
    grew = True
    while grew:
        more = {pid for pid, st in table.items() if st[0] in found and pid not in found}
        found |= more
        grew = bool(more)
    for pid in found:
        if table[pid][2] != "Z":
            noted.setdefault(pid, table[pid][1])


def alive(noted: dict[int, int]) -> dict[int, int]:
    """The noted processes that still run (same pid and start time, not a zombie)."""
    out = {}
    for pid, started in noted.items():
        st = _stat(pid)
        if st is not None and st[1] == started and st[2] != "Z":
            out[pid] = started
    return out


def stop(noted: dict[int, int]) -> None:
    """SIGTERM to the noted processes that run, then SIGKILL to those still there after :data:`GRACE_S`."""
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 1.0)):
        left = alive(noted)
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while alive(left) and time.monotonic() < deadline:
            time.sleep(0.1)


def main(argv: list[str]) -> int:
    roots = [int(a) for a in argv]
    noted: dict[int, int] = {}
    stdin = sys.stdin.fileno()
    while True:
        note(roots, noted)
        ready, _, _ = select.select([stdin], [], [], POLL_S)
        if ready and not os.read(stdin, 4096):  # EOF: the driver closed the pipe, or is gone
            break
    stop(noted)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
