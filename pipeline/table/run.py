"""Writing a table: one run's protocol, on the driver (tasks write the data files, the driver commits).

A run is one process writing a table: the job that creates it, a ``--resume`` of an interrupted one,
an ``--append`` of new inputs. :meth:`TableWriter.open` looks at the output and refuses, before
anything is written, what would corrupt it: another job's table (naming it, with its state), options
that change the schema or the values, another input plan. :meth:`TableWriter.start` claims a new table
(its first commit creates it: of two jobs started together exactly one proceeds) or registers the run
in an existing one, and takes the run's lease (:mod:`pipeline.table.lease`).

Data files come back from the tasks as :class:`~pipeline.table.files.DataFile` records;
:class:`Committer` collects them by unit and commits complete units in batches (by count or time),
each unit with its application transaction, so that every unit becomes visible in one commit and
two runs can never both commit it. :meth:`TableRun.finish` checks that every unit of the plan is
in the snapshot with all its rows, records the segment's counts and the error-budget decision, writes
``_SUCCESS`` when complete, and removes the files no commit references that this run, or a run that is
no longer live, wrote (never a live run's files in flight, never a file it cannot attribute).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import pyarrow.fs as pafs

from ..model.errors import ErrorCode, OutputError, one_line
from ..storage import write_json
from .files import DataFile, write_data_file
from .layout import (
    DELTA_LOG_DIR,
    KEY_HEX,
    LEGACY_MARKERS,
    META_DIR,
    RUN_HEX,
    SUCCESS_FILE,
    DataFileName,
    temp_target,
)
from .lease import Lease, LeaseKeeper, live_runs
from .location import TableLocation
from .log import (
    CommitRecord,
    Segment,
    Snapshot,
    TableState,
    commit_conflict_types,
    commit_files,
    create_table,
    load_snapshot,
    refresh,
    table_exists,
)
from .schema import TableIdentity, TableSpec

logger = logging.getLogger(__name__)

__all__ = [
    "Committer",
    "Outcome",
    "PlannedUnit",
    "RunPlan",
    "TableRun",
    "TableWriter",
    "WriteTarget",
    "table_state",
]

Mode = Literal["create", "resume", "append"]
"""``create``: a new table (refused when one is there); ``resume``: continue the table's last plan;
``append``: add a new segment to a complete table."""

_HEX_KEY = re.compile(rf"^[0-9a-fA-F]{{{KEY_HEX},}}$")

COMMIT_ATTEMPTS = 8
"""Tries of one batch of units when concurrent commits of other runs win the race."""
_RETRY_S = 0.5


@dataclass(frozen=True)
class RunPlan:
    """The plan a run writes (its segment), as the table records it."""

    plan: str
    """Fingerprint of the plan (units, their sources, sizes and order)."""
    input: str = ""
    input_kind: str = ""
    units: int = 0
    rows: int | None = None
    source_plan: str = ""
    """``--append``: the fingerprint of the whole input's plan, before leaving out what the table holds."""


@dataclass(frozen=True)
class PlannedUnit:
    """A unit of the plan as the table sees it: its index, its content key and its input rows."""

    index: int
    key: str
    """The unit's content key: a hex digest of what it reads (its first :data:`KEY_HEX` digits are kept)."""
    rows: int | None = None
    """Input rows (None when only reading tells: a tar)."""

    def __post_init__(self) -> None:
        if not _HEX_KEY.match(self.key):
            raise ValueError(f"a unit key is a hex digest of at least {KEY_HEX} digits, got {self.key!r}")
        object.__setattr__(self, "key", self.key[:KEY_HEX].lower())


@dataclass(frozen=True)
class WriteTarget:
    """What a task needs to write a run's data files (plain values: it crosses the Ray hop)."""

    location: TableLocation
    spec: TableSpec
    segment: int
    run: str
    compression: str = "none"

    def file_name(self, *, unit: int, piece: int, key: str) -> str:
        return DataFileName(self.segment, unit, piece, key, self.run).name()

    def write(self, table: Any, *, unit: int, piece: int, key: str) -> DataFile:
        """Write one data file of unit ``unit`` (a table of :attr:`spec`'s schema) under its final name."""
        if not table.schema.equals(self.spec.arrow_schema(), check_metadata=True):
            raise ValueError("a data file's schema must be the table's")
        name = self.file_name(unit=unit, piece=piece, key=key)
        try:
            return write_data_file(
                table,
                filesystem=self.location.filesystem,
                folder=self.location.path,
                name=name,
                compression=self.compression,
            )
        except OSError as exc:  # disk full, read-only, a store refusing the write: typed, one line
            raise OutputError(
                f"Cannot write the data file {name} of {self.location.uri} ({one_line(exc)})",
                code=ErrorCode.OUTPUT_WRITE_FAILED,
            ) from exc


