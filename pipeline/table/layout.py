"""How a feature table is laid out and named: the one place that knows a table's paths.

A table is a folder (local path, ``s3://`` or ``gs://`` prefix)::

    <table>/_delta_log/00000000000000000000.json     the Delta transaction log: the truth
    <table>/_delta_log/...checkpoint.parquet         its checkpoints
    <table>/part-s001-u000012-p00000-k<key>-r<run>.parquet   a data file
    <table>/.part-...parquet.<hex>.tmp               (local only) a data file being written
    <table>/_llava_features/runs/<run>.json          a run's lease (host, pid, heartbeat)
    <table>/_SUCCESS                                  convenience marker, written last when complete

A data file's name says what it holds and who wrote it: ``s`` the segment (1 for the first job, one
more for each ``--append``), ``u`` the unit of that segment's plan, ``p`` the piece within the unit
(a unit may write several files), ``k`` the unit's content key (what it reads; the same unit of
another plan has the same key) and ``r`` the run (one process) that wrote it. Only files that a
commit of the log references are part of the table; the others are a running job's files in flight,
or orphans of an interrupted run.

Outputs of earlier versions (``_job.json`` + ``_commits/``) are recognised by :data:`LEGACY_MARKERS`.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = [
    "DELTA_LOG_DIR",
    "LEGACY_MARKERS",
    "RUNS_DIR",
    "SUCCESS_FILE",
    "DataFileName",
    "temp_name",
    "unit_app_id",
]

TABLE_FORMAT = 2
"""Version of this layout, recorded in the table's identity (1 was the ``_commits/`` layout)."""
DELTA_LOG_DIR = "_delta_log"
"""The Delta transaction log folder."""
META_DIR = "_llava_features"
"""Our own folder in a table (Delta readers ignore names starting with ``_``)."""
RUNS_DIR = f"{META_DIR}/runs"
"""Run leases: ``<run>.json``, rewritten by a running job's driver every few seconds."""
SUCCESS_FILE = "_SUCCESS"
"""Written last when a job completes the table (for Hadoop-style tools; the log is the truth)."""
LEGACY_MARKERS = ("_job.json", "_commits")
"""Files of the layout before the Delta table (``_commits/unit-NNNNNN.json`` commit records)."""
IDENTITY_KEY = "llava_features_table"
"""Key of the table's identity (the JSON in the Delta metadata's ``description``): its layout version."""
COMMIT_KEY = "llava-features"
"""Key of our record in a commit's ``commitInfo`` (JSON: the run, its segment, what it committed)."""
TXN_PREFIX = "llava-features/unit/"
"""Application-transaction id of a committed unit (+ its key): two commits of one unit conflict."""

KEY_HEX = 20
"""Hex digits of a unit key in names (80 bits)."""
RUN_HEX = 8
"""Hex digits of a run id."""

DATA_FILE_PATTERN = re.compile(
    rf"^part-s(\d{{3,}})-u(\d{{6,}})-p(\d{{5,}})-k([0-9a-f]{{{KEY_HEX}}})-r([0-9a-f]{{{RUN_HEX}}})\.parquet$"
)
"""A data file's name (groups: segment, unit, piece, key, run)."""
KEY_SLICE = (-(KEY_HEX + RUN_HEX + len("-r.parquet")), -(RUN_HEX + len("-r.parquet")))
"""Where a data file's name holds its unit key, counted from its end (the key and the run are fixed-width)."""
_TEMP_FILE = re.compile(r"^\.(part-.+\.parquet)\.[0-9a-f]+\.tmp$")


class DataFileName(NamedTuple):
    """What a data file's name says (:meth:`parse` reads it, :meth:`name` writes it). A tuple: tables
    hold hundreds of thousands of files, and their names are parsed at every snapshot."""

    segment: int
    unit: int
    piece: int
    key: str
    run: str

    def name(self) -> str:
        if min(self.segment, self.unit, self.piece) < 0:
            raise ValueError(f"negative segment, unit or piece in {self}")
        if len(self.key) != KEY_HEX or len(self.run) != RUN_HEX:
            raise ValueError(f"a data file needs a {KEY_HEX}-digit key and a {RUN_HEX}-digit run, got {self}")
        return f"part-s{self.segment:03d}-u{self.unit:06d}-p{self.piece:05d}-k{self.key}-r{self.run}.parquet"

    @classmethod
    def parse(cls, name: str) -> DataFileName | None:
        """The parts of a data file's name (a bare name, or a path: its last part); None for other names."""
        match = DATA_FILE_PATTERN.match(name.rsplit("/", 1)[-1])
        if match is None:
            return None
        seg, unit, piece, key, run = match.groups()
        return cls(int(seg), int(unit), int(piece), key, run)

    @property
    def order(self) -> tuple[int, int, int]:
        """Where the file's rows come in the table: segment, then unit, then piece (input order)."""
        return self.segment, self.unit, self.piece


def temp_name(name: str, token: str) -> str:
    """The hidden name a data file is written under on a local filesystem before its rename."""
    return f".{name}.{token}.tmp"


def temp_target(name: str) -> str | None:
    """The data file a temporary name (:func:`temp_name`) was writing; None for other names."""
    match = _TEMP_FILE.match(name.rsplit("/", 1)[-1])
    return match.group(1) if match else None


def unit_app_id(key: str) -> str:
    """The application-transaction id committed with a unit (see :data:`TXN_PREFIX`)."""
    return TXN_PREFIX + key


def lease_path(run: str) -> str:
    """A run's lease, relative to the table."""
    return f"{RUNS_DIR}/{run}.json"
