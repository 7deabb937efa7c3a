"""How fast, and in how much memory, the job plans large inputs: ``encode --dry-run`` at scale.

Generates, on local disk, a manifest of ``rows`` ``uri`` rows split into ``manifest_files`` Parquet
files (one row group each; only the ``uri`` column, which is all a manifest needs) and ``tars``
empty ``.tar`` files named like WebDataset shards (the planner lists tars, it never opens one:
their size does not change the plan). Each case runs in a fresh process
(``python -m pipeline.bench.plan --child``) doing what ``llava-features encode --dry-run`` does
(:func:`pipeline.offline.dry_run`), and reports

- ``plan_s`` and ``plan_peak_rss_mb``: the planning itself (listing, footers, the row check of
  manifests, the unit list and its fingerprint), with the process's peak RSS when it ends —
  what the targets are about (≤ 30 s / 600 MB for 10⁷ manifest rows in 100 files, ≤ 10 s /
  300 MB for 10⁴ tars);
- ``command_s`` and ``command_peak_rss_mb``: the whole dry run (interpreter start, the model's
  resolution with torch and transformers, the output check).

Peak RSS is the process's ``VmHWM`` (:func:`pipeline.memory.peak_rss_mb`): ``ru_maxrss`` of a child
started with ``fork`` + ``exec`` counts the parent's memory too.

Run it with ``llava-features bench plan --tiny`` (``--opt rows=1000000`` etc. for other sizes,
``--opt workdir=DIR`` to keep and reuse the generated inputs).
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

__all__ = ["TARGETS", "PlanOptions", "bench_plan", "write_manifests", "write_tars"]


@dataclass(frozen=True)
class PlanOptions(BenchOptions):
    """Options of ``bench plan``: the sizes of the generated inputs."""

    SECTION: ClassVar[str] = "bench.plan"

    rows: int = setting(10_000_000, ge=1)
    """Rows of the generated manifest."""
    manifest_files: int = setting(100, ge=1)
    """Parquet files the manifest is split into."""
    tars: int = setting(10_000, ge=1)
    """Empty WebDataset-named tar files generated."""
    workdir: str | None = None
    """Keep (and reuse) the generated inputs here (default: a temporary folder, removed)."""


TARGETS = {
    "manifest": {"plan_s": 30.0, "plan_peak_rss_mb": 600.0},
    "webdataset": {"plan_s": 10.0, "plan_peak_rss_mb": 300.0},
}
"""The targets of the planning figures, by case."""


def write_manifests(folder: Path, rows: int, files: int) -> Path:
    """``files`` Parquet manifests of ``rows`` ``uri`` rows in all (kept when they are there already)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    per = -(-rows // files)
    for f in range(files):
        path = folder / f"part-{f:05d}.parquet"
        lo, hi = f * per, min(rows, (f + 1) * per)
        if path.exists() and pq.read_metadata(path).num_rows == hi - lo:
            continue
        uris = pa.array([f"s3://laion-400m/images/{f:05d}/{i:09d}.jpg" for i in range(lo, hi)])
        pq.write_table(pa.table({"uri": uris}), path, row_group_size=max(1, hi - lo))
    return folder


def write_tars(folder: Path, tars: int) -> Path:
    """``tars`` empty files ``00000.tar``, ``00001.tar``, ... (kept when they are there already)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(tars):
        path = folder / f"{i:05d}.tar"
        if not path.exists():
            path.touch()
    return folder


def _run_child(config_file: Path, input_uri: str, output: Path) -> dict[str, Any]:
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.bench.plan", "--child", str(config_file), input_uri, str(output)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"dry run of {input_uri} failed ({proc.returncode}): {stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["command_s"] = seconds
    return result


def bench_plan(config: Config, options: PlanOptions) -> dict[str, Any]:
    """Plan a ``rows``-row manifest in ``manifest_files`` Parquet files and ``tars`` tar shards, each in
    a fresh process; returns ``{"cases": {case: figures}, "targets": {...}}`` (see the module docstring)."""
    from ..config import config_to_dict

    rows, manifest_files, tars, workdir = options.rows, options.manifest_files, options.tars, options.workdir
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="llava-bench-plan-"))
    try:
        root.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        inputs = {
            "manifest": write_manifests(root / "manifests", rows, manifest_files),
            "webdataset": write_tars(root / "tars", tars),
        }
        generated_s = time.perf_counter() - started
        config_file = root / "config.json"
        config_file.write_text(json.dumps(config_to_dict(config)))
        cases: dict[str, Any] = {}
        for case, folder in inputs.items():
            figures = _run_child(config_file, str(folder), root / f"out-{case}")
            figures["targets"] = TARGETS[case]
            figures["met"] = all(figures[k] <= v for k, v in TARGETS[case].items())
            cases[case] = figures
        return {
            "rows": rows,
            "manifest_files": manifest_files,
            "tars": tars,
            "generate_s": generated_s,
            "cases": cases,
            "targets_met": all(c["met"] for c in cases.values()),
        }
    finally:
        if not workdir:
            shutil.rmtree(root, ignore_errors=True)


def _child(config_file: str, input_uri: str, output: str) -> None:
    from ..config import load_config
    from ..memory import peak_rss_mb
    from ..offline import dry_run

    values = json.loads(Path(config_file).read_text())
    config = load_config(None, values)
    report = dry_run(config, input_uri, output)
    plan = report.plan
    print(
        json.dumps(
            {
                "kind": plan.kind,
                "files": plan.files,
                "units": len(plan.units),
                "rows": plan.rows,
                "plan_s": report.plan_seconds,
                "plan_peak_rss_mb": report.plan_peak_rss_mb,
                "command_peak_rss_mb": peak_rss_mb(),
            }
        )
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(*sys.argv[2:])
    else:
        print("usage: llava-features bench plan --tiny [--opt rows=N] ...", file=sys.stderr)
        sys.exit(2)
