"""A checkpoint or weight file is data, never code: whoever can write to the bucket must not run
code on the ranks that resume from it, at ``model.init_from``, or at ``mae ckpt export``.

DCP pickles a checkpoint's ``.metadata`` and ``torch.save``s its non-tensor entries (the
optimizer's param_groups): the project reads the first with an allowlisting unpickler and the
second with ``torch.load(weights_only=True)``. Official MAE ``.pth`` files carry an
``argparse.Namespace`` (``args``), allowed for that load only. Local files, no S3 or Ray.
"""

import argparse
import os
import pickle
import shutil

import pytest
import torch

from jobs.ckpt import main
from jobs.core import checkpoint as ckpt
from jobs.core.common import UserError
from jobs.core.weights import init_state_dict
from mae_model import MaskedAutoencoder, load_official_state_dict, mae_vit_micro_patch4, to_official_state_dict
from pipeline.storage import Store
from test_ckpt import write_checkpoint


class _RunsCode:
    """Unpickling this calls ``fn(*args)``: what a writer of the bucket would plant."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker):
    return {"os.system": _RunsCode(os.system, f"touch '{marker}'"),
            # a dotted name under an allowed module (pathlib.PosixPath is allowed, Path.touch is not)
            "Path.touch": _RunsCode(__import__("pathlib").Path.touch, __import__("pathlib").Path(marker))}


def _trained():
    torch.manual_seed(0)
    model = MaskedAutoencoder(mae_vit_micro_patch4())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    c = model.config
    model(torch.randint(0, 256, (4, c.num_patches, c.patch_dim), dtype=torch.uint8))[0].backward()
    opt.step()
    opt.zero_grad()
    return model, opt


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    """A complete checkpoint written by the project's writer (DCP + manifest + marker) on local disk."""
    tmp = tmp_path_factory.mktemp("untrusted")
    model, opt = _trained()
    uri = write_checkpoint(model, opt, str(tmp / "run"), 2, 0.5, tmp)
    return {"dir": uri, "model": {k: v.clone() for k, v in model.state_dict().items()},
            "opt": opt.state_dict()}


def _copy(genuine, tmp_path) -> str:
    d = str(tmp_path / ckpt.ckpt_name(2))
    shutil.copytree(genuine["dir"], d)
    return d


def _rewrite_metadata(d: str, change) -> None:
    """Alter a checkpoint as a writer of the bucket could: the metadata, and the manifest to match
    (so that even `mae ckpt pull`'s verification would pass it)."""
    import json
    with open(os.path.join(d, ".metadata"), "rb") as f:
        md = pickle.load(f)  # the genuine file, written just now by this test
    change(d, md)
    with open(os.path.join(d, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    man = json.load(open(os.path.join(d, "manifest.json")))
    man["files"] = {rel: w for rel, w in ckpt.file_manifest(d).items()
                    if rel in man["files"] or rel.endswith(".distcp")}
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(man, f)


def _fresh():
    torch.manual_seed(1)
    model = MaskedAutoencoder(mae_vit_micro_patch4())
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _load_through_fsspec(d: str) -> dict:
    """The reader a resume from object storage uses (here on file://, the same code path)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from jobs.core import safeload
    model, opt = _fresh()
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    safeload.load(state, safeload.SafeFsspecReader(f"file://{d}", where=d))
    return state


def _one_line_export(d, out, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(["export", d, out])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("kind", ["os.system", "Path.touch"])
def test_code_planted_in_metadata_is_refused_in_one_line_and_never_runs(genuine, tmp_path, capsys, kind):
    marker = tmp_path / "ran"
    payload = _payloads(marker)[kind]
    d = _copy(genuine, tmp_path)
    _rewrite_metadata(d, lambda d, md: setattr(md.storage_meta, "modules", [payload]))
    cls = "posix.system" if kind == "os.system" else "pathlib.Path.touch"

    model, opt = _fresh()
    with pytest.raises(UserError) as e:  # resume
        ckpt.load_into(model, opt, Store(d), rank=0, restore_rng=False)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and d in msg and cls in msg and "refusing" in msg, msg
    with pytest.raises(UserError, match=f"{cls}.*refusing"):  # resume from a bucket: DCP's fsspec reader
        _load_through_fsspec(d)
    assert not marker.exists()

    err = _one_line_export(d, str(tmp_path / "out"), capsys)  # mae ckpt export
    assert err.startswith("mae ckpt export: error: ") and d in err and cls in err, err
    assert not os.path.exists(tmp_path / "out.safetensors")

    with pytest.raises(UserError, match=f"{cls}.*refusing"):  # model.init_from
        init_state_dict(d, mae_vit_micro_patch4(), verbose=False)
    with pytest.raises(UserError) as e:  # its run directory: pulled (the manifest agrees), then refused by name
        init_state_dict(str(tmp_path), mae_vit_micro_patch4(), verbose=False)
    assert f"checkpoint {d}: .metadata holds a pickled object of class {cls}" in str(e.value)
    assert not marker.exists(), "the planted code ran"


def test_code_planted_in_a_byte_entry_is_refused_in_one_line_and_never_runs(genuine, tmp_path):
    """The optimizer's param_groups are non-tensor DCP entries (torch.save'd bytes): a planted one,
    behind a benign .metadata, is refused by torch.load(weights_only=True)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    marker = tmp_path / "ran"
    d = _copy(genuine, tmp_path)

    def plant(d, md):
        idx = next(i for i in md.storage_data if i.fqn == "optim.param_groups.0.lr")
        torch.save(_RunsCode(os.system, f"touch '{marker}'"), os.path.join(d, "__0_1.distcp"))
        md.storage_data[idx] = _StorageInfo("__0_1.distcp", 0, os.path.getsize(os.path.join(d, "__0_1.distcp")))
    _rewrite_metadata(d, plant)

    model, opt = _fresh()
    with pytest.raises(UserError) as e:
        ckpt.load_into(model, opt, Store(d), rank=0, restore_rng=False)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1, msg
    assert d in msg and "optim.param_groups.0.lr" in msg and "posix.system" in msg and "refusing" in msg, msg
    assert not marker.exists(), "the planted code ran"


def test_metadata_naming_files_outside_the_checkpoint_is_refused(genuine, tmp_path):
    d = _copy(genuine, tmp_path)

    def escape(d, md):
        idx = next(iter(md.storage_data))
        md.storage_data[idx].relative_path = "../../../../etc/hostname"
    _rewrite_metadata(d, escape)
    with pytest.raises(UserError, match="outside the checkpoint"):
        ckpt.load_into(*_fresh(), Store(d), rank=0, restore_rng=False)
    with open(os.path.join(d, ".metadata"), "wb") as f:  # not a pickle at all
        f.write(b"not a pickle")
    with pytest.raises(UserError, match="not a DCP .metadata"):
        init_state_dict(d, mae_vit_micro_patch4(), verbose=False)


def test_a_genuine_checkpoint_loads_through_every_path(genuine, tmp_path, capsys):
    from safetensors.torch import load_file
    d, ref = genuine["dir"], genuine["model"]
    model, opt = _fresh()
    ckpt.load_into(model, opt, Store(d), rank=0)  # resume: model, optimizer (byte entries too), RNG
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    got, want = opt.state_dict(), genuine["opt"]
    assert got["param_groups"] == want["param_groups"]
    assert all(torch.equal(got["state"][i][s], want["state"][i][s]) for i in want["state"] for s in want["state"][i])

    state = _load_through_fsspec(d)  # resume from a bucket: DCP's fsspec reader
    assert all(torch.equal(state["model"][k], ref[k]) for k in ref)
    assert state["optim"]["param_groups"][0]["lr"] == want["param_groups"][0]["lr"]

    assert main(["export", d, str(tmp_path / "full")]) == 0  # mae ckpt export
    full = load_file(capsys.readouterr().out.strip())
    assert full.keys() == ref.keys() and all(torch.equal(full[k], ref[k]) for k in ref)

    sd = init_state_dict(d, mae_vit_micro_patch4(), verbose=False)  # model.init_from
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)


