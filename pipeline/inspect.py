"""Look inside an output of the offline job (``llava-features inspect OUTPUT``): what it holds and
whether it is complete.

:func:`inspect_output` reads an output folder (local, ``s3://``, ``gs://``) without loading any
feature: the job's records (``_job.json``, ``_SUCCESS``), the files' footers and their small
columns (``status``, ``error_code``; ``uri`` and ``error_message`` of the first failures), and
returns an :class:`OutputReport`: rows, ok and error counts by code with examples, the array
columns with their dtypes and shapes, files and bytes, the plan against what is committed, the
fingerprint and the resolved config in brief, and a verdict (:data:`OutputState`). Nothing is
printed here (the command line formats the report) and nothing is changed.

How the job records its plan and its commits is read in one place, :func:`read_commit_state`;
the report is built on its :class:`CommitState` only.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .constants import (
    COMMIT_FILE_PATTERN,
    COMMITS_DIR,
    CONFIG_KEY,
    FINGERPRINT_KEY,
    JOB_FILE,
    SHARD_TEMP_PATTERN,
    STATUS_ERROR,
    STATUS_OK,
    SUCCESS_FILE,
)
from .constants import shard_index as parse_shard_index
from .model.errors import InputReadError
from .reader import array_spec
from .sink import UnitCommit, read_commits
from .storage import join_path, resolve_filesystem
from .tensors import (
    CANONICAL_VARIABLE_NAME,
    EXTENSION_NAME,
    VARIABLE_EXTENSION_NAME,
    ensure_registered,
    variable_spec,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ColumnInfo",
    "CommitState",
    "ErrorGroup",
    "OutputReport",
    "OutputState",
    "StoredFile",
    "inspect_output",
    "read_commit_state",
]

OutputState = Literal["complete", "failed", "incomplete", "unknown", "empty"]
"""Verdict on an output:

- ``complete``: ``_SUCCESS`` is there and every planned unit is committed with all its rows;
- ``failed``: every unit is committed but more inputs failed than ``job.max_error_fraction``, so the
  job wrote no ``_SUCCESS``;
- ``incomplete``: a planned unit is missing, short or unreadable, a writer's temporary file is
  left, or the job stopped (or is still running) before ``_SUCCESS``;
- ``unknown``: data files without the job's ``_job.json`` (not written by the job): no plan to check;
- ``empty``: nothing there.
"""

EXAMPLES_PER_CODE = 3
"""Example failures (uri and message) reported per error code."""
_DATA_SUFFIX = ".parquet"
_TENSOR_FORMATS = {
    EXTENSION_NAME: "binary",
    "arrow.fixed_shape_tensor": "fixed_shape_tensor",
    VARIABLE_EXTENSION_NAME: "binary",
    CANONICAL_VARIABLE_NAME: "variable_shape_tensor",
}


# -- the job's records: plan and commits --------------------------------------------------------


@dataclass(frozen=True)
class StoredFile:
    """A file of the output."""

    name: str
    """File name (relative to the output)."""
    path: str
    """Path in the output's filesystem."""
    bytes: int
    """Size in bytes."""


@dataclass
class CommitState:
    """What an output's own records say: the plan, what is committed, what is left over."""

    job: dict[str, Any] | None
    """``_job.json`` (plan, resolved config, fingerprint), or None."""
    success: dict[str, Any] | None
    """``_SUCCESS`` (counts, fingerprint, finish time), or None."""
    units: int | None
    """Units in the plan; None without ``_job.json``."""
    commits: dict[int, UnitCommit] = field(default_factory=dict)
    """Unit index → its commit record (files, rows, counts), for the units of the plan."""
    committed: dict[int, list[StoredFile]] = field(default_factory=dict)
    """Unit index → the data files its commit record names that exist, in order."""
    missing_files: list[str] = field(default_factory=list)
    """Files named by a commit record that are not there (removed after the commit)."""
    uncommitted: list[StoredFile] = field(default_factory=list)
    """Data files of planned units without a commit record: leftovers of an interrupted run."""
    temporary: list[StoredFile] = field(default_factory=list)
    """Files of writes in flight, or of writers that died (never read as data)."""
    unplanned: list[StoredFile] = field(default_factory=list)
    """Data files of no planned unit (another plan, a copy), or not named by their unit's record."""
    records: list[StoredFile] = field(default_factory=list)
    """The commit records (``_commits/unit-NNNNNN.json``), committed or not."""
    other: list[StoredFile] = field(default_factory=list)
    """Everything else in the folder (``_job.json`` and ``_SUCCESS`` included)."""

    @property
    def data_files(self) -> list[StoredFile]:
        """Every data file (what :func:`~pipeline.reader.read_features` reads): the committed ones in
        unit order, then those of uncommitted units, then the unplanned ones."""
        ordered = [f for index in sorted(self.committed) for f in self.committed[index]]
        return ordered + self.uncommitted + self.unplanned


