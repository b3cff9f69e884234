"""A long run's stream in segments: the memory of Ray Data's processes flat in the run's length.

Ray Data keeps a record of every block an operator has output for as long as its execution lives
(``MapOperator._output_blocks_stats``, never trimmed): ~1.7 KiB per block in the split coordinator,
on the head node. A run streamed as one execution grows it for its whole length (800 ImageNet
epochs: ~8 million blocks, ~13 GB; ``bench/RESULTS.md``). So a run longer than
``data.segment_images`` images is streamed in segments of that many (in whole epochs), each one
execution, which ends and frees its records when its last batch has been taken.

Two datasets (slots 0 and 1, given to Ray Train as ``train`` and ``train_next``) take the segments
in turn: segment ``s`` is streamed by slot ``s % 2``, whose epoch expansion reads ``s`` from the
run's position actor (:mod:`pipeline.stream`), where rank 0 sets it before the execution starts.
Every worker starts the next segment in the background while the last batches of the current one
train (the split coordinator's start is a barrier of all workers), so its first units are read
and decoded by the seam: no drain. Batches cross the seam whole: a segment's last partial batch is
completed with the next segment's first rows, so no image is dropped or repeated there (with more
than one worker, Ray's equal split leaves out fewer than ``world`` rows at each segment's end, as at
the end of any stream).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

SLOTS = ("train", "train_next")  # Ray Train's names of the two datasets of a segmented stream


@dataclass(frozen=True)
class Segments:
    """Where a worker's segments start and end, in rows per worker (every worker takes the same
    number of rows of a segment: Ray Train's equal split)."""
    epochs: int          # epochs per segment
    rows_per_epoch: int
    world: int

    def of_image(self, images: int) -> int:
        """The segment that holds image ``images`` of the stream (0-based count of images consumed)."""
        return images // (self.epochs * self.rows_per_epoch)

    def rows_left(self, images: int) -> int:
        """Rows per worker from image ``images`` to the end of its segment."""
        end = (self.of_image(images) + 1) * self.epochs * self.rows_per_epoch
        return (end - images) // self.world


def epochs_per_segment(segment_images: int, rows_per_epoch: int, epochs_to_stream: int) -> int:
    """Whole epochs per segment for ``data.segment_images`` (at least one); 0: a run that streams
    ``epochs_to_stream`` epochs is one execution (no more than one segment, or segments off)."""
    if segment_images <= 0 or rows_per_epoch <= 0:
        return 0
    k = max(1, -(-segment_images // rows_per_epoch))
    return k if k < epochs_to_stream else 0


def _rows(batch) -> int:
    return len(next(iter(batch.values())))


def concat_batches(parts: list[dict]) -> dict:
    """Batches (dicts of numpy arrays, torch tensors or lists) -> one, row after row."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for k in parts[0]:
        vals = [p[k] for p in parts]
        if hasattr(vals[0], "dim"):  # torch tensors (iter_torch_batches)
            import torch
            out[k] = torch.cat(vals)
        else:
            out[k] = np.concatenate([np.asarray(v, dtype=object) if isinstance(v, list) else v for v in vals])
    return out


def _slice(batch: dict, lo: int, hi: int) -> dict:
    return {k: v[lo:hi] for k, v in batch.items()}


def rebatch(batches: Iterable[dict], batch_size: int) -> Iterator[dict]:
    """Batches of exactly ``batch_size`` rows from batches of any size, in order: a full batch
    passes through untouched; partial ones (a segment's last) are joined with the rows that follow."""
    buf, n = [], 0
    try:
        for b in batches:
            m = _rows(b)
            if not buf and m == batch_size:
                yield b
                continue
            if m:
                buf.append(b)
                n += m
            while n >= batch_size:
                merged = concat_batches(buf)
                yield _slice(merged, 0, batch_size)
                n -= batch_size
                buf = [_slice(merged, batch_size, batch_size + n)] if n else []
    finally:  # closed early: close the source now, not whenever it is collected
        if hasattr(batches, "close"):
            batches.close()


def _start_in_background(open_segment: Callable[[int], Iterable], s: int) -> Future:
    """Open segment ``s`` and take its first batch in a daemon thread (a thread still waiting at
    the coordinator's barrier when the run ends must not hold the process) -> Future of
    (iterator, first batch or None)."""
    fut: Future = Future()

    def run():
        try:
            it = iter(open_segment(s))
            fut.set_result((it, next(it, None)))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            fut.set_exception(e)
    threading.Thread(target=run, name=f"mae-segment-{s}", daemon=True).start()
    return fut


def segment_batches(open_segment: Callable[[int], Iterable], seg: Segments, *, start_image: int,
                    batch_size: int, lookahead_rows: int, lookahead_s: float = 0.0,
                    on_enter: Callable[[int], None] | None = None, close_timeout_s: float = 120.0) -> Iterator[dict]:
    """A worker's batches of ``batch_size`` rows from image ``start_image`` of the run's stream on,
    segment after segment, without end. ``open_segment(s)`` -> the batches (any sizes, the last
    partial one kept) of segment ``s``; the next segment is opened in the background once fewer
    than ``lookahead_rows`` rows of the current one are left to this worker, or fewer than it
    takes ``lookahead_s`` seconds to consume at the rate measured so far (a new execution takes
    seconds to deliver its first block: its tasks start, the first units are read and decoded).
    ``on_enter(s)`` is called as the first rows of segment ``s`` are taken.

    ``close()`` (a consumer that stops early, e.g. a test) waits up to ``close_timeout_s`` for a
    segment being opened in the background, so that no thread is left inside Ray's iterator."""
    def chained():
        s = seg.of_image(start_image)
        left = seg.rows_left(start_image)
        it, nxt = iter(open_segment(s)), None
        if on_enter is not None:
            on_enter(s)
        t0, taken = None, 0
        try:
            while True:
                for b in it:
                    n = _rows(b)
                    left -= n
                    if t0 is None:  # the rate is measured from the first batch on (not the start-up)
                        t0 = time.monotonic()
                    else:
                        taken += n
                    rate = taken / max(time.monotonic() - t0, 1e-9)
                    if nxt is None and (left <= lookahead_rows or left <= rate * lookahead_s):
                        nxt = _start_in_background(open_segment, s + 1)
                    yield b
                if nxt is None:  # a segment shorter than its estimate (images skipped as corrupt)
                    nxt = _start_in_background(open_segment, s + 1)
                it, first = nxt.result()
                nxt, s = None, s + 1
                if on_enter is not None:
                    on_enter(s)
                left = seg.rows_left(s * seg.epochs * seg.rows_per_epoch)
                if first is not None:
                    left -= _rows(first)
                    yield first
        finally:
            if nxt is not None:
                with contextlib.suppress(Exception):
                    nxt.exception(timeout=close_timeout_s)
    return rebatch(chained(), batch_size)
