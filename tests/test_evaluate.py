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


def test_feature_actors_leave_a_cpu_for_the_decode_tasks():
    """On a 2-CPU Ray, 2 feature actors of 1 CPU would hold every CPU and the decode tasks feeding
    them would never start (`mae evaluate` waited forever on this machine): capped, or one line."""
    from jobs.core.common import UserError
    from jobs.evaluate import feature_actors
    assert feature_actors(2, 2.0) == 1 and feature_actors(2, 6.0) == 2 and feature_actors(8, 4.0) == 3
    with pytest.raises(UserError, match="CPUs"):
        feature_actors(1, 1.0)


def test_lars_head_and_schedule_follow_the_official_linear_probe():
    """LARS as util/lars.py: >1-D parameters get weight decay and the trust ratio, 1-D ones plain
    momentum SGD; the head is BatchNorm(affine=False, eps 1e-6) + Linear(std 0.01, bias 0); the lr
    warms up linearly then follows a half-cycle cosine, per iteration."""
    from jobs.core.probe import LARS, linear_head, probe_lr
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    w.grad, b.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([2.0])
    opt.step()
    d = torch.tensor([[0.3, 1.4]])  # g + wd * w
    q = 0.001 * 5.0 / d.norm()
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.5 * q * d)
    assert torch.allclose(b.detach(), torch.tensor([0.0]))  # 1 - 0.5 * 2: no decay, no trust ratio
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
    opt.step()  # momentum alone moves both again
    assert torch.allclose(b.detach(), torch.tensor([-0.9]))
    head = linear_head(64, 10)
    assert isinstance(head[0], torch.nn.BatchNorm1d) and not head[0].affine and head[0].eps == 1e-6
    assert head[1].weight.std().item() == pytest.approx(0.01, rel=0.15) and head[1].bias.abs().sum() == 0
    assert probe_lr(5, lr=1.0, warmup_epochs=10, epochs=90) == pytest.approx(0.5)
    assert probe_lr(10, lr=1.0, warmup_epochs=10, epochs=90) == pytest.approx(1.0)
    assert probe_lr(50, lr=1.0, warmup_epochs=10, epochs=90) == pytest.approx(0.5)
    assert probe_lr(90, lr=1.0, warmup_epochs=10, epochs=90) == pytest.approx(0.0, abs=1e-12)


def test_the_split_tag_runs_inside_the_decode_task(ray_cluster, labeled_dir, capsys):
    """Each feature row is tagged with its split inside its decode task (fused by Ray Data): as a map
    of its own it ran as extra tasks, each on a new worker process that imported torch."""
    from jobs.evaluate import features_dataset
    from mae_model import MaskedAutoencoder, mae_vit_micro_patch4
    ds = features_dataset({"m": MaskedAutoencoder(mae_vit_micro_patch4())}, labeled_dir, {"train": None, "val": 8},
                          workers=1, val_fraction=0.25, seed=0)
    capsys.readouterr()
    ds.explain()
    plan = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert plan.count("MapBatches(load_and_decode)->MapBatches(with_column)") == 2, plan  # train and val
    assert "[MapBatches(with_column)]" not in plan, plan


@pytest.fixture(scope="module")
def digits(digits_runs):
    """The runs on scikit-learn's 1,797 handwritten digits (tests/digits_runs.py: `mae prepare`, `mae
    pretrain`, `mae finetune` from random init and from the MAE), started with the session: their
    URIs, once all have ended."""
    return digits_runs.result()


