"""mae evaluate: a checkpoint trained on learnable synthetic data against the same encoder at
random init, both scored by k-NN and a linear probe on held-out labeled images."""

import json

import pytest
import torch

from jobs.probe import knn_top1, linear_probe_top1

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]


def test_knn_and_linear_probe_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 3
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 16, generator=g)
    assert knn_top1(x[:200], y[:200], x[200:], y[200:]) > 0.95
    assert linear_probe_top1(x[:200], y[:200], x[200:], y[200:], epochs=30) > 0.95
    noise = torch.randn(300, 16, generator=g)
    assert knn_top1(noise[:200], y[:200], noise[200:], y[200:]) < 0.6


def test_evaluate_trained_beats_random_init(labeled_dir, bucket, ray_cluster, tmp_path):
    from jobs.config import load
    from jobs.evaluate import evaluate, main
    from jobs.pretrain import fit, run_dir_of
    from pipeline.prepare import PrepareConfig, prepare
    from pipeline.storage import read_bytes
    shards = f"s3://{bucket}/eval-shards"
    prepare(PrepareConfig(src=labeled_dir, dst=shards, shard_size_mb=0.05, val_fraction=0.3), progress=False)
    cfg = load(None, ["model.preset=mae_vit_micro_patch4", f"data.source={shards}", "data.rows_per_unit=16",
                      "train.batch_size=16", "train.max_steps=60", "train.log_every=20", "train.ckpt_every=60",
                      "train.vis_images=0", "optim.base_lr=0.02", "optim.warmup_steps=5", "optim.clip_grad=1.0",
                      "scaling.num_workers=2", f"run.storage_path=s3://{bucket}/runs", "run.name=eval-src"])
    assert fit(cfg)[0].error is None
    run = run_dir_of(cfg)
    trained = evaluate(run, shards, workers=2)
    rand = evaluate(run, shards, workers=2, random_init=True)
    print("trained:", trained, "\nrandom:", rand)
    assert trained["val_images"] > 10 and trained["classes"] == 4
    best_trained = max(trained["knn_top1/cls"], trained["knn_top1/mean"])
    best_rand = max(rand["knn_top1/cls"], rand["knn_top1/mean"])
    assert best_trained > best_rand + 0.05
    saved = json.loads(read_bytes(f"{trained['checkpoint']}/evaluation.json"))
    assert saved["knn_top1/cls"] == trained["knn_top1/cls"]
    # the CLI: a missing checkpoint is one clear line
    with pytest.raises(SystemExit) as e:
        main([f"s3://{bucket}/runs/nothing-here", shards])
    assert e.value.code == 2
