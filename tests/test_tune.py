"""mae tune: a small search of a tiny model on CPU with the k-NN objective.

Not covered yet (issue 5 stays open): a killed tune driver restored with Tuner.restore. By hand,
with local storage, `mae tune` killed after its first trial and run again restored the search: all
3 trials ended TERMINATED, and the finished one was not trained again. The same scenario with the
experiment on the S3 server ended with only 2 of the 3 trials complete; the cause is not found yet.
"""

import json

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]

BASE = ["model.preset=mae_vit_micro_patch4", "data.rows_per_unit=16", "data.decode_batch_size=8",
        "train.batch_size=8", "train.max_steps=16", "train.log_every=4", "train.ckpt_every=16",
        "train.vis_images=0", "train.knn_train_images=64", "train.knn_val_images=32",
        "optim.base_lr=0.02", "optim.warmup_steps=2", "optim.clip_grad=1.0", "scaling.num_workers=2",
        "run.max_failures=0"]


@pytest.fixture(scope="module")
def tune_shards(labeled_dir, bucket, ray_cluster):
    from pipeline.prepare import PrepareConfig, prepare
    dst = f"s3://{bucket}/tune-shards"
    prepare(PrepareConfig(src=labeled_dir, dst=dst, shard_size_mb=0.05, val_fraction=0.3), progress=False)
    return dst


def test_search_objective_asha_and_best_config(tune_shards, bucket):
    from jobs.config import load
    from jobs.tune import OBJECTIVE, run_tune
    from pipeline.storage import read_bytes
    base = load(None, [*BASE, f"data.source={tune_shards}", f"run.storage_path=s3://{bucket}/tune"])
    # Grid in order: two sane learning rates, then a deliberately absurd one (last, so that ASHA
    # has the others' results at its first rung when the bad trial gets there).
    space = {"model.overrides.mask_ratio": [0.75], "optim.lr": [0.005, 0.002, 1000.0]}
    grid, rows, tune_dir = run_tune(base, space, name="search", storage=f"s3://{bucket}/tune",
                                    max_concurrent=1, restore=False)
    print(json.dumps(rows, indent=1))
    assert len(rows) == 3
    good = [r for r in rows if r["optim.lr"] != 1000.0]
    bad = [r for r in rows if r["optim.lr"] == 1000.0][0]
    for r in good:  # the recorded objective is the probe accuracy, measured at each report
        assert r[OBJECTIVE] is not None and 0.0 <= r[OBJECTIVE] <= 1.0 and r["images_per_s"] > 0
    # the first trial to reach each ASHA rung is never cut: it used the whole budget (a later sane
    # trial may legitimately be cut at a rung if its k-NN is below the first one's)
    assert good[0]["stopped_at_images"] == 16 * 8 * 2
    # the absurd trial never got to use its whole budget: ASHA (or the non-finite-loss guard) ended it
    assert bad["stopped_at_images"] is None or bad["stopped_at_images"] < 16 * 8 * 2
    best = grid.get_best_result(metric=OBJECTIVE, mode="max", scope="all")
    assert best.config["params"]["optim.lr"] != 1000.0
    for f in ("results.csv", "results.md", "best_config.yaml"):
        assert read_bytes(f"{tune_dir}/{f}")
    import yaml
    best_cfg = yaml.safe_load(read_bytes(f"{tune_dir}/best_config.yaml"))
    assert best_cfg["optim"]["lr"] == best.config["params"]["optim.lr"]
