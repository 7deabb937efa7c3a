"""The table's Delta transaction log, through delta-rs: snapshots, our commit records, commits.

A snapshot (:class:`Snapshot`) is the truth: its data files are the committed rows, exactly once,
and nothing else counts. Each commit this product makes carries a :class:`CommitRecord` in its
``commitInfo`` (key :data:`~pipeline.table.layout.COMMIT_KEY`): which run made it, the segment (plan)
it belongs to, what it committed, and the table's state after it. The newest record tells the
table's state; the first commit (the claim) creates the table with its
:class:`~pipeline.table.schema.TableIdentity` as the Delta metadata's description.

Every committed unit also adds a Delta application transaction (``txn``) named by its content key
(:func:`~pipeline.table.layout.unit_app_id`): delta-rs refuses the second of two concurrent commits of
one unit ("Concurrent transaction failed"), so two runs can never both commit it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from ..model.errors import ErrorCode, InputReadError, OutputError, one_line
from .files import DataFile
from .layout import COMMIT_KEY, DATA_FILE_PATTERN, KEY_SLICE, DataFileName, unit_app_id
from .location import TableLocation
from .schema import TableIdentity

logger = logging.getLogger(__name__)

__all__ = [
    "CommitRecord",
    "Segment",
    "Snapshot",
    "TableState",
    "commit_files",
    "create_table",
    "load_snapshot",
    "table_exists",
]

Operation = Literal["claim", "start", "units", "finish"]
"""What a commit did: created the table (the first run's start), started a run, committed units, or
recorded the end of a segment (its counts and the budget decision)."""
TableState = Literal["complete", "failed", "in_progress", "interrupted", "empty"]
"""A table's state: ``complete`` (every unit committed, within the error budget), ``failed`` (every unit
committed, more errors than the budget allowed), ``in_progress`` (a live run is writing it),
``interrupted`` (no live run, units missing: ``--resume`` continues), ``empty`` (nothing there)."""
RecordState = Literal["in_progress", "complete", "failed"]


@dataclass(frozen=True)
class Segment:
    """One job's plan within the table: the first job's, then one per ``--append``."""

    number: int
    """1 for the job that created the table, one more for each append."""
    plan: str
    """Fingerprint of the plan the segment encodes."""
    input: str = ""
    input_kind: str = ""
    units: int = 0
    """Units in the plan."""
    rows: int | None = None
    """Input rows of the plan (None when only reading tells: tars)."""
    append: bool = False
    """Whether the segment adds to an existing table (``--append``)."""
    source_plan: str = ""
    """``--append``: fingerprint of the whole input's plan (before the inputs already in the table were
    left out); a later ``--append`` of the same input continues an interrupted one."""
    created: str = ""


@dataclass(frozen=True)
class CommitRecord:
    """Our record in a commit: who made it and what the table's state is after it."""

    op: Operation
    job: str
    """The table's job id (the claim's)."""
    run: str
    """The run (one process) that made the commit."""
    segment: Segment
    state: RecordState = "in_progress"
    host: str = ""
    pid: int = 0
    units: int = 0
    """Units this commit made part of the table."""
    rows: int = 0
    """Rows of those units."""
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    """Error rows of those units by code."""
    totals: dict[str, Any] = field(default_factory=dict)
    """``finish``: the segment's ``rows``, ``ok``, ``errors`` (by code), ``error_fraction``,
    ``max_error_fraction`` and ``budget_exceeded``."""
    version: int = -1
    """The commit's table version (known once read back from the log)."""
    timestamp_ms: int = 0
    """When it was committed (from the log)."""

    def to_json(self) -> str:
        value = asdict(self)
        value.pop("version")
        value.pop("timestamp_ms")
        return json.dumps(value, sort_keys=True, default=str)

    @classmethod
    def from_commit_info(cls, info: dict[str, Any]) -> CommitRecord | None:
        """Our record of one ``history()`` entry (None for a commit another tool made)."""
        raw = info.get(COMMIT_KEY)
        if not raw:
            return None
        try:
            value = json.loads(raw) if isinstance(raw, str) else dict(raw)
            segment = Segment(**value.pop("segment"))
            return cls(
                **value,
                segment=segment,
                version=int(info.get("version", -1)),
                timestamp_ms=int(info.get("timestamp", 0)),
            )
        except (TypeError, ValueError, KeyError) as exc:
            logger.warning("unreadable llava-features record in commit %s: %s", info.get("version"), exc)
            return None

    @staticmethod
    def here() -> dict[str, Any]:
        """``host`` and ``pid`` of this process."""
        return {"host": socket.gethostname(), "pid": os.getpid()}


