"""How a run that does not end well is reported: the typed error of a run that stopped early (stalled,
a storage fault, the shared pool gone, SIGINT/SIGTERM), and the error of a run over its error budget.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ..config import Config
from ..model.errors import (
    ErrorBudgetExceededError,
    ErrorCode,
    JobStoppedError,
    LlavaFeaturesError,
    one_line,
)
from ..table import SUCCESS_FILE, TableRun
from .summary import JobSummary
from .watchdog import StallError

__all__ = ["budget_error", "causes", "stopped_error"]


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it: ``__cause__``/``__context__`` chains and Ray's wrapped ``cause``."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for nxt in (current.__cause__, current.__context__, getattr(current, "cause", None)):
            if isinstance(nxt, BaseException):
                todo.append(nxt)


def stopped_error(
    exc: BaseException, *, run: TableRun, stall_s: float, diagnose: Callable[[], str]
) -> JobStoppedError | None:
    """The typed error of a run that stopped with ``exc`` (None: not a fault the job reports itself)."""
    keep = (
        f"What was committed is kept ({len(run.committed)} unit(s) of this run): run the same command with "
        "--resume to continue."
    )
    if isinstance(exc, KeyboardInterrupt):
        return JobStoppedError(f"Interrupted ({str(exc) or 'SIGINT'}). {keep}", code=ErrorCode.INTERRUPTED)
    chain = list(causes(exc))
    for cause in chain:
        if isinstance(cause, StallError) or type(cause).__name__ == "ExecutionTimeoutError":
            diagnosis = cause.diagnosis if isinstance(cause, StallError) else diagnose()
            return JobStoppedError(
                f"No data file was written and no unit committed for {stall_s:.0f} s (job.stall_fail_s): "
                f"{diagnosis}. {keep}",
                code=ErrorCode.STALLED,
            )
    for cause in chain:
        if isinstance(cause, JobStoppedError):
            return cause
        if isinstance(cause, LlavaFeaturesError):
            return JobStoppedError(f"{cause.message.rstrip('.')}. {keep}", code=cause.code)
    for cause in chain:
        if isinstance(cause, OSError) or type(cause).__module__.startswith("deltalake"):
            return JobStoppedError(
                f"Writing the table {run.location.uri} failed ({one_line(cause)}). {keep}",
                code=ErrorCode.OUTPUT_WRITE_FAILED,
            )
    return None


def budget_error(summary: JobSummary, config: Config) -> ErrorBudgetExceededError | None:
    """The typed error for a run above ``max_error_fraction`` (None when within budget)."""
    if not summary.error_budget_exceeded:
        return None
    if summary.up_to_date and summary.recorded is not None and summary.state == "complete":
        return ErrorBudgetExceededError(
            f"{summary.error_fraction:.2%} of the inputs failed, above max_error_fraction "
            f"{config.job.max_error_fraction:.2%}; nothing was written (every unit was committed already), and "
            "the table, completed by the run that allowed "
            f"{float(summary.recorded.get('max_error_fraction', 0)):.2%}, is left as it is"
        )
    return ErrorBudgetExceededError(
        f"{summary.error_fraction:.2%} of the inputs failed, above max_error_fraction "
        f"{config.job.max_error_fraction:.2%}; every row was committed and the table is marked failed (no "
        f"{SUCCESS_FILE}). See the failures with `llava-features inspect {summary.output}`; to accept them, raise "
        "the budget with --max-error-fraction F (job.max_error_fraction) and rerun with --resume, which marks "
        "the table complete without encoding anything again"
    )