def _read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(path) as stream:
            value = json.loads(stream.read().decode())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InputReadError(f"Cannot read {path}: {exc}") from exc
    return value if isinstance(value, dict) else None


def _list_files(fs: pafs.FileSystem, path: str) -> list[StoredFile]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except OSError as exc:
        raise InputReadError(f"Cannot list {path}: {exc}") from exc
    return [StoredFile(i.base_name, i.path, int(i.size or 0)) for i in infos if i.type == pafs.FileType.File]


def read_commit_state(fs: pafs.FileSystem, path: str) -> CommitState:
    """The plan and the commits of the output at ``path`` in ``fs``, as the job records them.

    ``_job.json`` holds the number of ``units`` of the plan; unit N is committed once
    ``_commits/unit-NNNNNN.json`` exists, and that record names the unit's files
    (``part-NNNNNN-PPPPP.parquet``) with their rows; ``.part-*.parquet.<hex>.tmp`` is a write in
    flight. This function is the only place in this module that knows that layout (the names and
    the record format are :mod:`pipeline.constants`' and :mod:`pipeline.sink`'s).
    """
    files = _list_files(fs, path)
    names = {f.name for f in files}
    job = _read_json(fs, join_path(path, JOB_FILE)) if JOB_FILE in names else None
    success = _read_json(fs, join_path(path, SUCCESS_FILE)) if SUCCESS_FILE in names else None
    if success is None and SUCCESS_FILE in names:
        success = {}  # present but empty or unreadable as JSON: still the marker
    try:
        units = int(job["units"]) if job is not None else None
    except (KeyError, TypeError, ValueError):
        units = None
    records = sorted(_list_files(fs, join_path(path, COMMITS_DIR)), key=lambda f: f.name)
    recorded = [int(m.group(1)) for m in map(COMMIT_FILE_PATTERN.match, (f.name for f in records)) if m]
    planned = [u for u in recorded if units is None or u < units]
    try:
        commits = read_commits(path, fs, planned)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputReadError(f"Cannot read the commit records of {path}: {exc}") from exc
    state = CommitState(job=job, success=success, units=units, commits=commits, records=records)
    by_name = {f.name: f for f in files}
    named: set[str] = set()
    for index in sorted(commits):
        for name, _rows in commits[index].files:
            named.add(name)
            if name in by_name:
                state.committed.setdefault(index, []).append(by_name[name])
            else:
                state.missing_files.append(name)
    for f in sorted(files, key=lambda f: f.name):
        index = parse_shard_index(f.name)
        if index is not None:
            if f.name in named:
                continue
            if (units is None or index < units) and index not in commits:
                state.uncommitted.append(f)
            else:
                state.unplanned.append(f)
        elif SHARD_TEMP_PATTERN.match(f.name):
            state.temporary.append(f)
        elif f.name.endswith(_DATA_SUFFIX) and not f.name.startswith((".", "_")):
            state.unplanned.append(f)
        else:
            state.other.append(f)
    return state


# -- the report ------------------------------------------------------------------------------------


@dataclass
class ErrorGroup:
    """The failed inputs of one error code."""

    code: str
    count: int
    examples: list[dict[str, str]] = field(default_factory=list)
    """Up to :data:`EXAMPLES_PER_CODE` ``{"uri", "message"}`` of the first such inputs."""


@dataclass
class ColumnInfo:
    """An array column: what :func:`~pipeline.reader.read_features` loads with ``column=name``."""

    name: str
    dtype: str
    shape: list[int | None]
    """Per row: ``[tokens, dim]`` for features, ``[dim]`` for pooled; ``None`` for the dimension that
    varies from row to row (LLaVA-NeXT: ``[None, tokens, dim]`` tiles, ``[None, dim]`` packed)."""
    bytes_per_row: int | None
    """Bytes of one row's values (None when rows differ in shape)."""
    encoding: str
    """``binary`` (our extension types), ``fixed_shape_tensor``, ``variable_shape_tensor`` or ``list`` (pooled)."""


