"""mae evaluate and the probes: k-NN and linear probe on frozen features."""

import json

import pytest
import torch

from jobs.core.probe import knn_top1, linear_probe_top1

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


@pytest.fixture(scope="module")
def layout_shards(bucket, ray_cluster, tmp_path_factory):
    """Labeled images whose 4 classes differ only in the arrangement of two stripe textures
    (pipeline.synthetic.layout_pattern): a random encoder, which pools local patch statistics,
    cannot separate them; an MAE must model the layout to fill in masked patches."""
    from pipeline.prepare import PrepareConfig, prepare
    from pipeline.synthetic import write_labeled_folder
    src = tmp_path_factory.mktemp("layout")
    write_labeled_folder(str(src), n_per_class=128, size=48, seed=2, kind="layout")
    dst = f"s3://{bucket}/eval-layout-shards"
    prepare(PrepareConfig(src=str(src), dst=dst, shard_size_mb=0.05, val_fraction=0.25,
                          shared_fs=True), progress=False)  # the simulated nodes share one disk
    return dst


def test_evaluate_pretrained_encoder_beats_random_init(layout_shards, bucket, tmp_path):
    """End to end: pretrain on the layout set, then `mae evaluate` the checkpoint from object
    storage (features extracted in parallel on the cluster, both probes on both features, JSON
    beside the checkpoint) against the same encoder at random initialization."""
    from jobs.core.config import load
    from jobs.evaluate import evaluate, main
    from jobs.core.launch import fit, run_dir_of
    from pipeline.storage import read_bytes
    cfg = load(None, ["model.preset=mae_vit_micro_patch4", f"data.source={layout_shards}", "data.rows_per_unit=32",
                      "data.decode_batch_size=32", "data.shuffle_buffer=256",
                      # crops keep most of the picture and no flips: the classes are layouts
                      # (a flip turns "h left of v" into "v left of h")
                      "data.crop_scale=[0.5,1.0]", "data.hflip=0",
                      "train.batch_size=32", "train.max_steps=2000", "train.log_every=200", "train.ckpt_every=2000",
                      "train.vis_images=0", "optim.lr=4e-3", "optim.min_lr=2e-3", "optim.warmup_steps=20",
                      "optim.clip_grad=1.0", "scaling.num_workers=1", f"run.storage_path=s3://{bucket}/runs",
                      "run.name=eval-src"])
    assert fit(cfg)[0].error is None
    run = run_dir_of(cfg)
    trained = evaluate(run, layout_shards, workers=2)
    rand = evaluate(run, layout_shards, workers=2, random_init=True)
    print("trained:", trained, "\nrandom:", rand)
    assert trained["classes"] == 4 and trained["train_images"] + trained["val_images"] == 512
    for res in (trained, rand):
        for key in ("knn_top1/cls", "knn_top1/mean", "linear_top1/cls", "linear_top1/mean"):
            assert 0.0 <= res[key] <= 1.0
    best = {p: max(trained[f"{p}/cls"], trained[f"{p}/mean"]) for p in ("knn_top1", "linear_top1")}
    base = {p: max(rand[f"{p}/cls"], rand[f"{p}/mean"]) for p in ("knn_top1", "linear_top1")}
    assert best["knn_top1"] >= base["knn_top1"] + 0.15, (best, base)
    assert best["linear_top1"] >= base["linear_top1"] + 0.10, (best, base)
    saved = json.loads(read_bytes(f"{trained['checkpoint']}/evaluation.json"))
    assert saved["knn_top1/cls"] == trained["knn_top1/cls"]
    assert json.loads(read_bytes(f"{trained['checkpoint']}/evaluation_random_init.json"))["random_init"] is True
    # the CLI: a run without checkpoints is one clear line, exit 2
    with pytest.raises(SystemExit) as e:
        main([f"s3://{bucket}/runs/nothing-here", layout_shards])
    assert e.value.code == 2
