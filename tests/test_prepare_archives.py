"""mae prepare of tar archives read in place on the S3 server: ImageNet's train tar (a tar of
per-class tars), its flat val tar with Kaggle's LOC_val_solution.csv, webdataset shards
(KEY.jpg + KEY.cls) and a tar of an ImageFolder; the label files' parsers; the one-line errors.

The archives are built here: a few classes x a few tiny JPEGs, and a broken member in each."""

import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.archives import list_images, parse_labels, read_member
from pipeline.prepare import PrepareConfig, plan, prepare
from pipeline.storage import StorageError, fsspec_fs, list_files

WNIDS = ["n01440764", "n01443537", "n01484850"]  # sorted: the train indices 0, 1, 2
BROKEN = np.random.default_rng(0).bytes(300_000)  # a member that is no image, far larger than a header read


def jpeg(seed: int) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    b = io.BytesIO()
    Image.fromarray(a).save(b, "JPEG", quality=80)
    return b.getvalue()


def tar(members: list[tuple[str, bytes]]) -> bytes:
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w") as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return b.getvalue()


def train_tar() -> tuple[bytes, dict[str, bytes]]:
    """ILSVRC2012_img_train.tar as distributed: n01440764.tar ..., each of that class's JPEGs,
    inner tars in an unsorted order; one broken member. -> (the tar, {key: bytes})."""
    images, inner = {}, []
    for c, wnid in enumerate(WNIDS[::-1]):
        members = [(f"{wnid}_{i}.JPEG", jpeg(10 * c + i)) for i in range(3)]
        if wnid == WNIDS[1]:
            members.insert(1, (f"{wnid}_broken.JPEG", BROKEN))
        images.update({f"{wnid}/{n}": d for n, d in members})
        inner.append((f"{wnid}.tar", tar(members)))
    return tar(inner), images


VAL = {f"ILSVRC2012_val_{i:08d}": WNIDS[1 + i % 2] for i in range(1, 7)}  # 2 of the 3 classes


def put(uri: str, data: bytes) -> None:
    fs, p = fsspec_fs(uri)
    fs.pipe_file(p, data)


def read_shards(dst: str, files: list[str]) -> dict[str, tuple[bytes, int]]:
    import pyarrow.parquet as pq

    from pipeline.storage import pyarrow_fs
    fs, root = pyarrow_fs(dst)
    out = {}
    for f in files:
        t = pq.read_table(f"{root}/{f}", filesystem=fs)
        out.update(zip(t["key"].to_pylist(), zip(t["image"].to_pylist(), t["label"].to_pylist())))
    return out


# ---------------------------------------------------------------------------- no Ray
def test_label_file_parsers():
    kaggle = ("\ufeffImageId,PredictionString\n"
              "ILSVRC2012_val_00008726,n02119789 255 142 454 329 n02119789 44 21 322 295\n"
              "ILSVRC2012_val_00000001,n01751748 1 2 3 4\n\n")
    assert parse_labels(kaggle, "LOC_val_solution.csv") == {"ILSVRC2012_val_00008726": "n02119789",
                                                             "ILSVRC2012_val_00000001": "n01751748"}
    plain = "# filename wnid\nILSVRC2012_val_00000001.JPEG n01751748\n\nsub/ILSVRC2012_val_00000002.JPEG  n09193705\n"
    assert parse_labels(plain, "val.txt") == {"ILSVRC2012_val_00000001": "n01751748",
                                              "ILSVRC2012_val_00000002": "n09193705"}
    tabs = "a.jpg\tsea snake\nb.png\tgreat white shark\n"
    assert parse_labels(tabs, "val.tsv") == {"a": "sea snake", "b": "great white shark"}
    assert parse_labels("x.JPEG 65\ny.JPEG 0\n", "val.txt") == {"x": 65, "y": 0}  # Caffe's: indexes
    assert parse_labels("x.JPEG 65\ny.JPEG n01\n", "val.txt") == {"x": "65", "y": "n01"}  # names
    for text, says in [("490\n361\n", "LOC_val_solution.csv"),  # the devkit's ground truth: its own ids
                       ("a.jpg n01 extra\n", "not 'FILENAME CLASS'"),
                       ("ImageId,PredictionString\nILSVRC2012_val_00000001,\n", "line 2 has no prediction"),
                       ("\n# nothing\n", "no labels")]:
        with pytest.raises(StorageError, match=says) as e:
            parse_labels(text, "s3://b/labels.txt")
        assert str(e.value).startswith("s3://b/labels.txt: ") and "\n" not in str(e.value)