@dataclass
class OutputReport:
    """What :func:`inspect_output` found (``to_dict()`` is the ``--json`` form)."""

    output: str
    state: OutputState
    problems: list[str] = field(default_factory=list)
    """Why the output is not complete (or what looks wrong), one sentence each."""
    success: bool = False
    """``_SUCCESS`` is there."""
    finished: str | None = None
    """When the job wrote ``_SUCCESS``."""
    created: str | None = None
    """When the job started (``_job.json``)."""
    inputs: int | None = None
    """Inputs in the plan (None without ``_job.json``)."""
    rows: int = 0
    ok: int = 0
    errors: int = 0
    error_fraction: float = 0.0
    max_error_fraction: float | None = None
    """The job's error budget (``job.max_error_fraction``)."""
    error_codes: list[ErrorGroup] = field(default_factory=list)
    """Failed inputs by code, most frequent first."""
    columns: list[ColumnInfo] = field(default_factory=list)
    units_planned: int | None = None
    units_committed: int = 0
    missing_units: list[int] = field(default_factory=list)
    short_units: list[dict[str, int]] = field(default_factory=list)
    """``{"unit", "rows", "expected"}`` of committed units whose files hold other row counts than their
    commit record says."""
    missing_files: list[str] = field(default_factory=list)
    """Files named by a commit record that are not there."""
    uncommitted_files: list[str] = field(default_factory=list)
    """Data files of units without a commit record (an interrupted run; ``--resume`` rewrites them)."""
    unreadable_files: list[dict[str, str]] = field(default_factory=list)
    temporary_files: list[str] = field(default_factory=list)
    unplanned_files: list[str] = field(default_factory=list)
    record_files: list[str] = field(default_factory=list)
    """The other files (the job's records ``_job.json``, ``_SUCCESS``; anything else)."""
    commit_records: int = 0
    """Commit records in ``_commits/``."""
    data_files: int = 0
    data_bytes: int = 0
    total_files: int = 0
    total_bytes: int = 0
    fingerprint: str | None = None
    brief: dict[str, Any] = field(default_factory=dict)
    """The resolved config in brief: model, layer, projector, dtypes, features, job settings."""
    config: dict[str, Any] | None = None
    """The resolved config the job recorded (``_job.json``, else the files' metadata)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _FileScan:
    file: StoredFile
    rows: int = 0
    ok: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    schema: pa.Schema | None = None
    fingerprint: str | None = None
    config: dict[str, Any] | None = None
    error: str | None = None


def _scan(fs: pafs.FileSystem, f: StoredFile, examples: int) -> _FileScan:
    """Footer and small columns of one data file (never a feature)."""
    scan = _FileScan(f)
    try:
        with fs.open_input_file(f.path) as source:
            parquet = pq.ParquetFile(source)
            scan.rows = parquet.metadata.num_rows
            scan.schema = parquet.schema_arrow
            md = scan.schema.metadata or {}
            scan.fingerprint = (md.get(FINGERPRINT_KEY.encode()) or b"").decode() or None
            if CONFIG_KEY.encode() in md:
                scan.config = json.loads(md[CONFIG_KEY.encode()].decode())
            names = scan.schema.names
            if "status" not in names:
                scan.error = "no status column: not a shard of the job"
                return scan
            small = parquet.read(columns=[c for c in ("status", "error_code") if c in names])
            scan.ok = int(pc.sum(pc.equal(small.column("status"), STATUS_OK)).as_py() or 0)
            if scan.ok < scan.rows and "error_code" in names:
                codes = small.column("error_code").drop_null()
                scan.codes = Counter({c["values"]: c["counts"] for c in pc.value_counts(codes).to_pylist()})
                wanted = [c for c in ("uri", "error_message") if c in names]
                detail = parquet.read(columns=["status", "error_code", *wanted])
                failed = detail.filter(pc.equal(detail.column("status"), STATUS_ERROR))
                for code in scan.codes:
                    first = failed.filter(pc.equal(failed.column("error_code"), code)).slice(0, examples)
                    scan.examples[code] = [
                        {"uri": str(row.get("uri")), "message": str(row.get("error_message"))}
                        for row in first.to_pylist()
                    ]
    except (OSError, pa.ArrowException, ValueError) as exc:
        scan.error = f"{type(exc).__name__}: {exc}"
    return scan


def _columns(schema: pa.Schema) -> list[ColumnInfo]:
    out = []
    for f in schema:
        encoding = _TENSOR_FORMATS.get(getattr(f.type, "extension_name", ""), "list")
        variable = variable_spec(f)
        if variable is not None:
            out.append(ColumnInfo(f.name, variable.dtype, [None, *variable.inner_shape], None, encoding))
            continue
        spec = array_spec(f)
        if spec is not None:
            out.append(ColumnInfo(f.name, spec.dtype, list(spec.shape), spec.nbytes, encoding))
    return out


def _brief(job: dict[str, Any] | None, recorded: dict[str, Any] | None) -> tuple[dict[str, Any], dict | None]:
    """(brief, resolved config) from ``_job.json`` (or a file's recorded config)."""
    source = job or recorded or {}
    config = source.get("config")
    encoder = source.get("encoder") or {}
    model = encoder.get("model") or {}
    cfg = config or {}
    job_cfg, enc_cfg = cfg.get("job") or {}, cfg.get("encoder") or {}
    brief = {
        "layout": model.get("format"),
        "checkpoint": model.get("checkpoint"),
        "vision_tower": model.get("vision_tower"),
        "select_layer": model.get("select_layer"),
        "select_feature": model.get("select_feature"),
        "projector_type": model.get("projector_type"),
        "compute_dtype": encoder.get("compute_dtype"),
        "output_dtype": encoder.get("output_dtype"),
        "image_size": (encoder.get("preprocess") or {}).get("crop_height"),
        "aspect_ratio": (encoder.get("preprocess") or {}).get("aspect_ratio"),
        "features": enc_cfg.get("features"),
        "pooled": enc_cfg.get("pooled"),
        "input": (job or {}).get("input"),
        "shard_size": job_cfg.get("shard_size"),
        "tensor_format": job_cfg.get("tensor_format"),
        "compression": job_cfg.get("compression"),
    }
    return {k: v for k, v in brief.items() if v is not None}, config


def inspect_output(
    output: str | os.PathLike[str], *, s3_endpoint: str | None = None, examples: int = EXAMPLES_PER_CODE
) -> OutputReport:
    """Report on the output at ``output`` (local path, ``s3://``, ``gs://``); see the module docstring.

    Raises :class:`~pipeline.model.errors.InputReadError` when nothing exists there or it cannot be
    listed. ``s3_endpoint``: as the job's ``job.s3_endpoint``.
    """
    uri = os.fspath(output)
    fs, path = resolve_filesystem(uri, s3_endpoint=s3_endpoint)
    try:
        kind = fs.get_file_info(path).type
    except OSError as exc:
        raise InputReadError(f"Cannot open {uri}: {exc}") from exc
    if kind == pafs.FileType.NotFound:
        raise InputReadError(f"No output at {uri}")
    if kind != pafs.FileType.Directory:
        raise InputReadError(f"{uri} is a file; inspect takes the output folder (or prefix)")
    ensure_registered()
    state = read_commit_state(fs, path)
    data = state.data_files
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(data)))) as pool:
        scans = list(pool.map(lambda f: _scan(fs, f, examples), data))

    report = OutputReport(output=uri, state="empty")
    everything = [*data, *state.temporary, *state.records, *state.other]
    report.total_files, report.total_bytes = len(everything), sum(f.bytes for f in everything)
    report.data_files, report.data_bytes = len(data), sum(f.bytes for f in data)
    report.temporary_files = [f.name for f in state.temporary]
    report.unplanned_files = [f.name for f in state.unplanned]
    report.uncommitted_files = [f.name for f in state.uncommitted]
    report.missing_files = list(state.missing_files)
    report.record_files = [f.name for f in state.other]
    report.commit_records = len(state.records)
    report.success = state.success is not None
    report.finished = (state.success or {}).get("finished")
    readable = [s for s in scans if s.error is None]
    report.unreadable_files = [{"file": s.file.name, "error": str(s.error)} for s in scans if s.error]
    report.rows = sum(s.rows for s in readable)
    report.ok = sum(s.ok for s in readable)
    report.errors = report.rows - report.ok
    report.error_fraction = report.errors / report.rows if report.rows else 0.0
    codes: Counter[str] = Counter()
    found: dict[str, list[dict[str, str]]] = {}
    for s in readable:
        codes.update(s.codes)
        for code, listed in s.examples.items():
            found.setdefault(code, []).extend(listed)
    report.error_codes = [ErrorGroup(c, n, found.get(c, [])[:examples]) for c, n in codes.most_common()]
    if readable and readable[0].schema is not None:
        report.columns = _columns(readable[0].schema)
        first = {c.name: (c.dtype, c.shape) for c in report.columns}
        for s in readable[1:]:
            if s.schema is not None and {c.name: (c.dtype, c.shape) for c in _columns(s.schema)} != first:
                report.problems.append(f"{s.file.name} has other array columns than {readable[0].file.name}")
    recorded = next((s.config for s in readable if s.config), None)
    report.brief, report.config = _brief(state.job, recorded)

    # The fingerprint: the job's, and every file's.
    fingerprints = {s.fingerprint for s in readable if s.fingerprint}
    job_fp = (state.job or {}).get("fingerprint")
    report.fingerprint = job_fp or (next(iter(fingerprints)) if len(fingerprints) == 1 else None)
    if len(fingerprints) > 1 or (job_fp and fingerprints and fingerprints != {job_fp}):
        report.problems.append(
            f"the files hold features of {len(fingerprints | ({job_fp} if job_fp else set()))} encoder "
            "fingerprints: outputs of different encoders were mixed"
        )

    # The plan against the commits.
    if state.job is not None:
        report.created = state.job.get("created")
        # Rows are known at planning time except for WebDataset tars: then _SUCCESS counts them.
        report.inputs = state.job.get("rows")
        if report.inputs is None and state.success:
            report.inputs = state.success.get("inputs")
        report.max_error_fraction = ((state.job.get("config") or {}).get("job") or {}).get(
            "max_error_fraction"
        )
    rows_of = {s.file.name: s.rows for s in readable}
    report.units_planned = state.units
    report.units_committed = len(state.commits)
    if state.units is not None:
        report.missing_units = [i for i in range(state.units) if i not in state.commits]
    for index, commit in sorted(state.commits.items()):
        present = [name for name, _ in commit.files if name in rows_of]
        if len(present) == len(commit.files):
            rows = sum(rows_of[name] for name in present)
            if rows != commit.rows:
                report.short_units.append({"unit": index, "rows": rows, "expected": commit.rows})
    report.state = _verdict(state, report)
    return report