@dataclass(frozen=True)
class ActiveFile:
    """A data file a snapshot holds."""

    path: str
    name: DataFileName | None
    """What its name says (None for a file another tool added)."""
    size: int
    rows: int
    ok: int | None
    """Rows without an error code (from the file's statistics; None when it has none)."""


@dataclass
class Snapshot:
    """One version of a table: what it holds (its files) and what it is (its identity)."""

    location: TableLocation
    version: int
    identity: TableIdentity | None
    """None when the Delta table was not created by this product."""
    schema: pa.Schema
    adds: pa.Table = field(repr=False)
    """The add actions of its files (``path``, ``size_bytes``, ``num_records``, null counts, ...)."""
    table: Any = field(repr=False, default=None)
    """The ``deltalake.DeltaTable`` it was read from."""
    _files: list[ActiveFile] | None = field(default=None, repr=False)

    @property
    def files(self) -> list[ActiveFile]:
        """Its data files (built on first use: a committer only asks for :meth:`committed_keys`)."""
        if self._files is None:
            adds = self.adds
            n = adds.num_rows

            def column(name: str) -> list[Any]:
                return adds.column(name).to_pylist() if name in adds.column_names else [None] * n

            self._files = [
                ActiveFile(
                    p, DataFileName.parse(p), int(size), int(rows or 0), None if ok is None else int(ok)
                )
                for p, size, rows, ok in zip(
                    column("path"),
                    column("size_bytes"),
                    column("num_records"),
                    column("null_count.error_code"),
                    strict=True,
                )
            ]
        return self._files

    def committed_keys(self, segment: int | None = None) -> set[str]:
        """Content keys of the units with files in the snapshot (of one segment when given). Read from
        the paths at once (no per-file object), as a committer does before each commit."""
        if segment is not None or self._files is not None:
            return {
                f.name.key
                for f in self.files
                if f.name is not None and (segment is None or f.name.segment == segment)
            }
        paths = self.adds.column("path")
        ours = pc.match_substring_regex(paths, DATA_FILE_PATTERN.pattern)
        return set(pc.utf8_slice_codeunits(paths.filter(ours), *KEY_SLICE).to_pylist())

    def files_of(self, segment: int) -> list[ActiveFile]:
        return [f for f in self.files if f.name is not None and f.name.segment == segment]

    def segments(self) -> set[int]:
        return {f.name.segment for f in self.files if f.name is not None}

    def ordered_files(self) -> list[ActiveFile]:
        """The files in the order of their rows: segment, unit, piece (input order), then others."""
        return sorted(
            self.files, key=lambda f: (0, *f.name.order, f.path) if f.name else (1, 0, 0, 0, f.path)
        )

    def records(self, limit: int | None = None) -> list[CommitRecord]:
        """Our records of the newest ``limit`` commits (all with None), newest first."""
        history = self.table.history(limit=limit) if limit is not None else self.table.history()
        out = []
        for info in history:
            record = CommitRecord.from_commit_info(info)
            if record is not None:
                out.append(record)
        return out

    def latest_record(self) -> CommitRecord | None:
        """The newest commit record (commits other tools made in between are skipped)."""
        for limit in (8, 64, None):
            found = self.records(limit)
            if found:
                return found[0]
            if limit is not None and len(self.table.history(limit=limit)) < limit:
                return None
        return None