def test_a_long_run_streams_its_data_in_segments(digits):
    """The digits run (23 epochs) streamed its data as segments of 11 epochs, each one Ray Data
    execution, the next opened before the seam; the run learned across them (the tests below)."""
    from pipeline.storage import read_bytes
    logged = [json.loads(x) for x in read_bytes(f"{digits['pretrain']}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in logged] == list(range(100, 1001, 100))  # every step once, none lost at a seam
    seg = [r["data/segment"] for r in logged]
    assert seg == sorted(seg) and seg[0] == 0 and seg[-1] == 2, seg  # epoch 23.2 is in segment 2 (22-32)


def test_evaluate_pretrained_encoder_beats_random_init_on_real_digits(digits, bucket):
    """End to end on real scans: `mae pretrain` on the digits' train split, then `mae evaluate` the
    checkpoint from object storage (features extracted in parallel on the cluster, both probes on
    both features, JSON beside the checkpoint) against the same encoder at random initialization."""
    from jobs.evaluate import evaluate, main
    from pipeline.storage import read_bytes
    run, digits_shards = digits["pretrain"], digits["shards"]
    # both encoders, one feature pass; the scored images named with --val (the dataset's val split)
    trained = evaluate(run, digits_shards, workers=2, baseline=True, val=digits_shards)
    rand = trained.pop("baseline")
    print("trained:", trained, "\nrandom:", rand)
    assert rand["random_init"] is True and trained["random_init"] is False
    assert trained["classes"] == 10 and trained["train_images"] + trained["val_images"] == 1797
    for res in (trained, rand):
        for key in ("knn_top1/cls", "knn_top1/mean", "linear_top1/cls", "linear_top1/mean"):
            assert 0.0 <= res[key] <= 1.0
    # Measured on 2 cores: k-NN +25 to +27 points on both features, linear +8 to +11 (bench/RESULTS.md)
    for feat in ("cls", "mean"):
        assert trained[f"knn_top1/{feat}"] >= rand[f"knn_top1/{feat}"] + 0.10, (feat, trained, rand)
        assert trained[f"linear_top1/{feat}"] >= rand[f"linear_top1/{feat}"] + 0.03, (feat, trained, rand)
    assert max(trained[f"linear_top1/{f}"] - rand[f"linear_top1/{f}"] for f in ("cls", "mean")) >= 0.05
    saved = json.loads(read_bytes(f"{trained['checkpoint']}/evaluation.json"))
    assert saved["knn_top1/cls"] == trained["knn_top1/cls"]
    assert json.loads(read_bytes(f"{trained['checkpoint']}/evaluation_random_init.json"))["random_init"] is True
    # the CLI: a run without checkpoints is one clear line, exit 2
    with pytest.raises(SystemExit) as e:
        main([f"s3://{bucket}/runs/nothing-here", digits_shards])
    assert e.value.code == 2


def finetuned(run: dict) -> dict:
    """A `mae finetune` command's results (results.json), its evaluations (metrics.jsonl) and the two
    lines it ended with: its numbers and its best checkpoint."""
    from pipeline.storage import read_bytes
    res = json.loads(read_bytes(f"{run['run']}/results.json"))
    logged = [json.loads(x) for x in read_bytes(f"{run['run']}/metrics.jsonl").decode().splitlines()]
    with open(run["log"]) as f:
        lines = f.read().splitlines()
    (done,) = [x for x in lines if x.startswith("[mae] fine-tuning done: ")]
    (best,) = [x.split()[2] for x in lines if x.strip().startswith("best checkpoint: ")]
    return {**res, **run, "evals": [r for r in logged if "val/top5" in r], "printed": done, "best_checkpoint": best}


def test_finetuning_from_mae_beats_random_init_on_real_digits(digits, capsys):
    """The paper's central claim at toy scale: `mae finetune` from the MAE checkpoint (FSDP over 2
    workers) beats the same ViT fine-tuned from random initialization (one worker) with the same
    recipe (tests/digits_runs.py), global batch, steps and seed. The MAE run loses a worker mid-save
    and resumes; `mae evaluate --finetuned` of its best checkpoint scores the validation images
    exactly as the in-training evaluation did."""
    from jobs.evaluate import main as evaluate_main
    from pipeline.storage import read_bytes
    mae, rand = finetuned(digits["ft-mae"]), finetuned(digits["ft-rand"])
    for r in (mae, rand):
        print(r["run"], [{k: round(e[k], 3) for k in ("step", "val/top1", "val/top5", "val/loss")} for e in r["evals"]])
        assert r["steps"] == 105 and r["evaluations"] == 2 and r["val_images"] == 415  # every val image once
        assert r["printed"].startswith(f"[mae] fine-tuning done: top-1 {r['final_top1']:.2f}% final, "
                                       f"{r['best_top1']:.2f}% best (step {r['best_step']})"), r["printed"]
    # Measured (bench/RESULTS.md), from MAE against from scratch: top-5 94.5% / 72.8%, 92.8% / 76.1%,
    # 91.8% / 83.1%, 90.8% / 62.9%, 84.1% / 82.9% (+21.7, +16.7, +8.7, +27.9, +1.2); top-1 45.8% / 28.7%,
    # 33.7% / 33.7%, 34.2% / 36.4%, 39.3% / 16.1%, 19.8% / 27.2%. After 105 steps top-1 swings between
    # runs either way (the stream's order is not fixed), and one evaluation's top-5 can too; the MAE
    # leads most at mid-schedule. So the gain asserted is the top-5's over both evaluations (epochs
    # 2.5 and 5), with room for noise. Both encoders must have learned: top-5 clear of chance (50%;
    # 58% is 3 standard deviations above it over 415 images), and the MAE's best top-1 too (chance
    # 10%; 15% is 3 standard deviations above it).
    def mean_top5(r):
        return sum(e["val/top5"] for e in r["evals"]) / len(r["evals"])
    assert mean_top5(mae) >= mean_top5(rand) + 3, (mae, rand)
    assert min(mae["final_top5"], rand["final_top5"]) >= 58 and mae["best_top1"] >= 15, (mae, rand)
    assert read_bytes(f"{mae['run']}/crash_injected")  # the fault did strike, and the run finished
    index = json.loads(read_bytes(f"{mae['run']}/checkpoints.json"))
    best = [e for e in index if e.get("best")]
    assert len(best) == 1 and best[0]["metrics"]["val/top1"] == mae["best_top1"]
    assert mae["best_checkpoint"] == f"{mae['run']}/{best[0]['name']}"
    # the fine-tuned classifier, scored apart from training (actors on the cluster): the same numbers
    capsys.readouterr()
    assert evaluate_main(["--finetuned", mae["run"], digits["shards"], "--workers", "1"]) == 0
    line = capsys.readouterr().out
    assert f"top-1 {mae['best_top1']:.2f}%" in line and "415 images" in line, line
