"""prepare -> shards on the S3 server -> streamed back through Ray Data to 2 consumers."""

import os
import subprocess
import sys
import threading
from collections import Counter

import numpy as np
import pytest

from support import upload_dir
from pipeline.config import DataConfig
from pipeline.dataset import build_dataset
from pipeline.prepare import PrepareConfig, prepare
from pipeline.sources import resolve
from pipeline.stats import pipeline_stats, stats_actor
from pipeline.storage import StorageError, list_files, read_bytes
from pipeline.synthetic import CLASSES, odd_images, write_labeled_folder

pytestmark = [pytest.mark.ray, pytest.mark.s3]


@pytest.fixture(scope="module")
def src_dir(tmp_path_factory):
    """ImageFolder with 4 classes x 10 good images, plus odd and bad files in one class."""
    root = tmp_path_factory.mktemp("src")
    write_labeled_folder(str(root), n_per_class=10, size=40, seed=3)
    bad = {}
    for name, (data, ok) in odd_images().items():
        with open(root / CLASSES[0] / f"odd_{name}", "wb") as f:
            f.write(data)
        bad[f"{CLASSES[0]}/odd_{name}"] = ok
    return str(root), bad


@pytest.fixture(scope="module")
def prepared(src_dir, bucket, ray_cluster):
    root, odd = src_dir
    upload_dir(root, f"s3://{bucket}/raw")
    dst = f"s3://{bucket}/shards"
    m = prepare(PrepareConfig(src=f"s3://{bucket}/raw", dst=dst, shard_size_mb=0.02, val_fraction=0.25),
                progress=False)
    return dst, m, odd


def test_prepare_manifest_counts_and_reasons(prepared):
    dst, m, odd = prepared
    n_good = 40 + sum(odd.values())
    n_bad = sum(not v for v in odd.values())
    assert m["classes"] == sorted(CLASSES)
    assert m["counts"]["ok"] == n_good and m["counts"]["skipped"] == n_bad
    assert {d["key"] for d in m["skipped"]} == {k for k, ok in odd.items() if not ok}
    assert set(m["counts"]["skipped_by_reason"]) <= {"empty", "not_an_image", "truncated", "corrupt",
                                                     "too_many_pixels"}
    assert set(m["splits"]) == {"train", "val"}
    assert sum(s["count"] for s in m["splits"].values()) == n_good
    assert len(m["splits"]["train"]["files"]) > 1  # several shards at this tiny target size
    on_s3 = {p.rsplit("/", 1)[-1] for p, _ in list_files(dst)}
    assert "manifest.json" in on_s3
    assert all(f in on_s3 for s in m["splits"].values() for f in s["files"])


def test_prepare_rerun_gives_same_shards_and_refuses_nonempty(prepared, bucket):
    dst, m, _ = prepared
    with pytest.raises(StorageError, match="not empty"):
        prepare(PrepareConfig(src=f"s3://{bucket}/raw", dst=dst), progress=False)
    dst2 = f"s3://{bucket}/shards-rerun"
    m2 = prepare(PrepareConfig(src=f"s3://{bucket}/raw", dst=dst2, shard_size_mb=0.02, val_fraction=0.25),
                 progress=False)
    assert m2["splits"] == m["splits"]
    for f in m["splits"]["train"]["files"]:
        assert read_bytes(f"{dst}/{f}") == read_bytes(f"{dst2}/{f}")


def _consume(it, out):
    for b in it:
        out.append((b["patches"], b["label"]))


