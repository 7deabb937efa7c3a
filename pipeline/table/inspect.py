"""Look inside a feature table (``llava-features inspect OUTPUT``): what it holds and in what state.

:func:`inspect_table` reads the Delta log (the snapshot, our commit records, the run leases) and, of
the data, only small columns (``error_code``, ``uri``, ``error_message`` of files with failures), never
a feature; it lists the folder to find the files no commit references: a running job's files in flight,
or the orphans of a run that died (the next run of the job removes them). Nothing is printed here
(the command line formats the :class:`TableReport`) and nothing is changed.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow.compute as pc
import pyarrow.fs as pafs

from ..model.errors import InputReadError
from .layout import DELTA_LOG_DIR, META_DIR, SUCCESS_FILE, DataFileName, temp_target
from .lease import read_leases
from .log import CommitRecord, TableState
from .reader import file_loader, open_table, ordered_map
from .tensors import field_spec

logger = logging.getLogger(__name__)

__all__ = ["ColumnInfo", "ErrorGroup", "RunInfo", "SegmentInfo", "TableReport", "inspect_table"]

EXAMPLES_PER_CODE = 3
"""Example failures (uri and message) reported per error code."""


@dataclass
class ErrorGroup:
    code: str
    count: int
    examples: list[dict[str, str]] = field(default_factory=list)
    """``{"uri", "message"}`` of the first failures of this code."""


@dataclass
class ColumnInfo:
    """A tensor column (or pooled) of the table."""

    name: str
    dtype: str
    shape: list[int | None]
    """Per row: ``[tokens, dim]`` for features, ``[dim]`` for pooled; ``None`` for the dimension that
    varies from row to row (LLaVA-NeXT: ``[None, tokens, dim]`` tiles, ``[None, dim]`` packed)."""
    bytes_per_row: int | None
    encoding: str
    """``binary`` (raw bytes) or ``list`` (float arrays)."""


@dataclass
class SegmentInfo:
    """One job's plan in the table (the first job's, then one per append)."""

    number: int
    input: str
    input_kind: str
    plan: str
    units_planned: int
    units_committed: int
    rows: int
    """Rows the table holds of the segment."""
    append: bool
    finished: str | None
    """When its end was recorded (None: not finished)."""
    state: str
    """``complete``, ``failed`` (over its error budget) or ``unfinished``."""


@dataclass
class RunInfo:
    """One run (a driver process) that wrote the table."""

    run: str
    host: str
    pid: int
    first: str
    """Its first commit (ISO time), or its start for a live run that committed nothing yet."""
    last: str
    commits: int
    units: int
    rows: int
    live: bool
    """Writing the table now (its lease is fresh)."""


@dataclass
class TableReport:
    """What :func:`inspect_table` found (``to_dict()`` is the ``--json`` form)."""

    output: str
    state: TableState
    version: int = 0
    problems: list[str] = field(default_factory=list)
    """What looks wrong, or why the table is not complete, one sentence each."""
    job: str = ""
    created: str = ""
    """When the job created the table."""
    model: str | None = None
    """The checkpoint the features come from (as configured)."""
    fingerprint: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    """The options that shape the schema, by config key."""
    rows: int = 0
    ok: int = 0
    errors: int = 0
    error_fraction: float = 0.0
    max_error_fraction: float | None = None
    """The error budget of the last segment's decision (or of the config)."""
    error_codes: list[ErrorGroup] = field(default_factory=list)
    columns: list[ColumnInfo] = field(default_factory=list)
    segments: list[SegmentInfo] = field(default_factory=list)
    runs: list[RunInfo] = field(default_factory=list)
    units_planned: int | None = None
    """Units of the last segment's plan."""
    units_committed: int = 0
    """Of those, the units the table holds."""
    data_files: int = 0
    data_bytes: int = 0
    in_flight_files: list[str] = field(default_factory=list)
    """Files no commit references yet, of a live run: being written now."""
    orphan_files: list[str] = field(default_factory=list)
    """Files no commit references, of runs that are no longer live (the next run removes them)."""
    missing_files: list[str] = field(default_factory=list)
    """Files the snapshot references that are not there (removed behind the table's back)."""
    changed_files: list[str] = field(default_factory=list)
    """Files the snapshot references whose size is not the one the log recorded (rewritten behind its back)."""
    other_files: list[str] = field(default_factory=list)
    """Files the table does not account for (not written by llava-features)."""
    success: bool = False
    """``_SUCCESS`` is there."""
    finished: str | None = None
    """When the last segment's end was recorded."""
    config: dict[str, Any] | None = None
    """The resolved config the creating job recorded."""
    encoder: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def inspect_table(
    output: str | os.PathLike[str], *, s3_endpoint: str | None = None, examples: int = EXAMPLES_PER_CODE
) -> TableReport:
    """Report on the table at ``output`` (local path, ``s3://``, ``gs://``); see the module docstring.

    Raises :class:`~pipeline.model.errors.InputReadError` when there is no table there (an output of an
    earlier version is named as such).
    """
    snapshot, state = open_table(output, s3_endpoint=s3_endpoint)
    location = snapshot.location
    identity = snapshot.identity
    assert identity is not None
    report = TableReport(
        output=location.uri,
        state=state,
        version=snapshot.version,
        job=identity.job,
        created=identity.created,
        model=identity.model,
        fingerprint=identity.fingerprint,
        options=dict(identity.options),
        config=identity.config or None,
        encoder=dict(identity.encoder),
    )
    files = snapshot.files
    report.data_files = len(files)
    report.data_bytes = sum(f.size for f in files)
    report.rows = sum(f.rows for f in files)
    report.ok = sum(f.rows if f.ok is None else f.ok for f in files)
    report.errors = report.rows - report.ok
    report.error_fraction = report.errors / report.rows if report.rows else 0.0
    schema = identity.spec.arrow_schema()
    for f in schema:
        spec = field_spec(f)
        if spec is not None:
            encoding = "binary" if "binary" in str(f.type) else "list"
            report.columns.append(ColumnInfo(f.name, spec.dtype, list(spec.shape), spec.row_bytes, encoding))

    # Errors by code, with examples: only the files that have failures, only their small columns.
    failing = [location.join(f.path) for f in files if f.ok is None or f.ok < f.rows]
    codes: Counter[str] = Counter()
    found: dict[str, list[dict[str, str]]] = {}
    load = file_loader(location.filesystem, ["status", "error_code", "uri", "error_message"])
    for table in ordered_map(load, failing, min(8, max(1, len(failing)))):
        failed = table.filter(pc.equal(table.column("status"), "error"))
        for row in failed.to_pylist():
            code = str(row["error_code"])
            codes[code] += 1
            if len(found.setdefault(code, [])) < examples:
                found[code].append({"uri": str(row["uri"]), "message": str(row["error_message"])})
    report.error_codes = [ErrorGroup(c, n, found.get(c, [])) for c, n in codes.most_common()]

    # The log: segments and runs.
    records = snapshot.records()
    leases = {lease.run: lease for lease in read_leases(location)}
    _segments(report, snapshot, records)
    _runs(report, records, leases)
    latest = records[0] if records else None
    if latest is not None and latest.op == "finish":
        report.finished = _iso(latest.timestamp_ms)
        report.max_error_fraction = latest.totals.get("max_error_fraction")
    if report.max_error_fraction is None:
        report.max_error_fraction = ((identity.config or {}).get("job") or {}).get("max_error_fraction")

    # The folder: files no commit references, files the snapshot references that are gone.
    _files(report, snapshot, leases)
    _verdict(report, latest)
    return report


