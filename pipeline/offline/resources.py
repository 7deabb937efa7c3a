"""What the job's workers reserve, and whether the cluster can hold them: the preflight check.

A job needs its minimum encoder actors (``job.actors``: ``job.num_cpus_per_actor`` CPUs and
``job.num_gpus_per_actor`` GPUs each) *and* at least one decode task (1 CPU and the memory of one
output file, :func:`~pipeline.offline.decode.decode_task_memory`) at the same time: actors that take
every CPU a decode task could use wait forever for files that are never decoded. Two rules follow.

- **The decode reserve** (:func:`actor_cpus`). Ray restarts a lost actor wherever it fits, so after a
  node loss the actors may crowd onto the nodes left. On every node that can hold actors, as many
  actors as fit there must leave a decode task its CPU: the actors' CPU share is lowered to the
  largest value that guarantees it (never above ``job.num_cpus_per_actor``; logged when lowered).
- **The preflight** (:func:`preflight`). Before anything is written the job reads what every node
  has free now (what Serve replicas, other jobs and actors already hold is taken), and checks that
  the minimum actors and one decode task fit together (a packing per node: a node's free CPUs,
  GPUs and memory are not pooled with another's). When they do not, it fails at once with the
  shortfall by node type and the flags that fix it, or — ``job.resource_wait_s`` > 0, for a
  cluster that autoscales — waits that long for room, saying why every half minute.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..memory import human_bytes
from ..model.errors import ErrorCode, LlavaFeaturesError

logger = logging.getLogger(__name__)

__all__ = [
    "Demand",
    "NodeResources",
    "actor_cpus",
    "describe_bundle",
    "fit_actors",
    "preflight",
    "read_nodes",
]

MIN_ACTOR_CPUS = 0.1
"""The decode reserve never lowers an actor's CPU share below this."""
SETTLE_S = 5.0
"""How long the preflight looks again before it fails, whatever ``job.resource_wait_s``: what work that
just ended held (the actors of a job that finished a moment ago in the same cluster) takes a few
seconds to return to the free pool."""
WAIT_REPORT_S = 30.0
"""How often a job waiting for room says why."""
_WAIT_POLL_S = 2.0
_RESOURCES = ("CPU", "GPU", "memory")


def _number(x: float) -> str:
    return f"{x:g}" if x == int(x) else f"{x:.2f}".rstrip("0")


def describe_bundle(bundle: dict[str, float]) -> str:
    """``{CPU: 1, memory: 2.7e9}`` → ``1 CPU, 2.7 GB memory`` (Ray's resource names kept otherwise)."""
    parts = []
    for name, value in bundle.items():
        if not value or name.startswith("node:") or name == "object_store_memory":
            continue
        if name == "memory":
            parts.append(f"{human_bytes(value)} memory")
        else:
            parts.append(f"{_number(value)} {name}")
    return ", ".join(parts) or "no resources"


@dataclass(frozen=True)
class Demand:
    """What one worker reserves."""

    cpus: float
    gpus: float = 0.0
    memory: float = 0.0
    """Bytes."""

    def as_dict(self) -> dict[str, float]:
        return {"CPU": self.cpus, "GPU": self.gpus, "memory": self.memory}

    def count_in(self, free: dict[str, float]) -> int:
        """How many of these fit in ``free`` at once."""
        counts = [
            math.floor(free.get(name, 0.0) / need + 1e-9) for name, need in self.as_dict().items() if need > 0
        ]
        return min(counts) if counts else 1 << 30

    def fits(self, free: dict[str, float]) -> bool:
        return self.count_in(free) >= 1

    def minus(self, free: dict[str, float]) -> dict[str, float]:
        """``free`` with one of these taken."""
        out = dict(free)
        for name, need in self.as_dict().items():
            out[name] = out.get(name, 0.0) - need
        return out


@dataclass(frozen=True)
class NodeResources:
    """A live node: its address, total and free resources (CPU, GPU, memory)."""

    address: str
    total: dict[str, float] = field(default_factory=dict)
    free: dict[str, float] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[float, float, float]:
        """The node's type, as far as the job is concerned: total CPUs, GPUs and memory (GB)."""
        return (
            self.total.get("CPU", 0.0),
            self.total.get("GPU", 0.0),
            round(self.total.get("memory", 0.0) / 1e9, 1),
        )


def read_nodes(ray: Any) -> list[NodeResources]:
    """The cluster's live nodes with their total and free resources (Ray's GCS; no dashboard needed)."""
    from ray._private.state import available_resources_per_node, total_resources_per_node

    totals = total_resources_per_node()
    free = available_resources_per_node()
    addresses = {n["NodeID"]: n.get("NodeManagerAddress", "") for n in ray.nodes() if n.get("Alive")}
    nodes = []
    for node_id, total in sorted(totals.items()):
        if node_id not in addresses:
            continue
        nodes.append(
            NodeResources(
                address=f"{addresses[node_id]} ({node_id[:8]})",
                total={k: float(total.get(k, 0.0)) for k in _RESOURCES},
                free={k: float(free.get(node_id, {}).get(k, 0.0)) for k in _RESOURCES},
            )
        )
    return nodes


