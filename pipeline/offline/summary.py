"""What the offline job reports, as typed values: a run's summary, a dry run, a progress snapshot.

The job returns these; the command line renders them (``llava_features.render``). Plain
dataclasses: no Ray, no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..storage import InputPlan

__all__ = ["DryRun", "JobSummary", "Progress", "WriteMode"]

WriteMode = Literal["create", "resume", "append"]
"""How the job treats an existing table: refuse it, continue its last plan (``--resume``), or add the
inputs it does not hold yet (``--append``)."""


@dataclass
class JobSummary:
    """What a run did, and what the table holds of its plan."""

    output: str
    """Where the table is (local paths absolute)."""
    fingerprint: str
    """Encoder fingerprint of every row of the table."""
    input: str = ""
    """What was read (local paths absolute)."""
    input_kind: str = ""
    """``images``, ``manifest``, ``webdataset`` or ``parquet``."""
    mode: WriteMode = "create"
    """How the run treated the output: a new table, a ``--resume``, an ``--append``."""
    inputs: int = 0
    """Rows of the plan in the table (including units committed by earlier runs)."""
    read: int = 0
    """Input rows processed by this run."""
    ok: int = 0
    """Rows of the plan with status ok."""
    errors: dict[str, int] = field(default_factory=dict)
    """Error rows of the plan by error code."""
    units_total: int = 0
    """Units in the plan (the unit of resume)."""
    units_written: int = 0
    """Units committed by this run."""
    units_skipped: int = 0
    """Units the table held already (``--resume``, ``--append``)."""
    files_total: int = 0
    """Data files of the plan in the table."""
    files_written: int = 0
    """Data files written by this run."""
    bytes_written: int = 0
    """Bytes of the data files written by this run."""
    seconds: float = 0.0
    """Wall time of this run's pipeline."""
    images_per_s: float = 0.0
    """Input rows processed by this run per second of its pipeline."""
    error_fraction: float = 0.0
    """Error rows / rows of the plan."""
    max_error_fraction: float = 0.0
    """The error budget this run's decision was made with."""
    error_budget_exceeded: bool = False
    """True when error_fraction > max_error_fraction (the table is then ``failed``, without _SUCCESS)."""
    state: str = ""
    """The table's state after the run: ``complete`` or ``failed``; ``interrupted`` when the run stopped
    before every unit was committed (``--resume`` continues)."""
    version: int = 0
    """The table's version after the run."""
    up_to_date: bool = False
    """True when the table held every unit already and the run wrote nothing."""
    recorded: dict[str, Any] | None = None
    """With ``up_to_date``: the totals the run that finished the table recorded (budget, counts)."""


@dataclass
class DryRun:
    """What ``encode --dry-run`` reports: the plan, the output it would write, and the output's state."""

    plan: InputPlan
    output: str
    plan_seconds: float
    bytes_per_row: int
    """Feature bytes per ok row (tokens × dim × itemsize of each stored tensor, + pooled)."""
    feature_shapes: dict[str, list[int]]
    output_state: str
    plan_peak_rss_mb: float | None = None
    """The driver's peak resident memory when planning ended (before the model is loaded)."""
    serve_app: str | None = None
    """``job.serve_app``: the Serve application whose replicas would encode (not asked: no Ray)."""

    @property
    def estimated_bytes(self) -> int:
        """Feature bytes of the rows the plan knows (a lower bound when some rows are unknown)."""
        return self.plan.known_rows * self.bytes_per_row


@dataclass(frozen=True)
class Progress:
    """A running job at one moment (this run's work: units the table held already are not in it)."""

    images: int
    """Input rows in the data files written so far."""
    images_planned: int | None
    """Input rows of the units this run writes (None when some are only known once read: tars)."""
    ok: int
    errors: dict[str, int]
    """Error rows so far, by code."""
    files: int
    """Data files written."""
    bytes_written: int
    units_committed: int
    units_planned: int
    """Units this run writes."""
    elapsed_s: float
    images_per_s: float
    """Rows per second over the last minute (the whole run when shorter)."""
    eta_s: float | None
    """Seconds left at that rate (None until known)."""
    idle_s: float
    """Seconds since a file was written or a unit committed."""
    done: bool = False
    """The last snapshot of the run."""

    @property
    def fraction(self) -> float:
        """How much of this run's work is done, from 0 to 1 (by rows when known, else by units)."""
        if self.images_planned:
            return min(1.0, self.images / self.images_planned)
        return self.units_committed / self.units_planned if self.units_planned else 1.0