@dataclass
class Outcome:
    """What :meth:`TableRun.finish` found and recorded for the run's segment."""

    state: TableState
    rows: int
    ok: int
    errors: dict[str, int]
    error_fraction: float
    max_error_fraction: float
    budget_exceeded: bool
    files: int
    """Data files of the segment."""
    up_to_date: bool = False
    """Nothing was committed by this run: the segment's end was recorded already (and is left as it is)."""
    recorded: CommitRecord | None = None
    """With ``up_to_date``: the record of the run that finished the segment."""
    removed: list[str] = field(default_factory=list)
    """Unreferenced files removed."""


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _describe_lease(lease: Lease) -> str:
    started = datetime.fromtimestamp(lease.started, UTC).isoformat(timespec="seconds")
    return f"run {lease.run} on {lease.host} (pid {lease.pid}, started {started}, last heartbeat {lease.age():.0f} s ago)"


def table_state(latest: CommitRecord | None, live: Mapping[str, Lease]) -> TableState:
    """The state of a table from its newest record and the runs writing it now."""
    if live:
        return "in_progress"
    if latest is not None and latest.op == "finish":
        return latest.state if latest.state != "in_progress" else "interrupted"
    return "interrupted"


def _diff(recorded: Any, current: Any, prefix: str = "") -> list[str]:
    """``key: recorded → current`` for every leaf where two JSON-like values differ."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(recorded) | set(current)):
            out += _diff(recorded.get(key), current.get(key), f"{prefix}{key}.")
        return out
    if recorded != current:
        return [
            f"{prefix.rstrip('.')}: {json.dumps(recorded, default=str)} → {json.dumps(current, default=str)}"
        ]
    return []


def check_compatible(table: TableIdentity, mine: TableIdentity, uri: str) -> None:
    """OutputError naming every option whose value differs between a table and this run, when the run's
    rows would not be the table's: another schema (the options that shape it), or other values (the
    encoder fingerprint)."""
    changed = _diff(table.options, mine.options)
    if changed or table.spec != mine.spec:
        detail = "; ".join(changed) or "the columns differ"
        raise OutputError(
            f"Output {uri} holds a table of another schema: {detail} (the table's value → this run's). "
            "Rows of two schemas cannot share one table: use the table's options, or another output.",
            code=ErrorCode.SCHEMA_MISMATCH,
        )
    if table.fingerprint != mine.fingerprint:
        detail = "; ".join(_diff(table.encoder, mine.encoder)) or "the encoder differs"
        raise OutputError(
            f"Output {uri} was written with encoder fingerprint {table.fingerprint[:16]}, this run's is "
            f"{mine.fingerprint[:16]} ({detail}; the table's value → this run's): refusing to mix features of "
            "different encoders. Use the table's settings, or another output.",
            code=ErrorCode.FINGERPRINT_MISMATCH,
        )


class TableWriter:
    """The driver's access to a table it is about to write (:meth:`open`, then :meth:`start`)."""

    def __init__(
        self, location: TableLocation, identity: TableIdentity, mode: Mode, snapshot: Snapshot | None
    ) -> None:
        self.location = location
        self.identity = identity
        self.mode = mode
        self.snapshot = snapshot
        """The table as it was when opened (None: there is none yet)."""
        self.latest = snapshot.latest_record() if snapshot is not None else None
        """The newest commit record."""

    @classmethod
    def open(cls, location: TableLocation, *, identity: TableIdentity, mode: Mode) -> TableWriter:
        """Look at ``location`` and refuse (OutputError, nothing written) what this run must not write."""
        uri = location.uri
        try:
            info = location.filesystem.get_file_info(location.path)
        except OSError as exc:
            raise OutputError(f"Cannot inspect the output location {uri}: {exc}") from exc
        if info.type == pafs.FileType.File:
            raise OutputError(f"Output {uri} is a file: give the folder (or prefix) the table goes in")
        if not table_exists(location):
            _check_no_foreign_files(location)
            if mode != "create":
                logger.info("There is no table at %s yet: this run creates it", uri)
            return cls(location, identity, mode, None)
        snapshot = load_snapshot(location)
        if snapshot.identity is None:
            raise OutputError(
                f"Output {uri} holds a Delta table that llava-features did not create: choose another output"
            )
        writer = cls(location, identity, mode, snapshot)
        live = live_runs(location)
        state = table_state(writer.latest, live)
        owner = snapshot.identity
        created = f"job {owner.job}, started {owner.created}" + (f" on {owner.host}" if owner.host else "")
        if live and mode != "create":
            runs = "; ".join(_describe_lease(lease) for lease in live.values())
            raise OutputError(
                f"Output {uri} is being written now ({created}): {runs}. Wait for it, or stop it first; "
                "nothing was written.",
                code=ErrorCode.OUTPUT_IN_USE,
            )
        if mode == "create":
            runs = "; ".join(_describe_lease(lease) for lease in live.values())
            hint = {
                "in_progress": f"it is being written now: {runs}",
                "interrupted": "it was interrupted: --resume continues it",
                "complete": "it is complete: --append adds new inputs to it",
                "failed": "it is complete but above its error budget: --resume with --max-error-fraction accepts it",
            }.get(state, state)
            raise OutputError(
                f"Output {uri} is the feature table of {created}; {hint}. Choose another output location "
                "(nothing is ever deleted for you); nothing was written.",
                code=ErrorCode.OUTPUT_IN_USE if state == "in_progress" else ErrorCode.OUTPUT_EXISTS,
            )
        check_compatible(owner, identity, uri)
        if (
            mode == "append"
            and state == "interrupted"
            and not (writer.latest and writer.latest.segment.append)
        ):
            raise OutputError(
                f"Output {uri} was interrupted before it was complete: finish it with --resume first, then append",
                code=ErrorCode.OUTPUT_EXISTS,
            )
        return writer

    def existing_ids(self) -> Any:
        """The ids the table holds (an :class:`~pipeline.table.ids.IdSet`), for an append."""
        from .ids import IdSet
        from .reader import read_column

        if self.snapshot is None:
            return IdSet()
        return IdSet.of(read_column(self.snapshot, "image_id").to_pylist())

    def start(self, plan: RunPlan) -> TableRun:
        """Claim the table (a new one) or register this run in it, and take the run's lease."""
        run = uuid.uuid4().hex[:RUN_HEX]
        if self.snapshot is None:
            segment = Segment(
                number=1,
                plan=plan.plan,
                input=plan.input,
                input_kind=plan.input_kind,
                units=plan.units,
                rows=plan.rows,
                created=_now(),
            )
            record = CommitRecord(
                op="claim", job=self.identity.job, run=run, segment=segment, **CommitRecord.here()
            )
            try:
                create_table(
                    self.location,
                    identity=self.identity,
                    schema=self.identity.spec.arrow_schema(),
                    record=record,
                )
            except OutputError:
                if not table_exists(self.location):
                    raise
                winner = load_snapshot(self.location).identity
                if winner is None:
                    raise
                raise OutputError(
                    f"Output {self.location.uri} was claimed by job {winner.job} (started {winner.created}"
                    + (f" on {winner.host}" if winner.host else "")
                    + ") while this job was starting; nothing was written. Choose another output location.",
                    code=ErrorCode.OUTPUT_IN_USE,
                ) from None
            job = self.identity.job
            snapshot = load_snapshot(self.location)
            lease = LeaseKeeper(self.location, run=run, job=job)
            logger.info("Created the feature table %s (job %s, run %s)", self.location.uri, job, run)
            return TableRun(self.location, snapshot=snapshot, segment=segment, run=run, lease=lease)
        job = self.snapshot.identity.job if self.snapshot.identity else self.identity.job
        segment = self._resume_segment(plan) if self.mode == "resume" else self._append_segment(plan)
        # No commit yet: the run's first units commit records it (with its segment); until then the
        # lease alone says it is running.
        lease = LeaseKeeper(self.location, run=run, job=job)
        logger.info(
            "Run %s %s segment %d of %s",
            run,
            "continues" if self.mode == "resume" else "appends",
            segment.number,
            self.location.uri,
        )
        return TableRun(self.location, snapshot=self.snapshot, segment=segment, run=run, lease=lease)

    def _resume_segment(self, plan: RunPlan) -> Segment:
        latest = self.latest
        if latest is None:
            raise OutputError(
                f"Output {self.location.uri} has no record of the plan that wrote it: cannot resume it"
            )
        seg = latest.segment
        if seg.append:
            raise OutputError(
                f"The last run on {self.location.uri} was an --append of {seg.input}: run the same --append "
                "again to continue it (it leaves out what the table holds)",
                code=ErrorCode.OUTPUT_EXISTS,
            )
        if seg.plan != plan.plan:
            raise OutputError(
                f"Output {self.location.uri} was written for a different input plan (inputs changed, or their order, "
                "sizes or modification times, --limit, --shard-size or the input options): resuming would mix "
                f"units. The table's input was {seg.input} ({seg.units} units). Use the original input and "
                "options, --append to add new inputs to a complete table, or another output location.",
                code=ErrorCode.FINGERPRINT_MISMATCH,
            )
        return seg

    def _append_segment(self, plan: RunPlan) -> Segment:
        latest = self.latest
        assert self.snapshot is not None
        if latest is not None and latest.op != "finish" and latest.segment.append:
            if latest.segment.source_plan == plan.source_plan:
                return replace(latest.segment, plan=plan.plan, units=plan.units, rows=plan.rows)
            raise OutputError(
                f"An --append of {latest.segment.input} into {self.location.uri} was interrupted: run it again to "
                "finish it before appending other inputs",
                code=ErrorCode.OUTPUT_EXISTS,
            )
        number = max([latest.segment.number if latest else 0, *self.snapshot.segments()]) + 1
        return Segment(
            number=number,
            plan=plan.plan,
            input=plan.input,
            input_kind=plan.input_kind,
            units=plan.units,
            rows=plan.rows,
            append=True,
            source_plan=plan.source_plan,
            created=_now(),
        )