def actor_cpus(
    nodes: Sequence[NodeResources], *, requested: float, actors_max: int, gpus: float, decode: Demand
) -> float:
    """The CPU share of an encoder actor: ``requested`` (``job.num_cpus_per_actor``), lowered so that on
    every node that can hold actors, the actors that fit there leave ``decode`` its CPUs (see the
    module docstring); never below :data:`MIN_ACTOR_CPUS`."""
    share = requested
    for node in nodes:
        cpus = node.total.get("CPU", 0.0)
        if cpus - decode.cpus < MIN_ACTOR_CPUS:
            continue  # too small to hold an actor beside a decode task in any case
        most = actors_max
        if gpus > 0:
            most = min(most, math.floor(node.total.get("GPU", 0.0) / gpus + 1e-9))
        if most <= 0:
            continue
        share = min(share, (cpus - decode.cpus) / most)
    return max(MIN_ACTOR_CPUS, share)


def fit_actors(nodes: Sequence[NodeResources], actor: Demand | None, decode: Demand) -> int:
    """The most actors that fit in the nodes' free resources beside one decode task (-1: no node has
    room for the decode task; any number when ``actor`` is None)."""
    best = -1
    counts = [actor.count_in(n.free) if actor is not None else 0 for n in nodes]
    for i, node in enumerate(nodes):
        if not decode.fits(node.free):
            continue
        beside = actor.count_in(decode.minus(node.free)) if actor is not None else 0
        best = max(best, sum(counts) - counts[i] + beside)
    return best


def _shortfall(
    nodes: Sequence[NodeResources],
    *,
    actor: Demand | None,
    actors: tuple[int, int],
    decode: Demand,
    shard_size: int,
) -> str | None:
    """None when the minimum actors and a decode task fit now; else what is missing and how to fix it."""
    fit = fit_actors(nodes, actor, decode)
    if fit >= (actors[0] if actor is not None else 0):
        return None
    wanted = (
        f"{actors[0]} encoder actor(s) ({describe_bundle(actor.as_dict())} each) and one decode task"
        if actor is not None
        else "one decode task"
    )
    groups: dict[tuple[float, float, float], list[NodeResources]] = {}
    for node in nodes:
        groups.setdefault(node.shape, []).append(node)
    lines = []
    for (cpus, gpus, memory), members in sorted(groups.items()):
        free = "; ".join(f"{n.address}: {describe_bundle(n.free)} free" for n in members[:4])
        more = f"; and {len(members) - 4} more" if len(members) > 4 else ""
        lines.append(
            f"{len(members)} node(s) of {_number(cpus)} CPU, {_number(gpus)} GPU, {memory:g} GB ({free}{more})"
        )
    held = {
        name: sum(n.total.get(name, 0.0) - n.free.get(name, 0.0) for n in nodes) for name in ("CPU", "GPU")
    }
    fixes = []
    if fit < 0:
        short = "no node has room for a decode task"
        if not any(decode.count_in({**n.free, "memory": decode.memory}) for n in nodes):
            fixes.append("free CPUs on a node (each decode task takes 1 CPU)")
        if not any(decode.count_in({**n.free, "CPU": decode.cpus}) for n in nodes):
            fixes.append(
                f"a smaller --shard-size (job.shard_size: a decode task reserves {human_bytes(decode.memory)} "
                f"for files of {shard_size} images)"
            )
    else:
        short = f"room for {fit} of them beside a decode task"
        if fit >= 1:
            fixes.append(f"--actors {fit},{max(fit, actors[1])} (job.actors)")
        if actor is not None and actor.gpus > 0:
            fixes.append(
                "--num-gpus-per-actor (job.num_gpus_per_actor: a share of a GPU, or 0 to encode on CPUs)"
            )
        if actor is not None and actor.cpus > MIN_ACTOR_CPUS:
            fixes.append(
                f"--num-cpus-per-actor {_number(max(MIN_ACTOR_CPUS, actor.cpus / 2))} (job.num_cpus_per_actor)"
            )
    if held["CPU"] > 0 or held["GPU"] > 0:
        fixes.append(
            "free what others hold now "
            f"({_number(held['CPU'])} CPU, {_number(held['GPU'])} GPU: Serve replicas, other jobs; e.g. a smaller "
            "Serve application)"
        )
    fixes.append("add nodes, or set job.resource_wait_s on a cluster that autoscales")
    return (
        f"The cluster cannot run this job now: it needs {wanted} ({describe_bundle(decode.as_dict())}) at "
        f"the same time, and its free resources have {short}. Nodes: {'; '.join(lines)}. "
        f"Fix it with one of: {'; '.join(fixes)}."
    )


def preflight(
    read: Callable[[], list[NodeResources]],
    *,
    actor: Demand | None,
    actors: tuple[int, int],
    decode: Demand,
    shard_size: int,
    wait_s: float,
    settle_s: float = SETTLE_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Check that ``actors[0]`` actors (``actor``; None: none, the shared pool's case) and one ``decode``
    task fit the cluster's free resources now (``read()``); wait up to ``wait_s`` (at least ``settle_s``)
    for room; then raise a typed ``insufficient_resources`` error that names the shortfall and the flags
    that fix it."""
    deadline = clock() + max(wait_s, settle_s)
    reported = -math.inf
    while True:
        message = _shortfall(read(), actor=actor, actors=actors, decode=decode, shard_size=shard_size)
        if message is None:
            return
        now = clock()
        if now >= deadline:
            waited = f" (waited {wait_s:.0f} s: job.resource_wait_s)" if wait_s > 0 else ""
            raise LlavaFeaturesError(
                f"{message}{waited} Nothing was written.", code=ErrorCode.INSUFFICIENT_RESOURCES
            )
        if wait_s > 0 and now - reported >= WAIT_REPORT_S:
            logger.warning("Waiting up to %.0f s for room: %s", deadline - now, message)
            reported = now
        sleep(min(_WAIT_POLL_S, max(0.0, deadline - now)))
