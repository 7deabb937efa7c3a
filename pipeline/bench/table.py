"""What the feature table's log costs at scale: commits, snapshot loads, and planning a resume.

For each size (10⁴ and 10⁵ units by default) it generates a Parquet manifest of that many rows and
plans it with ``shard_size`` 1 (one unit per row: the plan's units are the table's), then, each step
in a fresh process (``python -m pipeline.bench.table --child ...``):

- ``commit``: claims a table and commits one data file per unit through the driver's committer
  (:class:`pipeline.table.Committer`, batches of ``job.commit_max_units``, each unit with its
  application transaction), then records the segment's end (:meth:`pipeline.table.TableRun.finish`).
  The data files are not written (their add actions name files that are not there): this is the
  log's cost alone. Reports ``commits``, ``commit_s``, ``commits_per_s``, ``s_per_1000_units`` and
  ``finish_s``.
- ``snapshot``: loads the table's latest snapshot (:func:`pipeline.table.log.load_snapshot`) and the
  set of committed unit keys: ``load_s`` and the process's peak RSS.
- ``resume``: what ``llava-features encode --resume --dry-run`` does (plan the input, resolve the model,
  open the table, find the pending units): ``resume_s`` and ``resume_peak_rss_mb`` — the targets are
  about this one (≤ 30 s and ≤ 1 GB of driver memory for 10⁵ units).

Peak RSS is the process's ``VmHWM`` (:func:`pipeline.memory.peak_rss_mb`). Run it with
``llava-features bench table --tiny`` (``--opt sizes=[10000]`` for other sizes).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..measure.options import BenchOptions
from ..model.config import setting

if TYPE_CHECKING:
    from ..config import Config

logger = logging.getLogger(__name__)

__all__ = ["TARGETS", "TableOptions", "bench_table"]


@dataclass(frozen=True)
class TableOptions(BenchOptions):
    """Options of ``bench table``."""

    SECTION: ClassVar[str] = "bench.table"

    sizes: tuple[int, ...] = setting((10_000, 100_000), ge=1)
    """Units of each table measured (one unit per manifest row)."""
    workdir: str | None = None
    """Keep the generated manifests here (default: a temporary folder, removed); the tables are removed."""


TARGETS = {"resume_s": 30.0, "resume_peak_rss_mb": 1024.0}
"""The targets of planning a resume of a table of 10⁵ units."""


def _child_run(step: str, config_file: Path, manifests: Path, output: Path) -> dict[str, Any]:
    started = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.bench.table",
            "--child",
            step,
            str(config_file),
            str(manifests),
            str(output),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench table step {step} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    return result


def bench_table(config: Config, options: TableOptions) -> dict[str, Any]:
    """Commit, load and resume tables of each of ``sizes`` units; returns ``{"cases": {units: figures}}``
    (see the module docstring)."""
    from dataclasses import replace

    from ..config import config_to_dict
    from .plan import write_manifests

    sizes, workdir = options.sizes, options.workdir
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="llava-bench-table-"))
    config = replace(config, job=replace(config.job, shard_size=1))
    try:
        root.mkdir(parents=True, exist_ok=True)
        config_file = root / "config.json"
        config_file.write_text(json.dumps(config_to_dict(config)))
        cases: dict[str, Any] = {}
        for units in sizes:
            manifests = write_manifests(root / f"manifests-{units}", units, max(1, units // 50_000))
            output = root / f"table-{units}"
            shutil.rmtree(output, ignore_errors=True)
            figures: dict[str, Any] = {"units": units}
            for step in ("commit", "snapshot", "resume"):
                figures[step] = _child_run(step, config_file, manifests, output)
            resume = figures["resume"]
            figures["met"] = units < 100_000 or all(resume[k] <= v for k, v in TARGETS.items())
            cases[str(units)] = figures
            shutil.rmtree(output, ignore_errors=True)
        return {"commit_max_units": config.job.commit_max_units, "targets": TARGETS, "cases": cases}
    finally:
        if not workdir:
            shutil.rmtree(root, ignore_errors=True)


def _commit(config: Any, manifests: str, output: str) -> dict[str, Any]:
    from ..model import resolve_model
    from ..offline import make_plan, new_table_run, planned_units
    from ..table import DataFile

    plan = make_plan(config, manifests)
    units = planned_units(plan)
    run = new_table_run(config, plan, output, resolved=resolve_model(config.model))
    target = run.target()
    committer = run.committer(
        {u.index: u for u in units}, interval_s=3600.0, max_units=config.job.commit_max_units
    )
    started = time.perf_counter()
    for u in units:
        name = target.file_name(unit=u.index, piece=0, key=u.key)
        ids = (f"{u.index:09d}", f"{u.index:09d}")
        file = DataFile(name, 4096, 1, {"image_id": 0, "error_code": 1}, {"image_id": ids}, {}, 0)
        committer.add(unit=u.index, piece=0, last=True, file=file, rows=1, ok=1, errors={})
    committer.close()
    commit_s = time.perf_counter() - started
    from ..table.log import refresh

    commits = refresh(run.snapshot).version  # every commit after the claim
    started = time.perf_counter()
    outcome = run.finish(units, max_error_fraction=0.0)
    finish_s = time.perf_counter() - started
    run.close()
    return {
        "commits": commits,
        "commit_s": commit_s,
        "commits_per_s": commits / commit_s,
        "s_per_1000_units": commit_s / len(units) * 1000,
        "finish_s": finish_s,
        "state": outcome.state,
    }


def _snapshot(output: str) -> dict[str, Any]:
    from ..table import TableLocation
    from ..table.log import load_snapshot

    started = time.perf_counter()
    snapshot = load_snapshot(TableLocation(output))
    keys = snapshot.committed_keys()
    return {"load_s": time.perf_counter() - started, "files": len(snapshot.files), "keys": len(keys)}


def _resume(config: Any, manifests: str, output: str) -> dict[str, Any]:
    from ..offline import dry_run

    started = time.perf_counter()
    report = dry_run(config, manifests, output, mode="resume")
    return {
        "resume_s": time.perf_counter() - started,
        "plan_s": report.plan_seconds,
        "state": report.output_state,
    }


def _child(step: str, config_file: str, manifests: str, output: str) -> None:
    from ..config import load_config
    from ..memory import peak_rss_mb

    config = load_config(None, json.loads(Path(config_file).read_text()))
    steps = {
        "commit": lambda: _commit(config, manifests, output),
        "snapshot": lambda: _snapshot(output),
        "resume": lambda: _resume(config, manifests, output),
    }
    result = steps[step]()
    result[f"{step}_peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        _child(*sys.argv[2:])
    else:
        print("usage: llava-features bench table --tiny [--opt sizes=[10000]]", file=sys.stderr)
        sys.exit(2)
