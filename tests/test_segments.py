"""The segmented stream's worker side (pipeline.segments), without Ray: batches across seams, the
segment arithmetic and when the next segment is opened. (Through Ray Data: test_pipeline_ray.py.)"""

import threading

import numpy as np
import torch

from pipeline.segments import Segments, epochs_per_segment, rebatch, segment_batches


def rows(*spans):
    return [{"x": torch.arange(a, b), "image": np.array([f"img{i}" for i in range(a, b)], dtype=object)}
            for a, b in spans]


def test_rebatch_passes_full_batches_and_joins_partial_ones_in_order():
    src = rows((0, 4), (4, 8), (8, 10), (10, 14), (14, 18), (18, 19))
    out = list(rebatch(iter(src), 4))
    assert out[0] is src[0] and out[1] is src[1]  # untouched, no copy
    assert [b["x"].tolist() for b in out] == [list(range(i, i + 4)) for i in range(0, 16, 4)]
    assert out[3]["image"].tolist() == ["img12", "img13", "img14", "img15"]  # object columns (JPEG bytes) too
    # the 3 rows left at the end are no batch: a stream without end never ends on them


def test_rebatch_closes_its_source_when_closed():
    closed = threading.Event()

    def source():
        try:
            yield from rows((0, 4), (4, 8))
        finally:
            closed.set()
    it = rebatch(source(), 4)
    next(it)
    it.close()
    assert closed.is_set()


def test_segments_count_rows_per_worker_to_the_segment_end():
    seg = Segments(epochs=2, rows_per_epoch=100, world=4)
    assert [seg.of_image(i) for i in (0, 199, 200, 450)] == [0, 0, 1, 2]
    assert seg.rows_left(0) == 50 and seg.rows_left(120) == 20 and seg.rows_left(200) == 50
    # data.segment_images in whole epochs, at least one; 0 where the run is no longer than one segment
    assert epochs_per_segment(10_000_000, 1_281_167, 802) == 8
    assert epochs_per_segment(100, 1000, 5) == 1
    assert epochs_per_segment(10_000_000, 1_281_167, 8) == 0 and epochs_per_segment(0, 1000, 800) == 0


def test_the_next_segment_is_opened_before_the_seam_and_no_row_is_lost_or_repeated():
    """3 epochs of 10 rows per segment, one worker from image 7, batches of 4: the rows are the
    stream's in order, and segment s + 1 was opened while rows of segment s were still unread."""
    per = 30
    opened, taken = [], []

    def open_segment(s):
        opened.append((s, len(taken)))
        lo = max(s * per, 7)
        for a in range(lo, (s + 1) * per, 6):  # batches of 6 (the last partial), as Ray's iterator with drop_last off
            yield {"x": torch.arange(a, min(a + 6, (s + 1) * per))}
    entered = []
    it = segment_batches(open_segment, Segments(3, 10, 1), start_image=7, batch_size=4, lookahead_rows=8,
                         on_enter=entered.append)
    for _ in range(40):
        taken.extend(next(it)["x"].tolist())
    assert taken == list(range(7, 7 + 160))
    it.close()
    assert [s for s, _ in opened] == [0, 1, 2, 3, 4, 5] and entered == [0, 1, 2, 3, 4, 5]  # rows 7..166
    for s, at in opened[1:]:
        assert at < s * per - 7  # opened while this many rows of the segment before were still to come
