"""Ray's one known-harmless ERROR line of every job run, spent before the job's actor pool starts.

When the driver creates an actor with ``max_restarts != 0`` and a constructor argument passed by
reference (an ``ObjectRef``, or an object too large to inline), Ray's core worker logs, once per
process and at ERROR level, ``core_worker.cc: Actor with class name: '...' has constructor
arguments in the object store and max_restarts > 0. If the arguments in the object store go out
of scope or are lost, the actor restart will fail`` (``CoreWorker::CreateActor``; see
ray-project/ray#53727). Ray Data's actor pools always meet both conditions, whatever the
constructor arguments: they restart lost actors (``max_restarts=-1``, which the job relies on to
rewrite the shard of an encoder actor that died) and they pass every pool actor its
``DataContext`` and its ``MapTransformer`` (which holds our ``fn_constructor_kwargs``) as
``ray.put`` references (ray-project/ray#57733: a pool actor with no arguments at all prints it).
So passing our arguments differently cannot avoid it.

It is harmless for the job: those two references are held by the Ray Data operator, in the
driver, for the whole run, so the objects stay pinned in the driver node's object store and a
restarted actor reads them again. They could only be lost with the driver's node, which ends the
job anyway (``--resume`` continues it).

Ray offers no switch for this one message (its C++ errors always go to the driver's stderr), and
it is printed once per process: :func:`spend_actor_restart_warning` creates one probe actor that
meets the conditions, with the driver's stderr captured for that one call (the line is printed
while the actor is submitted), and kills it once it is up (it asks for no resources, so it fits on
any node at once; killed while still being placed, Ray would log the interrupted placement).
Everything else written to stderr meanwhile is passed on; the probe's own line is dropped. An actor of ours whose arguments
could really go out of scope would print nothing afterwards either: the job creates no actors
besides Ray Data's pool.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading

logger = logging.getLogger(__name__)

ACTOR_RESTART_WARNING = b"has constructor arguments in the object store and max_restarts > 0"
"""The part of Ray's message that identifies it."""
PROBE_TIMEOUT_S = 60.0
"""Longest wait for the probe actor to come up before it is killed anyway."""
_lock = threading.Lock()
_spent = False


def spend_actor_restart_warning() -> bool:
    """Make Ray print its once-per-process actor-restart warning now, into a capture, instead of
    when the job's actor pool starts (see the module docstring). Ray must be initialized. Returns
    whether the line was seen (False after the first call, or when stderr cannot be captured)."""
    global _spent
    import ray

    with _lock:
        if _spent:
            return False
        _spent = True
        try:
            saved = os.dup(2)
        except OSError:  # no stderr: nothing to keep quiet
            return False

        class Probe:  # defined here, so that workers get it by value (nothing to import)
            def __init__(self, argument: object) -> None:  # pragma: no cover - runs in a Ray worker
                self.argument = argument

        probe_class = ray.remote(num_cpus=0, max_restarts=1)(Probe)
        sys.stderr.flush()
        with tempfile.TemporaryFile() as captured:
            try:
                os.dup2(captured.fileno(), 2)
                try:
                    probe = probe_class.remote(ray.put(None))
                finally:
                    os.dup2(saved, 2)
            finally:
                os.close(saved)
            captured.seek(0)
            lines = captured.read().splitlines(keepends=True)
    try:
        ray.get(probe.__ray_ready__.remote(), timeout=PROBE_TIMEOUT_S)
    except (ray.exceptions.RayError, TimeoutError) as exc:
        logger.debug("the probe actor did not come up: %s", exc)
    ray.kill(probe, no_restart=True)
    seen = any(ACTOR_RESTART_WARNING in line for line in lines)
    others = b"".join(line for line in lines if ACTOR_RESTART_WARNING not in line)
    if others:
        os.write(2, others)
    logger.debug("Ray's actor-restart warning spent before the actor pool starts: %s", seen)
    return seen
