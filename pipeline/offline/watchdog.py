"""The job's watchdog: a job that makes no progress says why, and then stops instead of hanging.

Progress is a data file written or a unit committed. When there has been none for
``job.stall_warn_s`` seconds the driver logs a warning with a diagnosis read from Ray's state
(:func:`diagnose`: the resources tasks and actors wait for — Ray's pending demands, the ones ``ray
status`` shows —, dead nodes, what each node has free); again every ``job.stall_warn_s`` while it
lasts. After ``job.stall_fail_s`` seconds the job stops with that diagnosis (code ``stalled``);
what it committed is kept and ``--resume`` continues. Ray Data's own no-progress guard is set to the
same limit, so that the dataset's execution stops with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..model.errors import ErrorCode
from .resources import Demand, describe_bundle, read_nodes

logger = logging.getLogger(__name__)

__all__ = ["StallError", "Watchdog", "diagnose"]


def _matches(bundle: dict[str, float], demand: Demand | None) -> bool:
    if demand is None:
        return False
    mine = {k: v for k, v in demand.as_dict().items() if v}
    theirs = {k: v for k, v in bundle.items() if v and k in ("CPU", "GPU", "memory")}
    return set(mine) == set(theirs) and all(
        abs(mine[k] - theirs[k]) <= 1e-6 * max(1.0, mine[k]) for k in mine
    )


def diagnose(ray: Any, *, actor: Demand | None, decode: Demand) -> str:
    """What Ray says about a job that makes no progress: pending resource demands (named as decode
    tasks or encoder actors when their shape is this job's), dead nodes, free resources per node.
    Best effort: what cannot be read is said so."""
    parts = []
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        waiting = []
        for demand in status.resource_demands.ray_task_actor_demand:
            for request in demand.bundles_by_count:
                what = (
                    "decode task(s)"
                    if _matches(request.bundle, decode)
                    else "encoder actor(s)"
                    if _matches(request.bundle, actor)
                    else "task(s) or actor(s)"
                )
                waiting.append(f"{request.count} {what} needing {describe_bundle(request.bundle)}")
        parts.append(
            "waiting for resources: " + "; ".join(waiting)
            if waiting
            else "nothing waits for resources (the tasks that run produce nothing: a slow input, an encoder "
            "stuck on its device, a node that stopped answering)"
        )
    except Exception as exc:  # an older Ray, or a GCS that does not answer
        parts.append(f"Ray's pending demands could not be read ({type(exc).__name__}: {exc})")
    try:
        dead = [n for n in ray.nodes() if not n.get("Alive")]
        if dead:
            parts.append(
                "dead node(s): "
                + "; ".join(
                    f"{n.get('NodeManagerAddress', '?')} ({str(n.get('NodeID', ''))[:8]}"
                    + (f": {n['DeathReasonMessage']}" if n.get("DeathReasonMessage") else "")
                    + ")"
                    for n in dead
                )
            )
        parts.append(
            "free now: " + "; ".join(f"{n.address}: {describe_bundle(n.free)}" for n in read_nodes(ray))
        )
    except Exception as exc:
        parts.append(f"the nodes could not be read ({type(exc).__name__}: {exc})")
    return "; ".join(parts)


class StallError(Exception):
    """Raised by :meth:`Watchdog.check` past the failure limit; ``diagnosis`` says why."""

    code = ErrorCode.STALLED

    def __init__(self, idle_s: float, diagnosis: str) -> None:
        super().__init__(diagnosis)
        self.idle_s = idle_s
        self.diagnosis = diagnosis


class Watchdog:
    """Warns, then fails, while a job makes no progress (see the module docstring)."""

    def __init__(self, *, warn_s: float, fail_s: float, diagnose: Callable[[], str]) -> None:
        self.warn_s = warn_s
        self.fail_s = fail_s
        self._diagnose = diagnose
        self._next_warning = warn_s

    def check(self, idle_s: float) -> None:
        """Called on every tick of the driver with the seconds since the last progress."""
        if idle_s < self.warn_s:
            self._next_warning = self.warn_s
            return
        if idle_s >= self.fail_s:
            raise StallError(idle_s, self._diagnose())
        if idle_s >= self._next_warning:
            logger.warning(
                "No data file written and no unit committed for %.0f s (job.stall_warn_s %.0f; the job stops "
                "at job.stall_fail_s %.0f): %s",
                idle_s,
                self.warn_s,
                self.fail_s,
                self._diagnose(),
            )
            self._next_warning += self.warn_s
