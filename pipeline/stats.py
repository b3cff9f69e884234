"""The run's skip counters: one named actor per run, counting the decoded and the skipped images.

Corrupt, truncated, empty or non-image objects are skipped by the decode tasks, which report their
counts (with reasons and a few example keys) here once per read unit; :func:`pipeline_stats` reads
them back.
"""

from __future__ import annotations

from collections import Counter

from .stream import named_actor, release_named_actor

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
    return named_actor(_STATS, _actor_name(run_id), _stats_actor_cls, create)


def release_stats_actor(run_id: str = "") -> None:
    """End the run's counters actor once its run is over."""
    release_named_actor(_STATS, _actor_name(run_id))


def pipeline_stats(run_id: str = "") -> dict:
    import ray
    a = stats_actor(create=False, run_id=run_id)
    return ray.get(a.get.remote()) if a else {"ok": 0, "skipped": {}, "examples": {}}
