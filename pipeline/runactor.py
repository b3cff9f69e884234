"""A run's one actor: the shared state of its data pipeline, in one small process on the driver's node.

It holds two things that the driver, the training workers and the decode tasks of a run share:

- the stream position (:func:`pipeline.stream.position_actor`): the (item, row) a restarted worker
  group continues from, and the segment each dataset of a segmented stream reads next;
- the image counters (:func:`pipeline.stats.stats_actor`): images decoded and skipped as corrupt,
  with reasons and a few example keys.

One actor, not one per job: every actor is a process of its own (~2 CPU-s to start: Python, Ray,
its core worker), and a run is started again and again (a restart, a Tune trial, a resumed job).
"""

from __future__ import annotations

import hashlib
from collections import Counter

RUN_ACTOR = "mae_run"


def run_actor_name(run_id: str) -> str:
    """The name of run ``run_id``'s actor (unique per run: concurrent Tune trials each own one)."""
    return f"{RUN_ACTOR}-{hashlib.sha1(run_id.encode()).hexdigest()[:16]}"


def _run_actor_cls():
    import ray

    @ray.remote(num_cpus=0)
    class RunActor:
        """The stream position of a run and its image counters (see the module)."""

        def __init__(self):
            self.position = (0, 0)
            self.segments = {}
            self.reset()

        # the stream position: set by rank 0 before any rank iterates; read by each decode task
        # once per stream item, and by the epoch expansion
        def set(self, item: int, row: int) -> None:
            self.position = (int(item), int(row))

        def get(self) -> tuple[int, int]:
            return self.position

        # a segmented stream (pipeline.segments): the segment each of its two datasets streams
        # next, set by rank 0 before that dataset's execution starts, read by its epoch expansion
        def set_segment(self, slot: int, segment: int) -> None:
            self.segments[int(slot)] = int(segment)

        def segment(self, slot: int) -> int:
            return self.segments.get(int(slot), 0)

        # the counters: each decode task reports once per read unit
        def record(self, ok: int, skipped: dict[str, list[str]]):
            self.ok += ok
            for reason, keys in skipped.items():
                self.skipped[reason] += len(keys)
                ex = self.examples.setdefault(reason, [])
                ex.extend(keys[: max(0, 5 - len(ex))])

        def counts(self) -> dict:
            return {"ok": self.ok, "skipped": dict(self.skipped), "examples": self.examples}

        def reset(self):
            """The counters back to zero (the position stays)."""
            self.ok = 0
            self.skipped = Counter()
            self.examples: dict[str, list[str]] = {}

    return RunActor


_OWNED: dict = {}  # (job id, actor name) -> handle: the actors this driver owns


def on_this_node():
    """The scheduling strategy that keeps a run's actor on its driver's node. An actor of no CPU
    may otherwise land on any node; on a spot node, a reclaim would take it (and with it the
    stream's position, or its counters) while the run's restarted workers still need it. The
    driver's node is where the run's controller and stream coordinator live anyway."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def run_actor(name: str, create: bool = True):
    """The actor called ``name``: created on first use on this driver's node and kept here (so
    that it lives as long as its driver, not only as long as one dataset's references to it);
    ``create=False``: the live one, or None."""
    import ray
    if create:
        key = (ray.get_runtime_context().get_job_id(), name)
        if key not in _OWNED:
            _OWNED[key] = _run_actor_cls().options(name=name, get_if_exists=True,
                                                   scheduling_strategy=on_this_node()).remote()
        return _OWNED[key]
    try:
        return ray.get_actor(name)
    except ValueError:
        return None


def release_run_actor(name: str) -> None:
    """End a run's actor once its run is over (an idle actor still holds a process and ~1% of a
    core: a driver running many fits would keep one per run)."""
    import ray
    handle = _OWNED.pop((ray.get_runtime_context().get_job_id(), name), None)
    if handle is not None:
        try:
            ray.kill(handle)  # tasks still finishing call it fire-and-forget: nothing waits on it
        except Exception:  # noqa: BLE001 - Ray already gone: the actor went with it; never mask a run's error
            pass