def _delta() -> Any:
    import deltalake

    return deltalake


def table_exists(location: TableLocation) -> bool:
    """Whether a Delta table (its log) is at ``location``."""
    return bool(
        _delta().DeltaTable.is_deltatable(location.delta_uri, storage_options=location.storage_options())
    )


def load_snapshot(location: TableLocation, version: int | None = None) -> Snapshot:
    """The table at ``location`` (its latest version, or ``version``). InputReadError when there is none."""
    deltalake = _delta()
    try:
        dt = deltalake.DeltaTable(
            location.delta_uri, version=version, storage_options=location.storage_options()
        )
    except deltalake.exceptions.TableNotFoundError as exc:
        raise InputReadError(f"No feature table at {location.uri}: {exc}") from exc
    except (deltalake.exceptions.DeltaError, OSError) as exc:
        raise InputReadError(f"Cannot read the table at {location.uri}: {exc}") from exc
    return _snapshot(location, dt)


def refresh(snapshot: Snapshot) -> Snapshot:
    """The newest version of ``snapshot``'s table (reads only the commits since)."""
    snapshot.table.update_incremental()
    return _snapshot(snapshot.location, snapshot.table)


def _snapshot(location: TableLocation, dt: Any) -> Snapshot:
    metadata = dt.metadata()
    identity = TableIdentity.from_json(metadata.description)
    schema = pa.schema(dt.schema().to_arrow())
    adds = pa.table(dt.get_add_actions(flatten=True))
    return Snapshot(
        location=location, version=int(dt.version()), identity=identity, schema=schema, adds=adds, table=dt
    )


def create_table(
    location: TableLocation, *, identity: TableIdentity, schema: pa.Schema, record: CommitRecord
) -> None:
    """The claim: create the table at ``location`` in one commit (version 0), or raise OutputError when a
    table is there already (another job was first). Never retried at a later version: a second creator
    must lose, not overwrite the first one's metadata."""
    deltalake = _delta()
    from deltalake.transaction import CommitProperties, create_table_with_add_actions

    try:
        create_table_with_add_actions(
            location.delta_uri,
            deltalake.Schema.from_arrow(schema),
            [],
            mode="error",
            name="llava-features",
            description=identity.to_json(),
            storage_options=location.storage_options(),
            commit_properties=CommitProperties(
                custom_metadata={COMMIT_KEY: record.to_json()}, max_commit_retries=0
            ),
        )
    except (deltalake.exceptions.DeltaError, OSError) as exc:  # OSError: read-only, full, unreachable
        if table_exists(location):
            raise OutputError(f"Output {location.uri} was claimed by another job first ({exc})") from exc
        raise OutputError(
            f"Could not create the table at {location.uri} ({one_line(exc)}); nothing was written",
            code=ErrorCode.OUTPUT_WRITE_FAILED,
        ) from exc


def commit_files(
    snapshot: Snapshot, *, files: Sequence[DataFile], keys: Iterable[str], record: CommitRecord
) -> None:
    """Commit ``files`` (the complete units of ``keys``) and ``record`` in one transaction at the version
    after ``snapshot``'s. Raises ``deltalake.exceptions.CommitFailedError`` when a concurrent commit holds
    one of the units (or otherwise conflicts); the caller reloads and decides."""
    from deltalake.transaction import AddAction, CommitProperties, Transaction

    actions = [
        AddAction(f.path, int(f.size), {}, int(f.modified_ms), True, json.dumps(f.stats(), default=str))
        for f in files
    ]
    snapshot.table.create_write_transaction(
        actions,
        "append",
        snapshot.table.schema(),
        commit_properties=CommitProperties(
            custom_metadata={COMMIT_KEY: record.to_json()},
            app_transactions=[Transaction(unit_app_id(k), 1, None) for k in sorted(set(keys))],
        ),
    )


def commit_conflict_types() -> tuple[type[BaseException], ...]:
    """The delta-rs errors of a lost race (another commit came first and conflicts)."""
    return (_delta().exceptions.CommitFailedError,)
