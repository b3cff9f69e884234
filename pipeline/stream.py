"""The run's data order (:class:`Stream`) and the channel that moves its start (:func:`position_actor`).

A run's data is one stream of items (a read unit in one epoch each) that spans its epochs. The
driver builds the dataset from a start position; a restarted worker group continues from its
checkpoint's position instead, which its rank 0 sets on the run's position actor before any rank
iterates, and which the decode tasks and the epoch expansion read (:func:`resume_at`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POSITION_ACTOR = "mae_stream_position"


@dataclass(frozen=True)
class Stream:
    """The run's data order: epoch ``e`` reads every unit once, in a seeded permutation of its
    own (``seed``, ``e``); item ``g`` of the stream is unit ``order(g // U)[g % U]``.

    The order is the project's own (no Ray execution counter), so it is the same on every node
    and in every attempt: a position counted in images maps back to (item, row) and a resumed run
    or a restarted worker group continues the epoch count, file order and crop seeds where they were.
    """
    unit_rows: tuple[int, ...]
    seed: int
    shuffle: bool

    @property
    def num_units(self) -> int:
        return len(self.unit_rows)

    @property
    def rows_per_epoch(self) -> int:
        return sum(self.unit_rows)

    def order(self, epoch: int) -> np.ndarray:
        """Unit indices in the order epoch ``epoch`` reads them."""
        if not self.shuffle:
            return np.arange(self.num_units)
        return np.random.default_rng([self.seed, 1000003, epoch]).permutation(self.num_units)

    def unit_of(self, item: int) -> tuple[int, int]:
        """Stream item -> (epoch, unit index)."""
        epoch, pos = divmod(item, self.num_units)
        return epoch, int(self.order(epoch)[pos])

    def locate(self, images: int) -> tuple[int, int]:
        """The first ``images`` rows of the stream consumed -> (item, row) to continue from: whole
        units are skipped without being read, then ``row`` rows of the next one before decoding.
        (Images skipped as corrupt count as rows here, so a resume may repeat that many images.)"""
        epoch, r = divmod(int(images), self.rows_per_epoch)
        cum = np.cumsum(np.asarray(self.unit_rows)[self.order(epoch)])
        pos = int(np.searchsorted(cum, r, side="right"))
        row = r - (int(cum[pos - 1]) if pos else 0)
        return epoch * self.num_units + pos, row


# ---------------------------------------------------------------------------- the resume position
def _position_actor_cls():
    import ray

    @ray.remote(num_cpus=0)
    class StreamPosition:
        """The (item, row) of its run's stream that a restarted worker group continues from (see
        :meth:`Stream.locate`). Set by rank 0 before any rank iterates; read by each decode task
        once per stream item, and by the epoch expansion. A segmented stream
        (:mod:`pipeline.segments`) also keeps here the segment each of its two datasets streams
        next, set by rank 0 before that dataset's execution starts, read by its epoch expansion."""

        def __init__(self):
            self.position = (0, 0)
            self.segments = {}

        def set(self, item: int, row: int) -> None:
            self.position = (int(item), int(row))

        def get(self) -> tuple[int, int]:
            return self.position

        def set_segment(self, slot: int, segment: int) -> None:
            self.segments[int(slot)] = int(segment)

        def segment(self, slot: int) -> int:
            return self.segments.get(int(slot), 0)

    return StreamPosition


_POSITIONS: dict = {}  # (job id, actor name) -> handle: the actors this driver owns


def on_this_node():
    """The scheduling strategy that keeps a run's actors on its driver's node. An actor of no CPU
    may otherwise land on any node; on a spot node, a reclaim would take it (and with it the
    stream's position, or its counters) while the run's restarted workers still need it. The
    driver's node is where the run's controller and stream coordinator live anyway."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def named_actor(owned: dict, name: str, make_cls, create: bool = True):
    """The run's actor called ``name``, of the class ``make_cls()``: created on first use on this
    driver's node and kept in ``owned`` (so that it lives as long as its driver, not only as long
    as one dataset's references to it); ``create=False``: the live one, or None."""
    import ray
    if create:
        key = (ray.get_runtime_context().get_job_id(), name)
        if key not in owned:
            owned[key] = make_cls().options(name=name, get_if_exists=True, scheduling_strategy=on_this_node()).remote()
        return owned[key]
    try:
        return ray.get_actor(name)
    except ValueError:
        return None


def release_named_actor(owned: dict, name: str) -> None:
    """End a run's actor once its run is over (an idle actor still holds a process and ~1% of a
    core: a driver running many fits would keep one per run)."""
    import ray
    handle = owned.pop((ray.get_runtime_context().get_job_id(), name), None)
    if handle is not None:
        try:
            ray.kill(handle)  # tasks still finishing call it fire-and-forget: nothing waits on it
        except Exception:  # noqa: BLE001 - Ray already gone: the actor went with it; never mask a run's error
            pass


def _position_name(run_id: str) -> str:
    import hashlib
    return f"{POSITION_ACTOR}-{hashlib.sha1(run_id.encode()).hexdigest()[:16]}"


def position_actor(run_id: str, create: bool = True):
    """The named position actor of run ``run_id`` (one per run, as its counters actor:
    :func:`release_position_actor` ends it with its run, and none outlives the process that
    started it). Created on first use; ``create=False``: the live one, or None."""
    return named_actor(_POSITIONS, _position_name(run_id), _position_actor_cls, create)


def release_position_actor(run_id: str) -> None:
    """End the run's position actor once its run is over."""
    release_named_actor(_POSITIONS, _position_name(run_id))


def resume_at(position, start: tuple[int, int]) -> tuple[int, int]:
    """The later of the driver's ``start`` and the (item, row) set on the ``position`` actor by a
    restarted worker group (the driver's, where there is no actor or it cannot be asked)."""
    if position is None:
        return start
    import ray
    try:
        return max(start, tuple(ray.get(position.get.remote())))
    except ray.exceptions.RayActorError:
        return start