def test_every_valid_image_once_per_epoch_across_two_consumers(prepared):
    dst, m, _ = prepared
    stats = stats_actor()
    import ray
    ray.get(stats.reset.remote())
    cfg = DataConfig(source=dst, split="train", img_size=32, patch_size=4, augment=False,
                     decode_batch_size=4, rows_per_unit=6)
    ds, info, _ = build_dataset(cfg)
    assert info.kind == "parquet" and info.num_rows == m["splits"]["train"]["count"]
    # Ground truth: decode each stored image on the driver with the same eval transform.
    import pyarrow.parquet as pq
    from pipeline.storage import pyarrow_fs
    from pipeline.transforms import transform_image
    fs, _ = pyarrow_fs(dst)
    truth = {}
    for f in info.files:
        t = pq.read_table(f, filesystem=fs)
        for k, img, lab in zip(t["key"].to_pylist(), t["image"].to_pylist(), t["label"].to_pylist()):
            truth[transform_image(img, cfg.transform(), np.random.default_rng(0)).tobytes()] = (k, lab)
    for epoch in range(2):
        splits = ds.streaming_split(2, equal=False)
        outs = [[], []]
        threads = [threading.Thread(target=_consume, args=(s.iter_batches(batch_size=5, batch_format="numpy"), o))
                   for s, o in zip(splits, outs)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        seen = []
        for out in outs:
            for patches, labels in out:
                for p, lab in zip(patches, labels):
                    k, true_label = truth[p.tobytes()]
                    assert lab == true_label  # labels preserved
                    seen.append(k)
        assert all(len(o) > 0 for o in outs)  # both consumers got data
        assert sorted(seen) == sorted(k for k, _ in truth.values())  # each exactly once
        expected_labels = {CLASSES[i] for i in range(4)}
        assert {m["classes"][truth_lab] for _, truth_lab in truth.values()} == expected_labels
    assert pipeline_stats()["ok"] == 2 * len(truth)


def test_a_position_set_on_the_runs_position_actor_moves_the_start(prepared):
    """What a restarted worker group does: its rank 0 sets the checkpoint's (item, row) on the run's
    position actor after the driver built the dataset, before iterating; the stream then starts
    there (the units before it are never read), not at the driver's start."""
    import ray
    from pipeline.runactor import release_run_actor, run_actor_name
    from pipeline.stream import position_actor
    dst, m, _ = prepared
    run_id = "test-position-run"
    cfg = DataConfig(source=dst, split="train", img_size=32, patch_size=4, augment=False,
                     decode_batch_size=4, rows_per_unit=6, deterministic=True)
    try:
        ds, _, stream = build_dataset(cfg, run_id=run_id)
        assert stream.num_units > 2
        consumed = stream.unit_rows[0] + stream.unit_rows[1] + 1  # two whole units and one row
        ray.get(position_actor(run_id).set.remote(*stream.locate(consumed)))
        assert tuple(ray.get(position_actor(run_id).get.remote())) == (2, 1)
        rows = sum(len(b["patches"]) for b in ds.iter_batches(batch_size=16, batch_format="numpy"))
        assert rows == stream.rows_per_epoch - consumed
    finally:
        release_run_actor(run_actor_name(run_id))  # the run's one actor: its position and counters


def test_image_folder_source_skips_and_counts_bad_files(src_dir, bucket, ray_cluster):
    import ray
    root, odd = src_dir
    stats = stats_actor()
    ray.get(stats.reset.remote())
    cfg = DataConfig(source=f"s3://{bucket}/raw", img_size=32, patch_size=4, decode_batch_size=8,
                     rows_per_unit=8)
    ds, info, _ = build_dataset(cfg)
    assert info.kind == "images" and info.classes == sorted(CLASSES)
    rows = 0
    labels = []
    for b in ds.iter_batches(batch_size=16, batch_format="numpy"):
        rows += len(b["patches"])
        labels.extend(b["label"].tolist())
        assert b["patches"].dtype == np.uint8 and b["patches"].shape[1:] == (64, 48)
    n_bad = sum(not v for v in odd.values())
    assert rows == 40 + sum(odd.values())
    assert sorted(set(labels)) == [0, 1, 2, 3]
    s = pipeline_stats()
    assert s["ok"] == rows and sum(s["skipped"].values()) == n_bad
    assert all(ex for ex in s["examples"].values())


def shard_keys(dst: str, m: dict) -> list[str]:
    """Every image key in the prepared dataset ``dst``'s shards (manifest ``m``), as often as stored."""
    import io

    import pyarrow.parquet as pq
    return sorted(k for split in m["splits"].values() for f in split["files"]
                  for k in pq.read_table(io.BytesIO(read_bytes(f"{dst}/{f}")), columns=["key"])["key"].to_pylist())


def test_prepare_retries_read_errors_and_never_records_them_as_skips(prepared, bucket, s3):
    """An overloaded store: 10% of every request (lists, reads, writes, of any key) answered 503
    SlowDown or 500 at random, and one folder's reads denied twice, while `mae prepare` runs. It
    finishes with the clean run's dataset: every image stored once, the same skips, nothing
    recorded as unreadable. Denied for good, it fails in one line and writes no manifest."""
    dst, m, _ = prepared
    src = f"s3://{bucket}/raw"
    prefix = f"/{bucket}/raw/{CLASSES[2]}/"
    # denied twice (the S3 client does not retry a 403): the shard's task runs again and succeeds
    s3.proxy.fail_next(prefix, 2, status=403)
    s3.proxy.flaky(0.10, seed=7)
    mark = s3.proxy.mark()
    try:
        m2 = prepare(PrepareConfig(src=src, dst=f"s3://{bucket}/shards-flaky", shard_size_mb=0.02,
                                   val_fraction=0.25), progress=False)
    finally:
        s3.proxy.clear_faults()
    reqs = s3.proxy.since(mark)
    refused = [r for r in reqs if r.status in (500, 503)]
    print(f"{len(refused)} of {len(reqs)} requests refused:", Counter(r.method for r in refused))
    assert len(refused) >= 0.05 * len(reqs) and sum(r.status == 403 for r in reqs) == 2
    assert m2["counts"] == m["counts"] and m2["skipped"] == m["skipped"] and m2["splits"] == m["splits"]
    keys = shard_keys(f"s3://{bucket}/shards-flaky", m2)  # nothing lost, nothing twice
    assert keys == shard_keys(dst, m) and len(keys) == len(set(keys)) == m["counts"]["ok"]
    # denied for good: the job fails with one line naming the file, and writes no manifest (one
    # retry here: the default 4 back off for ~7 s in all, which only the clock would see)
    s3.proxy.fail_next(prefix, 10_000, status=403)
    try:
        with pytest.raises(StorageError) as e:
            prepare(PrepareConfig(src=src, dst=f"s3://{bucket}/shards-denied", shard_size_mb=0.02, read_retries=1),
                    progress=False)
    finally:
        s3.proxy.clear_faults()
    msg = str(e.value)
    assert "\n" not in msg and f"raw/{CLASSES[2]}/" in msg and "retries" in msg, msg
    from pipeline.storage import exists
    assert not exists(f"s3://{bucket}/shards-denied/manifest.json")
    # --overwrite never deletes a whole bucket
    with pytest.raises(StorageError, match="whole bucket"):
        prepare(PrepareConfig(src=src, dst=f"s3://{bucket}", overwrite=True), progress=False)
    assert exists(f"{dst}/manifest.json")


def test_the_filesystem_a_ray_process_is_handed_keeps_its_s3_retries(bucket, s3, ray_cluster):
    """Ray hands the run's pyarrow filesystem to the Train controller, the workers and the data
    tasks pickled. Each must retry a throttled request as often as the driver's (pyarrow's own
    S3FileSystem pickles without its retry strategy: 3 attempts, and a run under 10% throttling
    failed writing its run state). Here a Ray task reads through it while the store refuses the
    key 3 times (500: a 503's throttling back-off takes seconds more)."""
    import ray

    from pipeline.storage import S3_ATTEMPTS, pyarrow_fs, write_bytes
    uri = f"s3://{bucket}/retries/blob"
    write_bytes(uri, b"x" * 1000)
    fs, path = pyarrow_fs(uri)

    @ray.remote(num_cpus=0)
    def read(fs, path):
        with fs.open_input_stream(path) as f:
            return f.read()

    assert S3_ATTEMPTS > 3
    s3.proxy.fail_next(f"/{path}", 3, status=500)
    mark = s3.proxy.mark()
    try:
        assert ray.get(read.remote(fs, path)) == b"x" * 1000
    finally:
        s3.proxy.clear_faults()
    assert sum(r.status == 500 for r in s3.proxy.since(mark)) == 3  # the refusals happened


def test_decode_tasks_retry_transient_storage_errors(prepared, src_dir, bucket, s3):
    """The store refuses one shard's reads (and one folder image's) for a moment, as while a node's
    credentials refresh (the S3 client does not retry a 403 itself): the decode task retries the
    read with backoff; every image arrives, none is lost or recorded as a skip."""
    import ray
    dst, m, _ = prepared
    stats = stats_actor()
    shard = m["splits"]["train"]["files"][0]
    ray.get(stats.reset.remote())
    cfg = DataConfig(source=dst, split="train", img_size=32, patch_size=4, augment=False, rows_per_unit=6)
    ds, info, _ = build_dataset(cfg)  # (footers are read here, before the faults)
    s3.proxy.fail_next(f"/{bucket}/shards/{shard}", 2, status=403)
    mark = s3.proxy.mark()
    rows = sum(len(b["patches"]) for b in ds.iter_batches(batch_size=16, batch_format="numpy"))
    assert sum(r.status == 403 for r in s3.proxy.since(mark)) == 2  # the faults happened
    assert rows == m["splits"]["train"]["count"] and pipeline_stats()["ok"] == rows
    # an image folder: a read error is retried, not counted as an "empty" image
    root, odd = src_dir
    ray.get(stats.reset.remote())
    cfg = DataConfig(source=f"s3://{bucket}/raw", img_size=32, patch_size=4, rows_per_unit=8)
    ds, _, _ = build_dataset(cfg)
    s3.proxy.fail_next(f"/{bucket}/raw/{CLASSES[1]}/", 2, status=403)
    rows = sum(len(b["patches"]) for b in ds.iter_batches(batch_size=16, batch_format="numpy"))
    assert rows == 40 + sum(odd.values())
    assert sum(pipeline_stats()["skipped"].values()) == sum(not v for v in odd.values())


def test_resolve_errors_are_one_line(bucket, s3):
    with pytest.raises(StorageError, match="bucket does not exist"):
        resolve("s3://no-such-bucket-here/x")
    with pytest.raises(StorageError, match="no images or Parquet shards"):
        resolve(f"s3://{bucket}/empty-prefix/")


def test_prepare_cli_bad_input_one_line(bucket, s3, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ""}
    r = subprocess.run([sys.executable, "-m", "jobs.prepare", "s3://no-such-bucket-x/raw", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith("mae prepare: error: s3://no-such-bucket-x/raw") and "Traceback" not in r.stderr
    assert s3.env()["AWS_SECRET_ACCESS_KEY"] not in r.stderr + r.stdout


def test_prepare_spreads_every_class_over_every_shard_the_same_on_rerun():
    """An ImageFolder listing is sorted by class; the shards are not: each holds every class in
    close to equal shares (a micro-batch sees the whole dataset's mix), and a rerun plans the same."""
    from collections import Counter

    from pipeline.prepare import plan_shards
    files = [(f"/src/{c}/{i:04d}.jpg", 1000) for c in ("a", "b", "c", "d") for i in range(200)]
    cfg = PrepareConfig(src="/src", dst="/dst", shard_size_mb=100 * 1000 / 2**20)  # 100 images a shard
    shards = plan_shards(files, "/src", cfg)
    assert len(shards) == 8 and sum(len(s["items"]) for s in shards) == 800
    for s in shards:
        per_class = Counter(key.split("/")[0] for _, key in s["items"])
        assert sorted(per_class) == ["a", "b", "c", "d"], per_class
        assert all(10 <= n <= 40 for n in per_class.values()), per_class  # 25 each on average
    assert plan_shards(files, "/src", cfg) == shards  # deterministic
    other = plan_shards(files, "/src", PrepareConfig(src="/src", dst="/dst", shard_size_mb=cfg.shard_size_mb, seed=1))
    assert other != shards and sorted(map(str, other)) != sorted(map(str, shards))


def test_gpu_decode_mode_streams_bytes_and_boxes_that_decode_to_the_cpu_modes_patches(prepared):
    """data.decode=gpu: the decode tasks ship encoded bytes, crop boxes and flips (drawn with the
    CPU mode's per-row seeds) in blocks of output_block_rows; decoded on the consumer's device
    (here the CPU device) they give the CPU mode's patches, row for row, within rounding."""
    import torch

    from pipeline.gpu_decode import decode_on_device
    dst, _, _ = prepared
    common = dict(source=dst, split="train", img_size=32, patch_size=4, augment=True, deterministic=True,
                  reduced_decode=False, decode_batch_size=4, rows_per_unit=12, output_block_rows=8)
    cpu_ds, _, _ = build_dataset(DataConfig(**common, decode="cpu"))
    gpu_ds, _, _ = build_dataset(DataConfig(**common, decode="gpu"))
    cpu = list(cpu_ds.iter_batches(batch_size=None, batch_format="numpy"))
    gpu = list(gpu_ds.iter_batches(batch_size=None, batch_format="numpy"))
    # blocks coalesce decode batches (of at most 4 rows); a deterministic stream ships one image
    # per block (pipeline.dataset._dataset: what makes a multi-worker resume exact)
    assert max(len(b["label"]) for b in gpu) == 1
    shuffled, _, _ = build_dataset(DataConfig(**{**common, "deterministic": False}, decode="gpu"))
    assert max(len(b["label"]) for b in shuffled.iter_batches(batch_size=None, batch_format="numpy")) > 4
    want = np.concatenate([b["patches"] for b in cpu])
    got, labels = [], []
    for b in gpu:
        assert set(b) == {"image", "box", "flip", "orient", "label"}
        x, keep, skipped = decode_on_device(b["image"], b["box"], b["flip"], b["orient"], img_size=32,
                                            patch_size=4, device=torch.device("cpu"))
        assert skipped == 0
        got.append(x.numpy())
        labels.append(b["label"][keep])
    got = np.concatenate(got)
    assert got.shape == want.shape and (np.concatenate(labels) == np.concatenate([b["label"] for b in cpu])).all()
    diff = np.abs(got.astype(int) - want.astype(int))
    # float vs uint8 fixed-point bicubic: off by one here and there; the bilevel PNG's hard 0/255
    # edges by up to ~13
    assert diff.mean() < 0.5 and (diff <= 1).mean() > 0.995 and diff.max() <= 16, (diff.mean(), diff.max())


def test_a_segment_seam_neither_repeats_nor_skips_an_image(prepared):
    """A long run's stream in segments (one Ray Data execution each, two datasets taking turns, the
    next opened in the background before the seam): in deterministic mode the rows of three
    segments, from a start mid-unit, are the rows of the one-execution stream, crops included, and
    in batches of the full size across the seams."""
    import ray
    import torch

    from pipeline.dataset import build_segments
    from pipeline.segments import Segments, segment_batches
    from pipeline.runactor import release_run_actor, run_actor_name
    from pipeline.stream import position_actor
    dst, _, _ = prepared
    cfg = DataConfig(source=dst, split="train", img_size=32, patch_size=4, augment=True, decode_batch_size=4,
                     rows_per_unit=6, deterministic=True, prefetch_batches=1)
    runs = ("test-seam-one", "test-seam-segments")
    try:
        one, _, stream = build_dataset(cfg, epochs=4, start_image=9, run_id=runs[0])
        assert stream.rows_per_epoch % 7 and stream.locate(9)[1] > 0  # partial batches at seams, a mid-unit start
        want = torch.cat([b["patches"] for b in one.iter_torch_batches(batch_size=7, drop_last=False)])
        pair, _, _ = build_segments(cfg, epochs_per_segment=1, start_image=9, run_id=runs[1])
        shards = [d.streaming_split(1, equal=True)[0] for d in pair]  # as Ray Train hands them to a worker
        opened = []

        def open_segment(s):
            opened.append(s)
            ray.get(position_actor(runs[1]).set_segment.remote(s % 2, s))
            return shards[s % 2].iter_torch_batches(batch_size=7, drop_last=False, prefetch_batches=1)
        seg = Segments(1, stream.rows_per_epoch, world=1)
        it = segment_batches(open_segment, seg, start_image=9, batch_size=7, lookahead_rows=10)
        n = 3 * stream.rows_per_epoch - 9  # to the end of segment 2, across two seams
        got = [next(it) for _ in range(n // 7)]
        assert all(len(b["patches"]) == 7 for b in got)
        got = torch.cat([b["patches"] for b in got])
        assert torch.equal(got, want[:len(got)])
        assert opened[:3] == [0, 1, 2]
        it.close()  # waits for segment 3, opened in the background, before the actors go
    finally:
        for r in runs:
            release_run_actor(run_actor_name(r))
