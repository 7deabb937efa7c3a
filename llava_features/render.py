"""What ``llava-features encode`` prints: the job's typed values as text (the job renders nothing).

:func:`summary_text` (a run's summary, also of a run that stopped early), :func:`dry_run_text`
(``--dry-run``), :func:`progress_line` and :class:`ProgressPrinter` (the progress of a running job: a
line every ``job.progress_interval_s`` on a log or pipe, a bar redrawn in place in a terminal).
"""

from __future__ import annotations

import time
from typing import IO, Any

from pipeline.memory import human_bytes

__all__ = ["ProgressPrinter", "dry_run_text", "progress_line", "summary_text"]

BAR_WIDTH = 24


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _errors(errors: dict[str, int]) -> str:
    total = sum(errors.values())
    if not total:
        return "errors 0"
    return f"errors {total} (" + ", ".join(f"{code} {n}" for code, n in sorted(errors.items())) + ")"


def progress_line(p: Any) -> str:
    """One line of a running job's :class:`~pipeline.offline.Progress`."""
    if p.images_planned is not None:
        images = f"{p.images}/{p.images_planned} images ({p.fraction:.1%})"
    else:
        images = f"{p.images} images ({p.fraction:.1%} of the units)"
    eta = "done" if p.done else (f"ETA {_duration(p.eta_s)}" if p.eta_s is not None else "ETA unknown")
    parts = [
        images,
        f"{p.images_per_s:.1f} images/s",
        eta,
        _errors(p.errors),
        f"units {p.units_committed}/{p.units_planned} committed",
        f"{p.files} files, {human_bytes(p.bytes_written)}",
    ]
    if not p.done and p.idle_s >= 60:
        parts.append(f"nothing new for {_duration(p.idle_s)}")
    return "progress: " + " · ".join(parts)


class ProgressPrinter:
    """The job's progress callback for the command line: in a terminal one bar redrawn in place, else a
    line every ``interval_s`` (and the last one)."""

    def __init__(self, stream: IO[str], *, interval_s: float, terminal: bool | None = None) -> None:
        self.stream = stream
        self.interval_s = interval_s
        self.terminal = stream.isatty() if terminal is None else terminal
        self._last = -float("inf")
        self._drawn = False

    def __call__(self, p: Any) -> None:
        if self.terminal:
            filled = int(BAR_WIDTH * p.fraction)
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            self.stream.write(f"\r[{bar}] {progress_line(p).removeprefix('progress: ')}\x1b[K")
            self._drawn = True
            if p.done:
                self.close()
            self.stream.flush()
            return
        now = time.monotonic()
        if p.done or now - self._last >= self.interval_s:
            self._last = now
            self.stream.write(progress_line(p) + "\n")
            self.stream.flush()

    def close(self) -> None:
        """End the bar's line (a terminal)."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def summary_text(s: Any) -> str:
    """A run's :class:`~pipeline.offline.JobSummary` (a run that stopped early says what it did)."""
    errs = ", ".join(f"{code}: {n}" for code, n in sorted(s.errors.items())) or "none"
    stopped = s.state == "interrupted"
    skipped = {"create": "", "resume": " already committed", "append": " already in the table"}[s.mode]
    lines = [
        f"input:         {s.input} ({s.input_kind})",
        f"images read:   {s.read} this run" + ("" if stopped else f" ({s.inputs} in the plan)"),
        f"ok:            {s.ok}" + (" this run" if stopped else ""),
        f"errors:        {sum(s.errors.values())} ({errs})" + (" this run" if stopped else ""),
        f"units:         {s.units_written} written, {s.units_skipped}{skipped or ' skipped'}, "
        f"{s.units_total} in total",
        f"files:         {s.files_written} written"
        + ("" if stopped else f", {s.files_total} in the table for this plan"),
        f"throughput:    {s.images_per_s:.1f} images/s ({s.seconds:.1f} s)",
        f"output:        {s.output} (Delta table version {s.version}, {s.state})",
        f"fingerprint:   {s.fingerprint[:16]}",
    ]
    if s.up_to_date and s.mode == "append" and not s.units_total:
        lines.append("up to date:    the table holds every input already; nothing was appended")
    elif s.up_to_date:
        if s.recorded is not None and s.recorded.get("max_error_fraction") != s.max_error_fraction:
            lines.append(
                "up to date:    every unit was committed already; the table is left as its last run recorded "
                f"it (max_error_fraction {s.recorded.get('max_error_fraction')})"
            )
        else:
            lines.append("up to date:    every unit was committed already; nothing was encoded again")
    if s.error_budget_exceeded:
        lines.append(
            f"ERROR BUDGET EXCEEDED: {s.error_fraction:.2%} of inputs failed "
            f"(max_error_fraction {s.max_error_fraction:.2%})"
        )
    return "\n".join(lines)


def dry_run_text(d: Any) -> str:
    """What ``encode --dry-run`` prints of a :class:`~pipeline.offline.DryRun`."""
    plan = d.plan
    rows = (
        f"{plan.rows}"
        if plan.rows is not None
        else (f"{plan.known_rows} known; {plan.unknown_units} unit(s) counted when read")
    )
    shards = plan.shards()
    shapes = ", ".join(f"{k} {v}" for k, v in d.feature_shapes.items())
    size = human_bytes(d.estimated_bytes) + (
        "" if plan.rows is not None else " + the rows of the unknown units"
    )
    source = human_bytes(plan.source_bytes) if plan.source_bytes is not None else "unknown"
    encoders = (
        f"the replicas of Serve application {d.serve_app!r} (its fingerprint is checked when the job starts)"
        if d.serve_app
        else "the job's own actor pool"
    )
    peak = f", driver peak RSS {d.plan_peak_rss_mb:.0f} MB)" if d.plan_peak_rss_mb else ")"
    return "\n".join(
        [
            f"input:         {plan.input} ({plan.kind}: {plan.files} file(s), {source})",
            f"units:         {len(plan.units)}",
            f"rows:          {rows}",
            f"shards:        {shards if shards is not None else 'at least ' + str(len(plan.units))} "
            f"(up to {plan.shard_size} rows each)",
            f"features:      {shapes} ({human_bytes(d.bytes_per_row)} per row)",
            f"output bytes:  ~{size}",
            f"carried:       {', '.join(f'{c} ({t})' for c, t in plan.carried.items()) or 'none'}",
            f"output:        {d.output} ({d.output_state})",
            f"encoders:      {encoders}",
            f"plan:          {plan.fingerprint[:16]} (planned in {d.plan_seconds:.2f} s{peak}",
        ]
    )
