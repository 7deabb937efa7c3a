"""The feature table: the product's deliverable, a Delta Lake table of features, owned here alone.

Everything about an output lives in this package and nothing else opens a file in one: the layout
(:mod:`~.layout`), the row model (:mod:`~.rows`), the schema and the table's identity
(:mod:`~.schema`), tensor columns (:mod:`~.tensors`), writing data files (:mod:`~.files`), the
transaction log (:mod:`~.log`), run leases (:mod:`~.lease`), the write protocol of a run
(:mod:`~.run`), reading (:mod:`~.reader`) and inspecting (:mod:`~.inspect`). It knows no model and
no Ray: tasks write data files with :class:`WriteTarget`, the driver commits them with a
:class:`TableRun`.

A snapshot of the log is the truth: what it holds is committed, exactly once; nothing else counts.
"""

from __future__ import annotations

from .files import DataFile, build_batch
from .ids import IdSet
from .inspect import TableReport, inspect_table
from .layout import SUCCESS_FILE
from .location import TableLocation
from .log import Segment, TableState
from .reader import FeatureSet, open_table, read_features
from .rows import STATUS_ERROR, STATUS_OK, InputRows
from .run import Committer, Outcome, PlannedUnit, RunPlan, TableRun, TableWriter, WriteTarget
from .schema import CARRIED_TYPES, OUTPUT_COLUMNS, TableIdentity, TableSpec
from .tensors import RaggedRows, TensorSpec

__all__ = [
    "CARRIED_TYPES",
    "OUTPUT_COLUMNS",
    "STATUS_ERROR",
    "STATUS_OK",
    "SUCCESS_FILE",
    "Committer",
    "DataFile",
    "FeatureSet",
    "IdSet",
    "InputRows",
    "Outcome",
    "PlannedUnit",
    "RaggedRows",
    "RunPlan",
    "Segment",
    "TableIdentity",
    "TableLocation",
    "TableReport",
    "TableRun",
    "TableSpec",
    "TableState",
    "TableWriter",
    "TensorSpec",
    "WriteTarget",
    "build_batch",
    "inspect_table",
    "open_table",
    "read_features",
]
