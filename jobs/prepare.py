r"""mae prepare SRC DST: shard images into Parquet + a manifest: a folder or bucket prefix of images,
or tar archives read in place (ImageNet as distributed, webdataset shards), never extracted.

    mae prepare s3://raw/imagenet/train s3://data/imagenet-shards --val-fraction 0.01
    mae prepare s3://raw/imagenet/ILSVRC2012_img_train.tar s3://data/imagenet/train --val-fraction 0.01
    mae prepare s3://raw/imagenet/ILSVRC2012_img_val.tar s3://data/imagenet/val --split val \
        --labels s3://raw/imagenet/LOC_val_solution.csv --classes-from s3://data/imagenet/train
    python -m jobs.prepare ./images ./shards            (the form `ray job submit` runs)

SRC holds:
  images             class_name/file.jpg gives labels (classes sorted by name), a flat folder none
  a .tar, or a prefix of .tar files, read by byte ranges:
    a tar of tars    ILSVRC2012_img_train.tar: n01440764.tar ... -> label = the inner tar's name
    a flat tar       ILSVRC2012_img_val.tar: labels from --labels
    webdataset       KEY.jpg (.jpeg/.png/.webp) + KEY.cls (the class index as text)
    a tar of images  class_name/file.jpg inside gives labels, as a folder does
"""

from __future__ import annotations

import argparse
import json

from jobs.core.common import init_ray, one_line_errors, parse_args
from pipeline.prepare import PrepareConfig, check_values, plan, prepare


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mae prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="folder or bucket prefix of images (recursive; class_name/file.jpg gives labels), "
                                "a .tar object, or a prefix of .tar files (see above)")
    ap.add_argument("dst", help="where the Parquet shards and manifest.json go (must be empty)")
    ap.add_argument("--shard-size-mb", type=float, default=128.0, help="target shard size (default 128)")
    ap.add_argument("--val-fraction", type=float, default=0.0,
                    help="fraction of images put in a 'val' split by a seeded hash of the key")
    ap.add_argument("--seed", type=int, default=0, help="seed of the train/val hash split")
    ap.add_argument("--split", default="train",
                    help="the split every image goes to (default train; val for a validation set prepared "
                         "on its own)")
    ap.add_argument("--labels", default=None, metavar="URI",
                    help="label file: Kaggle's LOC_val_solution.csv, or lines of 'FILENAME CLASS' (or "
                         "FILENAME<TAB>CLASS; integer classes are indexes); matched on the file name less its suffix")
    ap.add_argument("--classes-from", default=None, metavar="PREPARED_DATASET_URI",
                    help="take the class list (label i = its i-th class) from a prepared dataset's "
                         "manifest.json: the train set's DST for a val set (default: the label file's "
                         "classes, else the source's, sorted by name)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty destination (a prefix, never a bucket)")
    ap.add_argument("--shared-fs", action="store_true",
                    help="local SRC/DST are on a filesystem every node mounts (else refused on a multi-node cluster)")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    return ap


def config_of(a: argparse.Namespace) -> PrepareConfig:
    return PrepareConfig(src=a.src, dst=a.dst, shard_size_mb=a.shard_size_mb, val_fraction=a.val_fraction,
                         seed=a.seed, overwrite=a.overwrite, shared_fs=a.shared_fs, split=a.split,
                         labels=a.labels, classes_from=a.classes_from)


def check(argv: list[str]) -> None:
    """What ``mae submit`` checks on the user's machine before a job exists: the arguments and
    their values. SRC and DST are the cluster's to read (a local path there is not one here)."""
    check_values(config_of(parse_args(parser(), argv, strict=True)))


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    with one_line_errors("mae prepare"):
        cfg = config_of(a)
        the_plan = plan(cfg)  # bad input fails here, before Ray starts
        init_ray(a.address)
        m = prepare(cfg, the_plan=the_plan)
    c = m["counts"]
    print(f"prepared {c['ok']} images from {m['source']} into {a.dst}: "
          + ", ".join(f"{k} {v['count']} in {len(v['files'])} shards" for k, v in m["splits"].items())
          + (f"; classes: {len(m['classes'])}" if m["classes"] else "; unlabeled"))
    if c["skipped"]:
        print(f"skipped {c['skipped']} files: {json.dumps(c['skipped_by_reason'])} (listed in manifest.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
