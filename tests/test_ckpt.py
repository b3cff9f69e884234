"""`mae ckpt list | pull | export` and `model.init_from`, on checkpoints written by the real
writer (DCP + manifest + marker) to the tests' S3 server. No Ray here: the end-to-end path through
a real Ray head and a submitted job is in test_submit.py."""

import json
import os
import subprocess
import sys

import pytest
import torch

from jobs.core import checkpoint as ckpt
from jobs.ckpt import main
from jobs.core.weights import export, init_state_dict, pull, select
from mae_model import MaskedAutoencoder, load_official_state_dict, mae_vit_micro_patch4
from pipeline.storage import Store, fsspec_fs, parse_uri, write_bytes

pytestmark = [pytest.mark.s3]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_checkpoint(model, opt, run_uri: str, step: int, loss: float, tmp) -> str:
    """The save path of a training run, minus Ray: DCP shard + state locally, upload, finalize."""
    import time

    import yaml
    local = tmp / f"w{step}"
    local.mkdir()
    cfg = yaml.safe_dump({"model": {"preset": "mae_vit_micro_patch4", "overrides": {}},
                          "train": {"best_metric": "loss"}})
    ckpt.write_local(model, opt, str(local), rank=0, config_yaml=cfg,
                     train_state={"step": step, "metrics": {"loss": loss}, "time": time.time()})
    name = ckpt.ckpt_name(step)
    uri = str(parse_uri(run_uri).join(name))
    fs, p = fsspec_fs(uri)
    fs.put(str(local) + "/", p, recursive=True)
    run = Store(run_uri)
    fin = ckpt.Finalizer(run, keep_last=10, best_metric="loss")
    fin.complete({"name": name, "step": step, "complete": True, "metrics": {"loss": loss}, "time": time.time()},
                 [ckpt.file_manifest(str(local))], 1)
    return uri


@pytest.fixture(scope="module")
def run(bucket, tmp_path_factory):
    """A run on S3 with complete checkpoints at steps 2 (loss 0.9) and 4 (loss 0.5, the best and
    the latest) and a half-written one at step 6 (no marker)."""
    tmp = tmp_path_factory.mktemp("ckpt-run")
    torch.manual_seed(0)
    model = MaskedAutoencoder(mae_vit_micro_patch4())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run_uri = f"s3://{bucket}/ckpt-tests/run"
    x = torch.randint(0, 256, (4, 64, 48), dtype=torch.uint8)
    states = {}
    for step, loss in ((2, 0.9), (4, 0.5)):
        model(x)[0].backward()
        opt.step()
        opt.zero_grad()
        write_checkpoint(model, opt, run_uri, step, loss, tmp)
        states[step] = {k: v.clone() for k, v in model.state_dict().items()}
    write_bytes(f"{run_uri}/{ckpt.ckpt_name(6)}/__0_0.distcp", b"half")  # a save that died
    return {"uri": run_uri, "states": states, "model": model}


