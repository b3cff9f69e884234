"""The run's skip counters: one named actor per run, counting the decoded and the skipped images.

Corrupt, truncated, empty or non-image objects are skipped by the decode tasks, which report their
counts (with reasons and a few example keys) here once per read unit; :func:`pipeline_stats` reads
them back.
"""

from __future__ import annotations

from collections import Counter

from .stream import on_this_node

STATS_ACTOR = "mae_pipeline_stats"


def _stats_actor_cls():
    import ray

    @ray.remote(num_cpus=0)
    class PipelineStats:
        """Cluster-wide counters of decoded and skipped images (with reasons and examples)."""

        def __init__(self):
            self.ok = 0
            self.skipped = Counter()
            self.examples: dict[str, list[str]] = {}

        def record(self, ok: int, skipped: dict[str, list[str]]):
            self.ok += ok
            for reason, keys in skipped.items():
                self.skipped[reason] += len(keys)
                ex = self.examples.setdefault(reason, [])
                ex.extend(keys[: max(0, 5 - len(ex))])

        def get(self) -> dict:
            return {"ok": self.ok, "skipped": dict(self.skipped), "examples": self.examples}

        def reset(self):
            self.__init__()

    return PipelineStats


_STATS: dict = {}  # (job id, actor name) -> handle: the actors this driver owns


def _actor_name(run_id: str) -> str:
    import hashlib
    return STATS_ACTOR if not run_id else f"{STATS_ACTOR}-{hashlib.sha1(run_id.encode()).hexdigest()[:16]}"


def stats_actor(create: bool = True, run_id: str = ""):
    """The named counters actor of this driver (one per run: concurrent Tune trials each own one;
    :func:`release_stats_actor` ends it with its run, and none outlives the process that started
    it). Created on first use."""
    import ray
    name = _actor_name(run_id)
    if create:
        # The module keeps the handle, so that the actor lives as long as its driver (not only as
        # long as one dataset's references to it).
        key = (ray.get_runtime_context().get_job_id(), name)
        if key not in _STATS:
            _STATS[key] = _stats_actor_cls().options(name=name, get_if_exists=True,
                                                     scheduling_strategy=on_this_node()).remote()
        return _STATS[key]
    try:
        return ray.get_actor(name)
    except ValueError:
        return None


def release_stats_actor(run_id: str = "") -> None:
    """End the run's counters actor once its run is over. An idle actor still holds a process and
    about 1% of a core; a driver that runs many fits (a Tune trial driver, a notebook, the tests)
    would otherwise keep one per run until it exits."""
    import ray
    handle = _STATS.pop((ray.get_runtime_context().get_job_id(), _actor_name(run_id)), None)
    if handle is not None:
        try:
            ray.kill(handle)  # decode tasks still finishing record fire-and-forget: nothing waits on it
        except Exception:  # noqa: BLE001 - Ray already gone: the actor went with it; never mask a run's error
            pass


def pipeline_stats(run_id: str = "") -> dict:
    import ray
    a = stats_actor(create=False, run_id=run_id)
    return ray.get(a.get.remote()) if a else {"ok": 0, "skipped": {}, "examples": {}}
