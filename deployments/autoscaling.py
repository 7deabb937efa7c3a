"""Autoscaling that counts both front doors: online requests and the offline job's files.

Serve's own count of ongoing requests comes from the deployment handles that send them. The HTTP
proxy's handle lives as long as the proxy, but an offline job hands its files over from short-lived
Ray Data tasks, one handle each: the controller drops their counts as stale when the tasks end, so a
job through the pool was nearly invisible to it (measured in docs/benchmarks.md). So each replica
reports its own load (:meth:`deployments.replica.FeaturesEncoderImpl.record_autoscaling_stats`,
Serve's custom autoscaling metrics) and :func:`both_doors_policy` scales on it:

- an online request counts 1 from the moment its body has arrived until it is answered;
- an offline file counts ``target_ongoing_requests / max_offline_shards`` while the replica works on it,
  so a replica holding ``max_offline_shards`` files (what a job keeps in flight per replica) is at its
  target, and a job alone asks for as many replicas as it keeps busy, up to ``max_replicas``;
- requests queued at Serve's handles (waiting for a replica) count 1 each.

The policy asks for ``load / target_ongoing_requests`` replicas; Serve applies
``serve.upscale_delay_s`` / ``serve.downscale_delay_s`` and the replica bounds around it.

Serve pickles the policy function by value for its controller: it uses nothing of the product.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve.config import AutoscalingContext

    from pipeline.config import Config, ServeConfig

LOAD_METRIC = "load"
"""The metric the policy scales on: a replica's online requests plus its weighted offline files."""
METRICS_INTERVAL_S = 2.0
"""How often a replica sends its load to the controller (Serve's default, 10 s, would add up to 10 s
to every decision; the field is marked deprecated in Ray 2.60 but still sets the push interval)."""
LOOK_BACK_S = 10.0
"""The window the controller averages each replica's load over (Serve's default is 30 s); the
replica samples its load every LOOK_BACK_S / 5 = 2 s."""
DECIDE_EVERY_S = 0.5
"""The controller asks the policy every 0.1 s; the replicas' figures change every METRICS_INTERVAL_S,
so the policy recomputes (merging every replica's time series) at most this often."""
SERVE_LOGGER = "ray.serve"
"""The policy runs in Serve's controller, whose log is Serve's own logger."""


def replica_load(online: int, offline_files: int, serve: ServeConfig) -> dict[str, float]:
    """A replica's load for the autoscaler: ``online`` admitted requests, ``offline_files`` files in
    progress, and ``load`` (the two in ongoing requests: see the module docstring)."""
    weight = serve.target_ongoing_requests / serve.max_offline_shards
    return {
        "online": float(online),
        "offline_files": float(offline_files),
        LOAD_METRIC: online + weight * offline_files,
    }


def both_doors_policy(ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
    """Replicas wanted: the replicas' reported load (averaged over the look-back window) plus the
    requests queued at handles, over ``target_ongoing_requests``. Before any replica has reported,
    Serve's own count of ongoing requests stands in."""
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    now = ctx.current_time or 0.0
    state = dict(ctx.policy_state)
    last = state.get("llava_features_decided")
    if last is not None and 0 <= now - last[0] < DECIDE_EVERY_S and last[2] == ctx.current_num_replicas:
        return last[1], state  # the replicas' figures change every METRICS_INTERVAL_S: no need to recompute
    reported = (ctx.aggregated_metrics or {}).get(LOAD_METRIC, {})
    queued = ctx.total_queued_requests or 0.0
    load = sum(reported.values()) + queued if reported else ctx.total_num_requests
    target = ctx.config.get_target_ongoing_requests()
    desired = load / target
    wanted = min(
        max(math.ceil(desired - 1e-9), ctx.capacity_adjusted_min_replicas), ctx.capacity_adjusted_max_replicas
    )
    state["llava_features_decided"] = (now, desired, ctx.current_num_replicas)
    if state.get("llava_features_wanted") != wanted:  # log changes only (this runs every 0.1 s)
        state["llava_features_wanted"] = wanted
        logging.getLogger(SERVE_LOGGER).info(
            "llava-features autoscaling: load %.2f (%d replicas reporting, %.2f queued at handles) over target "
            "%g per replica: wants %d replica(s), has %d",
            load,
            len(reported),
            queued,
            target,
            wanted,
            ctx.current_num_replicas,
        )
    return desired, state


def autoscaling_config(config: Config) -> dict[str, Any]:
    """The deployment's ``autoscaling_config`` from ``config.serve``."""
    s = config.serve
    return {
        "min_replicas": s.min_replicas,
        "max_replicas": s.max_replicas,
        "initial_replicas": s.initial_replicas,
        "target_ongoing_requests": s.target_ongoing_requests,
        "upscale_delay_s": s.upscale_delay_s,
        "downscale_delay_s": s.downscale_delay_s,
        "metrics_interval_s": METRICS_INTERVAL_S,
        "look_back_period_s": LOOK_BACK_S,
        "policy": {"policy_function": both_doors_policy},
    }
