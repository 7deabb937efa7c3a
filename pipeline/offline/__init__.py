"""The offline job: object storage → CPU decode → GPU encoder actor pool → the feature table (Delta Lake).

Plan (driver, metadata only; :mod:`~.plan`, :func:`pipeline.storage.plan_inputs`): list the inputs
and cut them into *units* — groups of listed image files, row ranges of a manifest, WebDataset tars,
row groups of Parquet files of images — in a deterministic order, each with a content key (what it
reads). The plan costs memory in proportion to its units; the driver never reads an image, a tar
member or a Parquet image row. Open the output (:class:`pipeline.table.TableWriter`): a new table,
a ``--resume`` of its last plan, or an ``--append`` of new inputs; anything that would corrupt the
table (another job's, another schema, other values, another plan) is refused before anything is
written. Then Ray (:mod:`~.ray_runtime`), and the preflight (:mod:`~.resources`): the cluster must
hold the minimum encoder actors and a decode task at once, or the job fails fast saying what is
short and which flags fix it.

Run (Ray Data, streaming; :mod:`~.driver`): one row per pending unit → decode tasks
(:mod:`~.decode`), which expand their unit (read bytes, decode guard, preprocess to uint8; bad
inputs become error rows, never exceptions) into one typed :class:`~pipeline.records.DecodedShard`
per output file of ``job.shard_size`` inputs → :class:`~.actors.EncodeShardActor`, an autoscaling
actor pool where each actor holds one :class:`~pipeline.encoder.FeatureEncoder` replica, encodes the
file's ok images in batches and writes the data file itself. Feature tensors never travel back
through the object store or the driver; only a small per-file summary does, which the driver's loop
counts (:mod:`~.progress`, :mod:`~.metrics`, :mod:`~.watchdog`) and the table's committer commits
to the Delta log in batches: a unit's files become visible in one commit, and two runs can never
both commit a unit. A file that is retried (actor killed, node lost) is rewritten under the same
name, so every input row appears exactly once.

With ``job.serve_app`` (``encode --serve-app NAME``) the encode + write stage runs on the encoder
replicas of a running Serve application instead (one GPU pool for both front doors; :mod:`~.pool`).

Finish (:meth:`pipeline.table.TableRun.finish`): every unit of the plan must be in the table with
all its rows; the counts and the error-budget decision are recorded in the log, ``_SUCCESS`` is
written when the table is complete, and files no commit references that this run (or a run that
died) wrote are removed. A run that stops early (stalled, a storage fault, the shared pool gone,
SIGINT/SIGTERM) commits what is ready and raises :class:`~pipeline.model.errors.JobStoppedError`
with its summary; ``--resume`` continues.

Modules: :mod:`~.plan` (plan, output, dry run), :mod:`~.decode` (stage 1), :mod:`~.actors` (stage 2,
the job's pool), :mod:`~.pool` (stage 2, the shared pool's client), :mod:`~.driver` (run_job: the
wiring), :mod:`~.ray_runtime` (starting, reaching, stopping Ray; :mod:`~.reaper`,
:mod:`~.ray_warnings`), :mod:`~.resources` (reservations, preflight), :mod:`~.watchdog`,
:mod:`~.progress`, :mod:`~.metrics`, :mod:`~.results` (the driver's loop), :mod:`~.faults` (how a
run that stops is reported), :mod:`~.summary` (the typed values the job returns). Importing
any of them imports no Ray, torch or deltalake.
"""

from __future__ import annotations

from .driver import new_table_run, run_job
from .faults import budget_error
from .plan import dry_run, make_plan, planned_units
from .summary import DryRun, JobSummary, Progress, WriteMode

__all__ = [
    "DryRun",
    "JobSummary",
    "Progress",
    "WriteMode",
    "budget_error",
    "dry_run",
    "make_plan",
    "new_table_run",
    "planned_units",
    "run_job",
]