def _check_no_foreign_files(location: TableLocation) -> None:
    """OutputError when the location holds files of anything but a table (another tool's, an earlier version's)."""
    fs = location.filesystem
    try:
        entries = fs.get_file_info(pafs.FileSelector(location.path, allow_not_found=True))
    except OSError as exc:
        raise OutputError(f"Cannot list the output location {location.uri}: {exc}") from exc
    names = {e.base_name for e in entries} - {DELTA_LOG_DIR, META_DIR}
    if not names and not any(e.base_name == DELTA_LOG_DIR for e in entries):
        # GCS lists only objects one level down, never the implied sub-folders of deeper ones.
        deeper = fs.get_file_info(pafs.FileSelector(location.path, recursive=True, allow_not_found=True))
        names = {e.path for e in deeper if not any(p in e.path for p in (DELTA_LOG_DIR, META_DIR))}
    if not names:
        return
    legacy = sorted(names & set(LEGACY_MARKERS))
    if legacy:
        raise OutputError(
            f"Output {location.uri} was written by an earlier version of llava-features (the _commits/ layout: "
            f"{', '.join(legacy)}); this version writes Delta Lake tables. Choose another output location, or "
            "read that output with the version that wrote it.",
            code=ErrorCode.UNSUPPORTED_OUTPUT,
        )
    raise OutputError(
        f"Output {location.uri} is not empty ({len(names)} entries, e.g. {sorted(names)[0]}) and holds no feature "
        "table: choose another output location (nothing is ever deleted for you)"
    )


