"""The run's data order (:class:`Stream`) and the channel that moves its start (:func:`position_actor`).

A run's data is one stream of items (a read unit in one epoch each) that spans its epochs. The
driver builds the dataset from a start position; a restarted worker group continues from its
checkpoint's position instead, which its rank 0 sets on the run's position actor before any rank
iterates, and which the decode tasks and the epoch expansion read (:func:`resume_at`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .runactor import run_actor, run_actor_name


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
def _position_name(run_id: str) -> str:
    return run_actor_name(run_id)


def position_actor(run_id: str, create: bool = True):
    """The actor holding run ``run_id``'s resume position (the run's one actor, :mod:`pipeline.runactor`,
    which also keeps its image counters; its ``release_run_actor`` ends it with its run, and none
    outlives the process that started it). Created on first use;
    ``create=False``: the live one, or None."""
    return run_actor(_position_name(run_id), create)


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
