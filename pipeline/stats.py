"""The run's skip counters, kept on the run's one actor (:mod:`pipeline.runactor`): the decoded and
the skipped images.

Corrupt, truncated, empty or non-image objects are skipped by the decode tasks, which report their
counts (with reasons and a few example keys) here once per read unit; :func:`pipeline_stats` reads
them back.
"""

from __future__ import annotations

from .runactor import run_actor, run_actor_name

STATS_ACTOR = "mae_pipeline_stats"


def _actor_name(run_id: str) -> str:
    """A run's counters live on its one actor (:mod:`pipeline.runactor`); without a run id (a
    `mae prepare`, a bare dataset), on an actor of their own."""
    return run_actor_name(run_id) if run_id else STATS_ACTOR


def stats_actor(create: bool = True, run_id: str = ""):
    """The counters of run ``run_id``: its one actor (concurrent Tune trials each own one;
    ``pipeline.runactor.release_run_actor`` ends it with its run, and none outlives the process that
    started it). Created on first use."""
    return run_actor(_actor_name(run_id), create)


def pipeline_stats(run_id: str = "") -> dict:
    import ray
    a = stats_actor(create=False, run_id=run_id)
    return ray.get(a.counts.remote()) if a else {"ok": 0, "skipped": {}, "examples": {}}