@dataclass
class _UnitFiles:
    """A unit's files as they come back from the tasks."""

    pieces: dict[int, tuple[DataFile | None, int, int, dict[str, int]]] = field(default_factory=dict)
    last: int | None = None

    def complete(self) -> bool:
        return self.last is not None and all(p in self.pieces for p in range(self.last + 1))


@dataclass(frozen=True)
class CommittedUnit:
    """A unit this run committed (its counts: the files are the log's)."""

    index: int
    key: str
    rows: int
    ok: int
    errors: dict[str, int]


class TableRun:
    """One run writing one segment of a table (made by :meth:`TableWriter.start`)."""

    def __init__(
        self, location: TableLocation, *, snapshot: Snapshot, segment: Segment, run: str, lease: LeaseKeeper
    ) -> None:
        self.location = location
        self.snapshot = snapshot
        self.segment = segment
        self.run = run
        self.lease = lease
        assert snapshot.identity is not None
        self.identity: TableIdentity = snapshot.identity
        self.committed: dict[int, CommittedUnit] = {}
        """Units this run committed."""
        self.lost: set[int] = set()
        """Units another run committed first (this run's files of them were removed)."""
        self._lock = threading.Lock()

    @property
    def job(self) -> str:
        return self.identity.job

    def target(self, compression: str = "none") -> WriteTarget:
        """Where and how the tasks write this run's data files."""
        return WriteTarget(self.location, self.identity.spec, self.segment.number, self.run, compression)

    def pending(self, units: Sequence[PlannedUnit]) -> list[PlannedUnit]:
        """The units of ``units`` that the table does not hold yet."""
        done = self.snapshot.committed_keys()
        return [u for u in units if u.key not in done]

    def record(self, op: str, **values: Any) -> CommitRecord:
        return CommitRecord(
            op=op,  # type: ignore[arg-type]
            job=self.job,
            run=self.run,
            segment=self.segment,
            **CommitRecord.here(),
            **values,
        )

    def committer(
        self, units: Mapping[int, PlannedUnit], *, interval_s: float = 10.0, max_units: int = 1000
    ) -> Committer:
        """A committer of this run's files (see :class:`Committer`)."""
        return Committer(self, units, interval_s=interval_s, max_units=max_units)

    # -- the end of a run -------------------------------------------------------------------------

    def finish(self, units: Sequence[PlannedUnit], *, max_error_fraction: float) -> Outcome:
        """Check that the table holds every unit of ``units`` with all its rows, record the segment's counts
        and the error-budget decision (unless a run recorded the same already), write ``_SUCCESS`` when
        complete, and remove unreferenced files (see the module docstring). OutputError when units are
        missing (``--resume`` continues)."""
        snapshot = self.snapshot = refresh(self.snapshot)
        keys = {u.key: u for u in units}
        files = [f for f in snapshot.files if f.name is not None and f.name.key in keys]
        rows_of: Counter[str] = Counter()
        for f in files:
            rows_of[f.name.key] += f.rows  # type: ignore[union-attr]
        present = {f.name.key for f in files}  # type: ignore[union-attr]
        missing = [u for u in units if u.key not in present]
        if missing:
            raise OutputError(
                f"Output {self.location.uri} is incomplete: {len(missing)} unit(s) of the plan are not in the table "
                f"(e.g. unit {missing[0].index}); run again with --resume"
            )
        for u in units:
            if u.rows is not None and rows_of[u.key] != u.rows:
                raise OutputError(
                    f"Output {self.location.uri}: unit {u.index} holds {rows_of[u.key]} rows for its {u.rows} inputs"
                )
        rows = sum(f.rows for f in files)
        ok = sum(f.rows if f.ok is None else f.ok for f in files)
        errors = self._error_counts(snapshot, files, rows - ok)
        fraction = (rows - ok) / rows if rows else 0.0
        exceeded = fraction > max_error_fraction
        totals = {
            "rows": rows,
            "ok": ok,
            "errors": dict(sorted(errors.items())),
            "error_fraction": fraction,
            "max_error_fraction": max_error_fraction,
            "budget_exceeded": exceeded,
            "units": len(units),
            "files": len(files),
        }
        state: TableState = "failed" if exceeded else "complete"
        latest = snapshot.latest_record()
        outcome = Outcome(state, rows, ok, errors, fraction, max_error_fraction, exceeded, len(files))
        finished = (
            latest is not None
            and latest.op == "finish"
            and latest.segment.number == self.segment.number
            and latest.segment.plan == self.segment.plan
        )
        if finished and not self.committed and latest.state in ("complete", state):
            # Nothing new: the segment's end is recorded (a complete table is never downgraded by a
            # later, stricter budget; the run reports its own decision).
            outcome.up_to_date, outcome.recorded = True, latest
            outcome.state = latest.state  # type: ignore[assignment]
        else:
            self.lease.check()
            commit_files(
                refresh(snapshot), files=[], keys=[], record=self.record("finish", state=state, totals=totals)
            )
            self.snapshot = refresh(snapshot)
            if state == "complete":
                self._write_success(totals)
        outcome.removed = self.remove_orphans()
        return outcome

    def _error_counts(self, snapshot: Snapshot, files: Sequence[Any], total: int) -> dict[str, int]:
        """Failed rows of the segment by code: this run's own units, the other runs' from their commit
        records, or (when the log no longer has them all) from the files' ``error_code`` column."""
        counts: Counter[str] = Counter()
        for unit in self.committed.values():
            counts.update(unit.errors)
        if sum(counts.values()) == total:
            return dict(counts)
        for record in snapshot.records():
            if (
                record.op == "units"
                and record.run != self.run
                and record.segment.number == self.segment.number
                and record.segment.plan == self.segment.plan
            ):
                counts.update(record.errors)
        if sum(counts.values()) == total:
            return dict(counts)
        from .reader import read_error_codes

        logger.info(
            "counting the errors of %s from its files (the log has not every record)", self.location.uri
        )
        return read_error_codes(self.location, [f.path for f in files if (f.ok or 0) < f.rows])

    def _write_success(self, totals: dict[str, Any]) -> None:
        value = {
            **totals,
            "job": self.job,
            "run": self.run,
            "segment": self.segment.number,
            "plan": self.segment.plan,
            "fingerprint": self.identity.fingerprint,
            "version": self.snapshot.version,
            "finished": _now(),
        }
        write_json(self.location.filesystem, self.location.join(SUCCESS_FILE), value)

    def remove_orphans(self) -> list[str]:
        """Remove the data files (and temporary files) no commit references, written by this run or by a
        run that is no longer live; return their paths."""
        fs = self.location.filesystem
        referenced = {f.path for f in refresh(self.snapshot).files}
        live = set(live_runs(self.location)) - {self.run}
        removed = []
        for entry in fs.get_file_info(pafs.FileSelector(self.location.path, allow_not_found=True)):
            name = entry.base_name
            parsed = DataFileName.parse(temp_target(name) or name)
            if entry.type != pafs.FileType.File or parsed is None or name in referenced or parsed.run in live:
                continue
            try:
                fs.delete_file(entry.path)
            except OSError as exc:
                logger.warning("could not remove %s: %s", entry.path, exc)
                continue
            removed.append(entry.path)
        if removed:
            logger.info("removed %d file(s) no commit references from %s", len(removed), self.location.uri)
        return removed

    def close(self) -> None:
        """End the run: release its lease (a run that failed leaves its unreferenced files to the next one)."""
        self.lease.release()