def _segments(report: TableReport, snapshot: Any, records: list[CommitRecord]) -> None:
    seen: dict[int, CommitRecord] = {}
    finished: dict[int, CommitRecord] = {}
    for record in reversed(records):  # oldest first: the newest record of a segment wins
        seen[record.segment.number] = record
        if record.op == "finish":
            finished[record.segment.number] = record
    for number, record in sorted(seen.items()):
        seg = record.segment
        end = finished.get(number)
        if end is not None and end.version < record.version:
            end = None  # units committed after its end (a later run): not finished any more
        seg_files = snapshot.files_of(number)
        report.segments.append(
            SegmentInfo(
                number=number,
                input=seg.input,
                input_kind=seg.input_kind,
                plan=seg.plan,
                units_planned=seg.units,
                units_committed=len({f.name.key for f in seg_files}),
                rows=sum(f.rows for f in seg_files),
                append=seg.append,
                finished=_iso(end.timestamp_ms) if end else None,
                state=end.state if end else "unfinished",
            )
        )
    if report.segments:
        last = report.segments[-1]
        report.units_planned, report.units_committed = last.units_planned, last.units_committed


def _runs(report: TableReport, records: list[CommitRecord], leases: dict[str, Any]) -> None:
    runs: dict[str, RunInfo] = {}
    for record in reversed(records):
        info = runs.get(record.run)
        when = _iso(record.timestamp_ms)
        if info is None:
            info = runs[record.run] = RunInfo(record.run, record.host, record.pid, when, when, 0, 0, 0, False)
        info.last = when
        info.commits += 1
        info.units += record.units
        info.rows += record.rows
    for run, lease in leases.items():
        if not lease.is_live():
            continue
        started = datetime.fromtimestamp(lease.started, UTC).isoformat(timespec="seconds")
        info = runs.setdefault(run, RunInfo(run, lease.host, lease.pid, started, started, 0, 0, 0, False))
        info.live = True
    report.runs = list(runs.values())


