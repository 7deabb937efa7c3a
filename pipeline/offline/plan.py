"""Planning the job and its dry run: the input plan, the output location, the units as the table sees
them, and ``encode --dry-run`` (no Ray, nothing written).

The driver plans units, never images (:func:`pipeline.storage.plan_inputs`); the plan is made before
the model (and torch) is loaded, so the planning's peak memory is its own (``bench plan`` measures it).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import TYPE_CHECKING

from ..config import Config
from ..memory import peak_rss_mb, release_free_memory
from ..model.errors import ConfigError, LlavaFeaturesError
from ..storage import InputOptions, InputPlan, absolute_uri, split_uri
from ..table import PlannedUnit, RunPlan, TableLocation, TableWriter
from .summary import DryRun, WriteMode

if TYPE_CHECKING:  # torch is imported when the model is resolved, after planning
    from ..model import ResolvedModel

logger = logging.getLogger(__name__)

__all__ = [
    "RAY_JOB_CONFIG_ENV",
    "dry_run",
    "feature_bytes",
    "held_units",
    "make_plan",
    "output_location",
    "planned_units",
    "resolve_output",
    "run_plan",
]

RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor for the driver of a submitted job: its runtime environment (as JSON),
whose ``working_dir`` says the driver runs in a temporary copy of the submitted folder."""


def make_plan(config: Config, input_uri: str) -> InputPlan:
    """The input plan of ``config`` for ``input_uri`` (:func:`pipeline.storage.plan_inputs`)."""
    from ..storage import plan_inputs
    from ..table import OUTPUT_COLUMNS

    clash = sorted(set(config.input.keep_columns) & OUTPUT_COLUMNS)
    if clash:
        raise ConfigError(f"input.keep_columns {clash}: the output has column(s) of that name already")
    i, job = config.input, config.job
    return plan_inputs(
        input_uri,
        options=InputOptions(i.format, i.image_column, i.id_column, i.keep_columns),
        shard_size=job.shard_size,
        limit=job.limit,
        s3_endpoint=job.s3_endpoint,
        timeout_s=job.read_timeout_s,
    )


def planned_units(plan: InputPlan) -> list[PlannedUnit]:
    """The plan's units as the table sees them: index, content key, input rows."""
    return [PlannedUnit(u.index, key, u.rows) for u, key in zip(plan.units, plan.unit_keys(), strict=True)]


def held_units(plan: InputPlan, committed: set[str]) -> set[str]:
    """The unit keys of ``plan`` (full digests, as :meth:`InputPlan.without` takes them) of the units a
    table holds: ``committed`` is the snapshot's keys, which keep a key's first digits only."""
    return {key for key in plan.unit_keys() if PlannedUnit(0, key).key in committed}


def run_plan(plan: InputPlan, source: InputPlan | None = None) -> RunPlan:
    """The plan a run writes, as the table records it (``source``: an append's whole input plan)."""
    return RunPlan(
        plan=plan.fingerprint,
        input=plan.input,
        input_kind=plan.kind,
        units=len(plan.units),
        rows=plan.rows,
        source_plan=source.fingerprint if source is not None else "",
    )


def ray_job_working_dir() -> str | None:
    """The ``working_dir`` of the Ray job this driver runs in (``ray job submit --working-dir``), if any."""
    raw = os.environ.get(RAY_JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        runtime_env = (json.loads(raw) or {}).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    working_dir = runtime_env.get("working_dir") if isinstance(runtime_env, dict) else None
    return str(working_dir) if working_dir else None


def resolve_output(output_uri: str) -> str:
    """``output_uri`` with a local path made absolute on the driver. Raises ConfigError for a relative
    local path when the driver runs inside a Ray job's working directory: Ray deletes that folder
    (with everything written into it) when the job ends."""
    raw = output_uri.strip()
    scheme, _ = split_uri(raw)
    if scheme == "local":
        written = raw[len("file://") :] if raw.lower().startswith("file://") else raw
        if not os.path.isabs(os.path.expanduser(written)):
            working_dir = ray_job_working_dir()
            if working_dir is not None:
                raise ConfigError(
                    f"--output {output_uri!r} is a relative path, and this driver runs in the temporary copy of "
                    f"the job's working directory that Ray made ({os.getcwd()}, from {working_dir}) and deletes "
                    "when the job ends: the features would be lost. Give an absolute path on storage that "
                    "outlives the job (a shared filesystem), or an s3:// / gs:// URI."
                )
    return absolute_uri(raw) if scheme == "local" else raw.rstrip("/")


def output_location(config: Config, output_uri: str) -> TableLocation:
    """The table location of ``--output`` (local paths absolute, see :func:`resolve_output`)."""
    return TableLocation(resolve_output(output_uri), s3_endpoint=config.job.s3_endpoint)


def feature_bytes(config: Config, resolved: ResolvedModel) -> tuple[int, dict[str, list[int]]]:
    """Bytes per ok row of the stored features, and their shapes by column."""
    from ..encoder import output_dtype_name

    itemsize = 4 if output_dtype_name(config) == "float32" else 2
    tokens = resolved.num_tokens
    shapes: dict[str, list[int]] = {}
    if config.encoder.features in ("projected", "both"):
        shapes["features"] = [tokens, resolved.feature_dim]
    if config.encoder.features in ("tower", "both"):
        shapes["tower_features"] = [tokens, resolved.mm_hidden_size]
    total = sum(a * b * itemsize for a, b in shapes.values())
    if config.encoder.pooled:
        first = next(iter(shapes.values()))
        shapes["pooled"] = [first[1]]
        total += 4 * first[1]
    return total, shapes


def dry_run(config: Config, input_uri: str, output_uri: str, *, mode: WriteMode = "create") -> DryRun:
    """Plan the job and describe what it would write, without starting Ray or writing anything.

    The plan is made first, before the model (and torch) is loaded to know the feature shapes: the
    planning's peak memory is its own (``bench plan`` measures it).
    """
    location = output_location(config, output_uri)
    started = time.perf_counter()
    plan = make_plan(config, input_uri)
    plan_seconds = time.perf_counter() - started
    plan_rss = peak_rss_mb()
    release_free_memory()  # the heap planning freed, before torch is loaded
    from ..encoder import describe_encoder  # torch and transformers from here on
    from ..model import resolve_model
    from ..shards import table_identity

    resolved = resolve_model(config.model)
    per_row, shapes = feature_bytes(config, resolved)
    identity = table_identity(
        config, resolved, describe_encoder(config, resolved), carried=dict(plan.carried)
    )
    try:
        writer = TableWriter.open(location, identity=identity, mode=mode)
    except LlavaFeaturesError as exc:
        state = f"the job would refuse it: {exc.message}"
    else:
        if writer.snapshot is None:
            state = "empty: a new table"
        else:
            done = writer.snapshot.committed_keys()
            if mode == "append":
                plan = plan.without(writer.existing_ids().contains, held_units(plan, done))
            held = sum(u.key in done for u in planned_units(plan))
            verb = {"resume": "--resume continues it", "append": "--append adds the rest"}.get(mode, "")
            state = f"a table (version {writer.snapshot.version}); {held} of {len(plan.units)} unit(s) of this plan in it: {verb}"
    return DryRun(
        plan=plan,
        output=location.uri,
        plan_seconds=plan_seconds,
        bytes_per_row=per_row,
        feature_shapes=shapes,
        output_state=state,
        plan_peak_rss_mb=plan_rss,
        serve_app=config.job.serve_app,
    )