@dataclass
class _Ready:
    index: int
    key: str
    files: list[DataFile]
    rows: int
    ok: int
    errors: dict[str, int]


class Committer:
    """Collects the tasks' data files by unit and commits complete units in batches, on a thread.

    A batch is committed when it holds ``max_units`` units or its oldest unit has waited
    ``interval_s`` seconds, and at :meth:`close`. Before each commit the snapshot is refreshed: units
    another run committed meanwhile are dropped (and this run's files of them removed), and when a
    concurrent commit wins the race for one of them (delta-rs: "Concurrent transaction failed") the
    batch is tried again against the newer snapshot.
    """

    def __init__(
        self, run: TableRun, units: Mapping[int, PlannedUnit], *, interval_s: float, max_units: int
    ) -> None:
        self.run = run
        self.units = dict(units)
        self.interval_s = interval_s
        self.max_units = max_units
        self._files: dict[int, _UnitFiles] = {}
        """Pieces of the units not complete yet."""
        self._done: set[int] = set()
        """Units whose pieces are all in (ready, committed, or dropped for another run's commit)."""
        self._ready: list[_Ready] = []
        self._oldest: float | None = None
        self._cond = threading.Condition()
        self._closing = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="table-committer", daemon=True)
        self._thread.start()

    def add(
        self,
        *,
        unit: int,
        piece: int,
        last: bool,
        file: DataFile | None,
        rows: int,
        ok: int,
        errors: Mapping[str, int],
    ) -> bool:
        """Record one data file of ``unit`` (``file`` None: a piece without a file); True when it is new (a
        retried task reports its file again, rewritten under the same name). Raises the committer's error."""
        self._raise()
        planned = self.units[unit]
        state = self._files.setdefault(unit, _UnitFiles())
        new = piece not in state.pieces
        state.pieces[piece] = (file, rows, ok, dict(errors))
        if last:
            state.last = piece
        if not state.complete():
            return new
        pieces = [state.pieces[p] for p in range(state.last + 1)]  # type: ignore[operator]
        del self._files[unit]  # complete: what the driver keeps of a unit is its ready batch entry
        self._done.add(unit)
        errs: Counter[str] = Counter()
        for p in pieces:
            errs.update(p[3])
        ready = _Ready(
            unit,
            planned.key,
            [p[0] for p in pieces if p[0] is not None],
            sum(p[1] for p in pieces),
            sum(p[2] for p in pieces),
            dict(errs),
        )
        if planned.rows is not None and ready.rows != planned.rows:
            raise OutputError(f"Unit {unit} wrote {ready.rows} rows for its {planned.rows} inputs")  # a bug
        with self._cond:
            self._ready.append(ready)
            self._oldest = self._oldest or time.monotonic()
            self._cond.notify()
        return new

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    due = self._oldest is not None and (
                        len(self._ready) >= self.max_units
                        or time.monotonic() - self._oldest >= self.interval_s
                        or self._closing
                    )
                    if due or (self._closing and not self._ready):
                        break
                    wait = (
                        None
                        if self._oldest is None
                        else max(0.0, self.interval_s - (time.monotonic() - self._oldest))
                    )
                    self._cond.wait(timeout=wait)
                if not self._ready and self._closing:
                    return
                # At most max_units a commit: the units beyond (ready during a slow commit) go in the
                # next one, due by count or by the age of this batch's oldest unit, never later.
                batch, self._ready = self._ready[: self.max_units], self._ready[self.max_units :]
                if not self._ready:
                    self._oldest = None
            try:
                self._commit(batch)
            except (
                BaseException
            ) as exc:  # raised to the driver at its next add() or close(), which reports it
                logger.debug("committing %d unit(s) to %s failed: %s", len(batch), self.run.location.uri, exc)
                self._error = exc
                return

    def _commit(self, batch: list[_Ready]) -> None:
        run = self.run
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            run.lease.check()
            snapshot = run.snapshot = refresh(run.snapshot)
            done = snapshot.committed_keys()
            lost = [u for u in batch if u.key in done]
            if lost:
                self._drop(lost)
                batch = [u for u in batch if u.key not in done]
            if not batch:
                return
            errors: Counter[str] = Counter()
            for u in batch:
                errors.update(u.errors)
            record = run.record(
                "units",
                units=len(batch),
                rows=sum(u.rows for u in batch),
                ok=sum(u.ok for u in batch),
                errors=dict(errors),
            )
            try:
                commit_files(
                    snapshot,
                    files=[f for u in batch for f in u.files],
                    keys=[u.key for u in batch],
                    record=record,
                )
            except commit_conflict_types() as exc:
                logger.info(
                    "commit of %d unit(s) lost a race to another run (%s); trying again (%d of %d)",
                    len(batch),
                    exc,
                    attempt,
                    COMMIT_ATTEMPTS,
                )
                time.sleep(_RETRY_S * attempt)
                continue
            with run._lock:
                for u in batch:
                    run.committed[u.index] = CommittedUnit(u.index, u.key, u.rows, u.ok, u.errors)
            logger.debug("committed %d unit(s) to %s", len(batch), run.location.uri)
            return
        raise OutputError(
            f"Could not commit {len(batch)} unit(s) to {run.location.uri} after {COMMIT_ATTEMPTS} tries: other "
            "writers keep winning the race (--resume continues the job)"
        )

    def _drop(self, lost: list[_Ready]) -> None:
        """Units another run committed first: remove this run's files of them (no commit references them)."""
        fs = self.run.location.filesystem
        for u in lost:
            self.run.lost.add(u.index)
            for f in u.files:
                with contextlib.suppress(OSError):
                    fs.delete_file(self.run.location.join(f.path))
        logger.info(
            "%d unit(s) were committed by another run first; this run's files of them were removed", len(lost)
        )

    def close(self) -> None:
        """Commit what is ready, stop the thread, and raise the error a commit met (if any)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        self._raise()


def read_success(location: TableLocation) -> dict[str, Any] | None:
    """The ``_SUCCESS`` marker's content (None when there is none)."""
    from ..storage import read_json

    try:
        return read_json(location.filesystem, location.join(SUCCESS_FILE))
    except (OSError, ValueError):
        return None