# ---------------------------------------------------------------------------- official .pth
def _official_pth(path, args: argparse.Namespace) -> dict:
    """A checkpoint in the layout of the official MAE main_pretrain.py (misc.save_model)."""
    model, opt = _trained()
    sd = to_official_state_dict(model)
    torch.save({"model": sd, "optimizer": opt.state_dict(), "epoch": 399,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                           "growth_interval": 2000, "_growth_tracker": 17},
                "args": args}, path)
    return model.state_dict()


def _official_args(**kw) -> argparse.Namespace:
    return argparse.Namespace(batch_size=64, epochs=400, accum_iter=1, model="mae_vit_base_patch16",
                              input_size=224, mask_ratio=0.75, norm_pix_loss=True, weight_decay=0.05,
                              lr=None, blr=1.5e-4, min_lr=0.0, warmup_epochs=40,
                              data_path="/datasets01/imagenet_full_size/061417/",
                              output_dir="./output_dir", log_dir="./output_dir", device="cuda", seed=0,
                              resume="", start_epoch=0, num_workers=10, pin_mem=True, world_size=64,
                              local_rank=-1, dist_on_itp=False, dist_url="env://", distributed=True,
                              rank=0, gpu=0, dist_backend="nccl", **kw)


def test_official_pth_with_args_namespace_loads_with_weights_only(tmp_path):
    path = str(tmp_path / "checkpoint-399.pth")
    ref = _official_pth(path, _official_args())
    model = MaskedAutoencoder(mae_vit_micro_patch4())
    info = load_official_state_dict(model, path, verbose=False)
    assert info["missing"] == [] and all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    sd = init_state_dict(path, mae_vit_micro_patch4(), verbose=False)  # model.init_from
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # allowed for that load only
    with pytest.raises(Exception, match="argparse.Namespace"):
        torch.load(path, weights_only=True)


def test_official_pth_carrying_code_is_refused_in_one_line(tmp_path):
    marker = tmp_path / "ran"
    path = str(tmp_path / "checkpoint-399.pth")
    _official_pth(path, _official_args(hook=_RunsCode(os.system, f"touch '{marker}'")))
    with pytest.raises(ValueError) as e:
        init_state_dict(path, mae_vit_micro_patch4(), verbose=False)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and path in msg and "posix.system" in msg and "refusing" in msg, msg
    assert not marker.exists()