def _verdict(state: CommitState, report: OutputReport) -> OutputState:
    """The state, and the problems that explain it (appended to ``report.problems``)."""
    problems = report.problems
    if state.job is None and not state.data_files and not state.temporary:
        if state.other:
            problems.append(f"no {JOB_FILE} and no data file: not an output of the job")
        return "empty"
    if report.missing_units:
        shown = ", ".join(map(str, report.missing_units[:10])) + (
            " ..." if len(report.missing_units) > 10 else ""
        )
        problems.append(
            f"{len(report.missing_units)} of {report.units_planned} planned units are not committed ({shown})"
        )
    for short in report.short_units:
        problems.append(
            f"unit {short['unit']} holds {short['rows']} rows, its commit record says {short['expected']}"
        )
    if report.missing_files:
        problems.append(
            f"{len(report.missing_files)} file(s) named by commit records are missing "
            f"({', '.join(report.missing_files[:5])})"
        )
    if report.uncommitted_files:
        problems.append(
            f"{len(report.uncommitted_files)} data file(s) of uncommitted units "
            f"({', '.join(report.uncommitted_files[:5])}): left by an interrupted run (--resume rewrites them)"
        )
    for bad in report.unreadable_files:
        problems.append(f"{bad['file']} cannot be read: {bad['error']}")
    if state.temporary:
        problems.append(
            f"{len(state.temporary)} temporary file(s) of unfinished writes ({', '.join(report.temporary_files[:5])}): "
            "a job is writing here, or one stopped mid-unit (--resume removes them)"
        )
    if report.unplanned_files:
        problems.append(f"data files outside the plan: {', '.join(report.unplanned_files[:5])}")
    if state.job is None:
        problems.append(
            f"no {JOB_FILE}: not written by the job (or its record was removed); the plan is unknown"
        )
        return "unknown"
    incomplete = bool(
        report.missing_units
        or report.short_units
        or report.missing_files
        or report.uncommitted_files
        or report.unreadable_files
        or state.temporary
    )
    if incomplete:
        if state.success is not None:
            problems.append(
                f"{SUCCESS_FILE} is there, but files were removed or changed after the job finished"
            )
        return "incomplete"
    if state.success is not None:
        return "complete"
    budget = report.max_error_fraction
    if budget is not None and report.error_fraction > budget:
        problems.append(
            f"{report.error_fraction:.2%} of the inputs failed, above the job's max_error_fraction {budget:.2%}: "
            f"the job wrote every row but no {SUCCESS_FILE} (to accept: --max-error-fraction and --resume)"
        )
        return "failed"
    problems.append(
        f"every unit is committed but there is no {SUCCESS_FILE}: the job is finishing, or it stopped "
        "before writing it (--resume finishes it)"
    )
    return "incomplete"