def test_list_shows_state_step_size_metrics(run, capsys):
    assert main(["list", run["uri"]]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["checkpoint", "step", "state"]
    rows = {line.split()[0]: line.split() for line in out[1:]}
    assert rows["checkpoint_00000002"][2] == "complete" and rows["checkpoint_00000004"][2] == "complete"
    assert rows["checkpoint_00000006"][2] == "incomplete"
    assert "MiB" in out[2] and "0.5" in rows["checkpoint_00000004"]


def test_select_latest_best_step_and_refusals(run):
    assert select(run["uri"])["step"] == 4
    assert select(run["uri"], best=True)["step"] == 4
    assert select(run["uri"], best=True, mode="max")["step"] == 2
    assert select(run["uri"], step=2)["step"] == 2
    with pytest.raises(Exception, match="incomplete"):
        select(run["uri"], step=6)
    with pytest.raises(Exception, match="no checkpoint at step 3"):
        select(run["uri"], step=3)


def test_pull_verifies_resumes_and_catches_tampering(run, tmp_path, capsys):
    dest = tmp_path / "pulled"
    out = pull(select(run["uri"])["uri"], str(dest), progress=False)
    man = json.load(open(os.path.join(out, "manifest.json")))
    assert set(man["files"]) <= set(os.listdir(out)) and os.path.exists(os.path.join(out, ckpt.MARKER))
    for rel, w in man["files"].items():
        assert ckpt.sha256_file(os.path.join(out, rel)) == w["sha256"]

    # interrupted pull: one file gone, one truncated, marker gone -> the rerun fetches just those
    os.remove(os.path.join(out, "__0_0.distcp"))
    with open(os.path.join(out, "train_state.json"), "w") as f:
        f.write("{")
    os.remove(os.path.join(out, ckpt.MARKER))
    pull(select(run["uri"])["uri"], str(dest), progress=False)
    assert "kept" in capsys.readouterr().err
    assert ckpt.sha256_file(os.path.join(out, "__0_0.distcp")) == man["files"]["__0_0.distcp"]["sha256"]

    # a shard altered on the store after the save: caught, not kept, one-line error, exit 2
    step2 = select(run["uri"], step=2)["uri"]
    fs, p = fsspec_fs(step2)
    good = fs.cat_file(f"{p}/__0_0.distcp")
    fs.pipe_file(f"{p}/__0_0.distcp", good[:-10] + b"0123456789")
    try:
        with pytest.raises(SystemExit) as e:
            main(["pull", run["uri"], "--step", "2", "--quiet", str(tmp_path / "t")])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "__0_0.distcp" in err and "sha256" in err
        assert not os.path.exists(tmp_path / "t" / "checkpoint_00000002" / "__0_0.distcp")
        assert not os.path.exists(tmp_path / "t" / "checkpoint_00000002" / ckpt.MARKER)
        fs.rm(f"{p}/__0_0.distcp")  # and a shard missing altogether
        with pytest.raises(SystemExit):
            main(["pull", step2, "--quiet", str(tmp_path / "t")])
        assert "missing from storage" in capsys.readouterr().err
    finally:
        fs.pipe_file(f"{p}/__0_0.distcp", good)
    with pytest.raises(SystemExit):  # the half-written checkpoint is refused by name
        main(["pull", f"{run['uri']}/{ckpt.ckpt_name(6)}", str(tmp_path / "u")])
    assert "incomplete" in capsys.readouterr().err


def test_export_formats_match_the_trained_weights(run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file
    ref = run["states"][4]
    local = pull(select(run["uri"])["uri"], str(tmp_path), progress=False)

    full = load_file(export(local, "full", str(tmp_path / "full")))
    assert full.keys() == ref.keys() and all(torch.equal(full[k], ref[k]) for k in ref)
    with safe_open(str(tmp_path / "full.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["mae_config"])["embed_dim"] == 64

    enc = load_file(export(local, "encoder", str(tmp_path / "enc.safetensors"), dtype="bf16"))
    assert not any(k.startswith("decoder") or k == "mask_token" for k in enc)
    assert all(v.dtype == torch.bfloat16 for v in enc.values())

    # the official layout: conv patch embedding, pos tables, {"model": ...} in a .pth
    path = export(local, "official", str(tmp_path / "official"))
    assert path.endswith(".pth")
    off = torch.load(path, map_location="cpu", weights_only=True)["model"]
    assert off["patch_embed.proj.weight"].shape == (64, 3, 4, 4)
    assert {"pos_embed", "decoder_pos_embed", "mask_token"} <= off.keys()
    back = MaskedAutoencoder(mae_vit_micro_patch4())
    load_official_state_dict(back, path, verbose=False)
    assert all(torch.equal(back.state_dict()[k], ref[k]) for k in ref)

    # a run directory, on the store or local (it has a config.yaml too): its latest complete checkpoint
    fs, p = fsspec_fs(run["uri"])
    local_run = tmp_path / "local-run"
    fs.get(p + "/", str(local_run) + "/", recursive=True)
    for src in (run["uri"], str(local_run)):
        sd = load_file(export(src, "full", str(tmp_path / "from-run.safetensors")))
        assert all(torch.equal(sd[k], ref[k]) for k in ref), src


def test_timm_export_loads_strict_into_timm_vit_and_gives_the_same_features(run, tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import load_file
    local = pull(select(run["uri"])["uri"], str(tmp_path), progress=False)
    sd = load_file(export(local, "timm", str(tmp_path / "vit")))
    c = mae_vit_micro_patch4()
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth,
        num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, num_classes=0)
    vit.load_state_dict(sd, strict=True)  # strict: every key, no extras
    vit.eval()
    ours = MaskedAutoencoder(c)
    ours.load_state_dict(run["states"][4])
    ours.eval()
    img = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    from pipeline.patchify import patchify
    from reference import official_patchify, patchify_hwc
    x_ours = patchify(img.permute(0, 3, 1, 2), c.patch_size)  # the pipeline's layout
    assert torch.equal(x_ours, official_patchify(img.permute(0, 3, 1, 2), c.patch_size))
    assert torch.equal(x_ours, torch.from_numpy(patchify_hwc(img.numpy(), c.patch_size)))
    with torch.no_grad():
        f_ours = ours.forward_features(x_ours)["cls"]
        x = (img.float() / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
        f_timm = vit.forward_features(x.permute(0, 3, 1, 2))[:, 0]
    torch.testing.assert_close(f_ours, f_timm, rtol=1e-4, atol=1e-4)


def test_export_needs_no_ray(run, tmp_path):
    local = pull(select(run["uri"])["uri"], str(tmp_path), progress=False)
    code = ("import sys; from jobs.ckpt import main; "
            f"main(['export', {local!r}, {str(tmp_path / 'o')!r}, '--format', 'official']); "
            "assert 'ray' not in sys.modules, 'export imported ray'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.exists(tmp_path / "o.pth")


def test_list_and_pull_need_no_torch(run, tmp_path):
    """`mae ckpt list | pull` read JSON and copy files: they start in under a second, without
    torch (~2 s to import; it came in through the config's package and cost every call)."""
    code = ("import sys; from jobs.ckpt import main; "
            f"main(['list', {run['uri']!r}]); main(['pull', {run['uri']!r}, '--latest', '--quiet', {str(tmp_path)!r}]); "
            "assert 'torch' not in sys.modules, 'list/pull imported torch'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "checkpoint_" in r.stdout and any(p.name.startswith("checkpoint_") for p in tmp_path.iterdir())


def test_init_from_every_source_gives_the_trained_weights(run, tmp_path):
    ref = run["states"][4]
    c = mae_vit_micro_patch4()
    local = pull(select(run["uri"])["uri"], str(tmp_path), progress=False)
    official = export(local, "official", str(tmp_path / "off"))
    timm_file = export(local, "timm", str(tmp_path / "t"))
    s3_file = f"{run['uri']}-exports/off.pth"
    fs, p = fsspec_fs(s3_file)
    fs.put_file(official, p)
    local_run = tmp_path / "local-run"  # a run directory on local disk (it has a config.yaml too)
    fs.get(fsspec_fs(run["uri"])[1] + "/", str(local_run) + "/", recursive=True)
    for src in (run["uri"], str(local_run), local, official, s3_file):
        sd = init_state_dict(src, c, verbose=False)
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref), src
    enc = init_state_dict(timm_file, c, verbose=False)  # encoder only: the decoder is left out
    assert not any(k.startswith("decoder") for k in enc) and torch.equal(enc["blocks.0.attn.qkv.weight"],
                                                                         ref["blocks.0.attn.qkv.weight"])
    os.remove(os.path.join(local, ckpt.MARKER))  # an unfinished pull is refused, not half-loaded
    with pytest.raises(Exception, match="incomplete checkpoint"):
        init_state_dict(local, c, verbose=False)
    with open(os.path.join(local, ckpt.MARKER), "w") as f:
        f.write("ok\n")
    with pytest.raises(Exception, match="does not match this model config"):
        init_state_dict(local, mae_vit_micro_patch4(embed_dim=32, num_heads=2), verbose=False)


def test_prune_keeps_last_and_best_writes_the_note_before_deleting(s3, tmp_path):
    """The finalizer's pruning, on the S3 server behind the counting layer: the best and the last
    checkpoint stay; a pruned one loses its marker first, gets its PRUNED note, and only then its
    files; finding the latest costs the same two requests however many checkpoints were written.
    In a bucket of its own: the requests counted are this test's alone, whatever else runs (the
    digits runs of tests/digits_runs.py write beside the first tests, bulk deletes included)."""
    from pipeline.storage import StorageError, Store
    torch.manual_seed(0)
    model = MaskedAutoencoder(mae_vit_micro_patch4())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    bucket = s3.create_bucket("mae-prune-test")
    run_uri = f"s3://{bucket}/ckpt-tests/prune"
    for step, loss in ((1, 0.3), (2, 0.9), (3, 0.8)):  # step 1 is the best
        write_checkpoint(model, opt, run_uri, step, loss, tmp_path)
    run = Store(run_uri)
    fin = ckpt.Finalizer(run, keep_last=1, best_metric="loss")
    mark = s3.proxy.mark()
    assert fin.prune() == ["checkpoint_00000002"]
    reqs = [(r.method, r.path.rsplit("/", 1)[-1], r.query[:6]) for r in s3.proxy.since(mark, f"/{bucket}")]
    i_marker = reqs.index(("POST", bucket, "delete")) if ("POST", bucket, "delete") in reqs else None
    i_note = reqs.index(("PUT", ckpt.PRUNED, ""))
    deletes = [i for i, r in enumerate(reqs) if r[0] in ("POST", "DELETE")]
    assert deletes[0] < i_note < deletes[-1], reqs  # marker gone, note written, then the files
    assert i_marker is not None
    assert run.ls("checkpoint_00000002") == [ckpt.PRUNED]
    assert [c["step"] for c in ckpt.list_checkpoints(run) if c["complete"]] == [1, 3]
    assert [e["step"] for e in json.loads(run.read(ckpt.INDEX))] == [1, 3]
    mark = s3.proxy.mark()
    assert ckpt.latest_complete(run)["step"] == 3
    touched = {r.path.split("/prune/", 1)[-1] for r in s3.proxy.since(mark, f"/{bucket}")}
    assert touched == {ckpt.INDEX, f"checkpoint_00000003/{ckpt.MARKER}"}  # no listing, nothing older
    # a damaged index is an error, never "no checkpoints" (which would prune the kept ones)
    run.write(ckpt.INDEX, b"{not json")
    with pytest.raises(StorageError, match="index is damaged"):
        ckpt.Finalizer(run, keep_last=1, best_metric="loss")
    assert [c["step"] for c in ckpt.list_checkpoints(run) if c["complete"]] == [1, 3]


def test_rng_state_is_plain_tensors_and_loads_with_weights_only(tmp_path):
    import io
    import random

    import numpy as np
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    buf = io.BytesIO()
    torch.save(ckpt.rng_state(), buf)
    expect = (torch.rand(2), np.random.rand(2), random.random())
    buf.seek(0)
    ckpt.set_rng_state(torch.load(buf, weights_only=True))  # no pickled code accepted from a bucket
    assert torch.equal(torch.rand(2), expect[0]) and np.array_equal(np.random.rand(2), expect[1])
    assert random.random() == expect[2]


def test_masking_streams_are_distinct_per_rank_and_resume_step():
    """Ranks whose RNG is not restored (another world size) draw their masking noise from streams
    of their own: no two ranks, and no resume step, share one."""
    from jobs.core.trainer import masking_seed
    seeds = {masking_seed(0, rank, step) for rank in range(64) for step in (0, 1000, 1001, 500_000)}
    assert len(seeds) == 64 * 4
    draws = set()
    for rank in range(4):
        torch.manual_seed(masking_seed(0, rank, 1000))
        draws.add(tuple(torch.rand(8).tolist()))
    assert len(draws) == 4


def test_a_run_that_stops_before_its_first_log_line_keeps_its_own_error(bucket, tmp_path):
    """The run directory's metrics are synced at the end of every run, also a failed one; a run
    ended before its first log line (the non-finite guard at the first log step) has no local
    metrics.jsonl, and syncing it raised 'metrics.jsonl: not found', hiding the run's real error."""
    from jobs.core.metrics import MetricsLogger
    run = Store(f"s3://{bucket}/metrics-tests/early-stop")
    logger = MetricsLogger(str(tmp_path / "scratch"), run, total_steps=8)
    logger.sync()  # nothing logged: nothing to copy, and no error
    assert run.read_if_exists("metrics.jsonl") is None
    logger.log(4, {"train/loss": 1.5})
    logger.sync()
    assert json.loads(run.read("metrics.jsonl"))["train/loss"] == 1.5
    logger.close()


def test_a_resumed_attempt_drops_the_log_records_after_its_checkpoint(bucket, tmp_path):
    """Metrics are synced at the start of a save, its marker comes after every rank's upload: an
    attempt that dies in between has stored records of steps the next attempt, resumed from the
    checkpoint before, trains again. They went into the log twice (the run's history showed steps
    1..6 then 5, 6, ... again)."""
    from jobs.core.metrics import MetricsLogger
    run = Store(f"s3://{bucket}/metrics-tests/resumed")
    first = MetricsLogger(str(tmp_path / "a"), run, total_steps=8)
    for step in range(1, 7):
        first.log(step, {"loss": 1.0 / step})
    first.sync()  # the save of step 6 started ... and its attempt died before the marker
    first.close()
    second = MetricsLogger(str(tmp_path / "b"), run, total_steps=8)  # resumed from checkpoint 4
    second.keep_until(4)
    for step in range(5, 9):
        second.log(step, {"loss": 1.0 / step})
    second.sync()
    second.close()
    steps = [json.loads(x)["step"] for x in run.read("metrics.jsonl").decode().splitlines()]
    assert steps == list(range(1, 9))


def test_a_scratch_dir_whose_removal_was_cut_short_is_removed_by_the_next_attempt():
    """Ray tears a failed worker group down with SIGKILL, also while an attempt removes its
    scratch directory: the owner file can be gone with the directory still there. The next
    attempt on the node removes it (and a dead owner's), and never a live attempt's."""
    import shutil
    import signal
    import tempfile

    import psutil

    from jobs.core.common import SCRATCH_PREFIX, attempt_scratch
    tmp = tempfile.gettempdir()
    cut_short = tempfile.mkdtemp(prefix=SCRATCH_PREFIX)  # the owner file went first, then the kill
    os.makedirs(os.path.join(cut_short, "mae-ckpt-x"))
    live, dead = (subprocess.Popen(["sleep", "60"]) for _ in range(2))
    own = {}
    for p in (live, dead):
        own[p] = tempfile.mkdtemp(prefix=SCRATCH_PREFIX)
        with open(os.path.join(own[p], "owner"), "w") as f:
            f.write(f"{p.pid} {psutil.Process(p.pid).create_time()!r}")
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    mine = None
    try:
        mine = attempt_scratch()
        assert not os.path.exists(cut_short) and not os.path.exists(own[dead])
        assert os.path.isdir(own[live])
        assert os.path.basename(mine).startswith(SCRATCH_PREFIX) and os.path.dirname(mine) == tmp
        with open(os.path.join(mine, "owner")) as f:  # a scratch dir has its owner from the start
            assert f.read().split()[0] == str(os.getpid())
    finally:
        live.kill()
        live.wait()
        for d in (cut_short, own[live], own[dead], mine):
            if d:
                shutil.rmtree(d, ignore_errors=True)