def _files(report: TableReport, snapshot: Any, leases: dict[str, Any]) -> None:
    location = snapshot.location
    fs = location.filesystem
    referenced = {f.path: f for f in snapshot.files}
    listed: set[str] = set()
    try:
        entries = fs.get_file_info(pafs.FileSelector(location.path, allow_not_found=True))
    except OSError as exc:
        raise InputReadError(f"Cannot list {location.uri}: {exc}") from exc
    for entry in entries:
        name = entry.base_name
        if entry.type != pafs.FileType.File:
            if name not in (DELTA_LOG_DIR, META_DIR):
                report.other_files.append(name + "/")
            continue
        listed.add(name)
        if name in referenced:
            if entry.size is not None and entry.size != referenced[name].size:
                report.changed_files.append(name)
            continue
        if name == SUCCESS_FILE:
            report.success = True
            continue
        parsed = DataFileName.parse(temp_target(name) or name)
        if parsed is None:
            report.other_files.append(name)
        elif parsed.run in leases and leases[parsed.run].is_live():
            report.in_flight_files.append(name)
        else:
            report.orphan_files.append(name)
    report.missing_files = sorted(p for p in referenced if "/" not in p and p not in listed)


def _verdict(report: TableReport, latest: CommitRecord | None) -> None:
    problems = report.problems
    state = report.state
    if state == "in_progress":
        live = [r for r in report.runs if r.live]
        problems.append(
            "a job is writing the table now ("
            + ", ".join(f"run {r.run} on {r.host}, pid {r.pid}" for r in live)
            + f"); {len(report.in_flight_files)} file(s) in flight"
        )
    elif state == "interrupted":
        missing = (report.units_planned or 0) - report.units_committed
        problems.append(
            f"the last run stopped before the end: {report.units_committed} of {report.units_planned} planned units "
            f"are in the table ({missing} missing); --resume continues it"
        )
    elif state == "failed" and latest is not None:
        totals = latest.totals
        problems.append(
            f"{float(totals.get('error_fraction', 0)):.2%} of the inputs failed, above the job's max_error_fraction "
            f"{float(totals.get('max_error_fraction', 0)):.2%}: every row is in the table but it is not complete "
            "(to accept: --max-error-fraction and --resume)"
        )
    if report.orphan_files:
        problems.append(
            f"{len(report.orphan_files)} file(s) no commit references, left by runs that stopped "
            f"({', '.join(report.orphan_files[:3])}): not part of the table; the next run of the job removes them"
        )
    if report.missing_files:
        problems.append(
            f"{len(report.missing_files)} file(s) of the table are missing ({', '.join(report.missing_files[:3])}): "
            "they were removed behind its back; reads will fail"
        )
    if report.changed_files:
        problems.append(
            f"{len(report.changed_files)} file(s) of the table are not the size its log recorded "
            f"({', '.join(report.changed_files[:3])}): they were rewritten behind its back; reads will fail"
        )
    if report.other_files:
        problems.append(f"files that are not the table's: {', '.join(report.other_files[:5])}")
    if state == "complete" and not report.success:
        problems.append(f"no {SUCCESS_FILE} marker (the log says complete; the marker is a convenience)")