def test_tar_of_tars_listed_by_headers_and_read_by_ranges(tmp_path):
    data, images = train_tar()
    (tmp_path / "train.tar").write_bytes(data)
    fs, _ = fsspec_fs(str(tmp_path))
    members = list_images(fs, [(str(tmp_path / "train.tar"), len(data))])
    assert {m.name: read_member(fs, m.archive, m.offset, m.size) for m in members} == images
    (tmp_path / "cut.tar").write_bytes(data[:len(data) // 2])  # a download cut short
    at = members[1].offset - 512  # the header of the first inner tar's second member
    (tmp_path / "hit.tar").write_bytes(data[:at] + b"x" * 512 + data[at + 512:])
    for name in ("cut.tar", "hit.tar"):
        with pytest.raises(StorageError, match="not a readable tar.*download it again") as e:
            list_images(fs, [(str(tmp_path / name), os.path.getsize(tmp_path / name))], retries=0)
        assert str(e.value).startswith(str(tmp_path / name)) and "\n" not in str(e.value)


def test_flat_val_folder_with_a_label_file_and_its_errors(tmp_path):
    """The val images as a flat folder with 'FILENAME<TAB>WNID' lines: every image its class;
    an image the file does not list, a listed class that --classes-from lacks: one line each."""
    src = tmp_path / "val"
    src.mkdir()
    for i, stem in enumerate(VAL):
        (src / f"{stem}.JPEG").write_bytes(jpeg(100 + i))
    labels = tmp_path / "val.tsv"
    labels.write_text("".join(f"{s}.JPEG\t{w}\n" for s, w in VAL.items()))
    cfg = PrepareConfig(src=str(src), dst=str(tmp_path / "out"), split="val", labels=str(labels))
    p = plan(cfg)
    assert p.classes == WNIDS[1:]  # the label file's classes
    shards = [s for s in p.shards if not s.get("probe")]
    assert {s["split"] for s in p.shards} == {"val"} and [s["name"][:4] for s in shards] == ["val-"]
    got = {key: cls for s in shards for (_, key), cls in zip(s["items"], s["labels"])}
    assert got == {f"{s}.JPEG": w for s, w in VAL.items()}
    (src / "ILSVRC2012_val_00000099.JPEG").write_bytes(jpeg(99))
    with pytest.raises(StorageError) as e:
        plan(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "ILSVRC2012_val_00000099.JPEG has no label in" in msg and "LOC_val_solution" in msg
    with pytest.raises(ValueError, match="--split val with --val-fraction"):
        plan(PrepareConfig(src=str(src), dst=str(tmp_path / "out"), split="val", val_fraction=0.1))


# ---------------------------------------------------------------------------- on the S3 server, with Ray


@pytest.fixture(scope="module")
def imagenet(bucket, ray_cluster, s3):
    """ILSVRC2012_img_train.tar on the S3 server, planned (what the driver reads of it counted) and
    prepared; the val tar and LOC_val_solution.csv beside it."""
    data, images = train_tar()
    src = f"s3://{bucket}/imagenet/ILSVRC2012_img_train.tar"
    put(src, data)
    put(f"s3://{bucket}/imagenet/ILSVRC2012_img_val.tar",
        tar([(f"{s}.JPEG", jpeg(200 + i)) for i, s in enumerate(VAL)] + [("ILSVRC2012_val_00000007.JPEG", b"")]))
    put(f"s3://{bucket}/imagenet/LOC_val_solution.csv",
        ("ImageId,PredictionString\n" + "".join(f"{s},{w} 1 2 30 40\n" for s, w in VAL.items())
         + "ILSVRC2012_val_00000007,n01484850 1 2 3 4\n").encode())
    cfg = PrepareConfig(src=src, dst=f"s3://{bucket}/imagenet-train", shard_size_mb=0.01)
    mark = s3.proxy.mark()
    the_plan = plan(cfg)
    planned = s3.proxy.mark()
    m = prepare(cfg, progress=False, the_plan=the_plan)
    reqs = s3.proxy.since(mark)
    archive = [(i < planned - mark, r) for i, r in enumerate(reqs) if r.path.endswith("/ILSVRC2012_img_train.tar")]
    return cfg.dst, m, images, len(data), archive


@pytest.mark.ray
@pytest.mark.s3
def test_imagenet_train_tar_of_tars_prepared_from_ranges(imagenet):
    dst, m, images, size, archive = imagenet
    assert m["classes"] == WNIDS
    assert m["counts"]["listed"] == 10 and m["counts"]["ok"] == 9 and m["counts"]["skipped"] == 1
    assert m["skipped"] == [{"key": f"{WNIDS[1]}/{WNIDS[1]}_broken.JPEG", "reason": "not_an_image"}]
    assert set(m["splits"]) == {"train"} and len(m["splits"]["train"]["files"]) > 1
    rows = read_shards(dst, m["splits"]["train"]["files"])
    assert {k: img for k, (img, _) in rows.items()} == {k: v for k, v in images.items() if "broken" not in k}
    assert all(lab == WNIDS.index(k.split("/")[0]) for k, (_, lab) in rows.items())
    # Headers only while planning, one range per image after it: no read of the whole archive.
    gets = [(listing, r) for listing, r in archive if r.method == "GET"]
    assert sum(r.received for listing, r in gets if listing) < size / 3
    assert max(r.received for _, r in gets) <= len(BROKEN)
    assert sum(not listing for listing, _ in gets) >= 10


@pytest.mark.ray
@pytest.mark.s3
def test_imagenet_val_tar_takes_the_train_classes_and_its_errors_are_one_line(imagenet, bucket):
    train, _, _, _, _ = imagenet
    src, labels = f"s3://{bucket}/imagenet/ILSVRC2012_img_val.tar", f"s3://{bucket}/imagenet/LOC_val_solution.csv"
    dst = f"s3://{bucket}/imagenet-val"
    m = prepare(PrepareConfig(src=src, dst=dst, split="val", labels=labels, classes_from=train), progress=False)
    assert m["classes"] == WNIDS and set(m["splits"]) == {"val"}
    assert m["counts"]["ok"] == 6 and m["skipped"] == [{"key": "ILSVRC2012_val_00000007.JPEG", "reason": "empty"}]
    on_s3 = sorted(p.rsplit("/", 1)[-1] for p, _ in list_files(dst))
    assert on_s3 == ["manifest.json", "probe-val.parquet", "val-00000-of-00001.parquet"]
    assert m["probe"] == {"val": {"file": "probe-val.parquet", "count": 6}}
    for f in ("val-00000-of-00001.parquet", "probe-val.parquet"):
        rows = read_shards(dst, [f])
        assert {k: lab for k, (_, lab) in rows.items()} == {f"{s}.JPEG": WNIDS.index(w) for s, w in VAL.items()}
    # Without --classes-from: the label file's classes (2 here), indexed among themselves.
    assert plan(PrepareConfig(src=src, dst=f"{dst}-alone", labels=labels)).classes == WNIDS[1:]
    # A label naming a class the train set lacks: one line naming the file and the fix.
    put(f"s3://{bucket}/imagenet/other.txt", "".join(f"{s}.JPEG n09999999\n" for s in VAL).encode()
        + b"ILSVRC2012_val_00000007.JPEG n01440764\n")
    with pytest.raises(StorageError) as e:
        plan(PrepareConfig(src=src, dst=f"{dst}-x", labels=f"s3://{bucket}/imagenet/other.txt", classes_from=train))
    msg = str(e.value)
    assert "\n" not in msg and "ILSVRC2012_val_00000001.JPEG is labeled 'n09999999'" in msg and train in msg, msg
    assert "same dataset" in msg
    # The command line: a val image the label file leaves out, refused before Ray starts.
    put(f"s3://{bucket}/imagenet/short.csv", b"ImageId,PredictionString\nILSVRC2012_val_00000001,n01443537 1 2 3 4\n")
    env = {**os.environ, "RAY_ADDRESS": ""}
    r = subprocess.run([sys.executable, "-m", "jobs.prepare", src, f"{dst}-y", "--split", "val",
                        "--labels", f"s3://{bucket}/imagenet/short.csv", "--classes-from", train],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith(f"mae prepare: error: {src}: ILSVRC2012_val_00000002.JPEG (and 5 more) has no label in "
                          f"s3://{bucket}/imagenet/short.csv: give the label file"), r.stderr
    assert "Traceback" not in r.stderr and os.environ["AWS_SECRET_ACCESS_KEY"] not in r.stderr + r.stdout


@pytest.mark.ray
@pytest.mark.s3
def test_webdataset_shards_and_a_tar_of_an_image_folder(bucket, ray_cluster):
    """A prefix of webdataset shards: labels from KEY.cls, other members ignored, a broken image
    skipped; a tar holding class/file.jpg: labels from the folders."""
    expect = {}
    for s in range(2):
        members = []
        for i in range(4):
            key, cls = f"{s:03d}{i:03d}", (s + i) % 3
            data = b"\xff\xd8\xff broken" if (s, i) == (1, 2) else jpeg(300 + 10 * s + i)
            members += [(f"{key}.jpg", data), (f"{key}.cls", f"{cls}\n".encode()), (f"{key}.json", b"{}")]
            expect[f"shard-{s:05d}.tar/{key}.jpg"] = cls
        put(f"s3://{bucket}/wds/shard-{s:05d}.tar", tar(members))
    put(f"s3://{bucket}/wds/README.md", b"shards")  # neither archive nor image: not read
    dst = f"s3://{bucket}/wds-prepared"
    m = prepare(PrepareConfig(src=f"s3://{bucket}/wds", dst=dst), progress=False)
    assert m["classes"] == ["0", "1", "2"] and m["counts"]["ok"] == 7
    assert [d["key"] for d in m["skipped"]] == ["shard-00001.tar/001002.jpg"]
    rows = read_shards(dst, m["splits"]["train"]["files"])
    del expect["shard-00001.tar/001002.jpg"]
    assert {k: lab for k, (_, lab) in rows.items()} == expect
    # a tar of an ImageFolder
    put(f"s3://{bucket}/folder.tar", tar([(f"{c}/{i}.jpg", jpeg(400 + i)) for c in ("dog", "cat") for i in range(2)]))
    m = prepare(PrepareConfig(src=f"s3://{bucket}/folder.tar", dst=f"s3://{bucket}/folder-prepared"), progress=False)
    assert m["classes"] == ["cat", "dog"] and m["counts"]["ok"] == 4
    rows = read_shards(f"s3://{bucket}/folder-prepared", m["splits"]["train"]["files"])
    assert {k: lab for k, (_, lab) in rows.items()} == {f"{c}/{i}.jpg": int(c == "dog") for c in ("dog", "cat")
                                                         for i in range(2)}
    # a sample without its .cls among labeled ones: one line
    put(f"s3://{bucket}/wds/shard-00002.tar", tar([("002000.jpg", jpeg(1))]))
    with pytest.raises(StorageError, match="shard-00002.tar/002000.jpg has no KEY.cls"):
        plan(PrepareConfig(src=f"s3://{bucket}/wds", dst=f"{dst}-x"))
