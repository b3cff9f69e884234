"""Interop with the official MAE checkpoint layout (facebookresearch/mae ``models_mae.py``).

The released ``.pth`` files hold ``{"model": state_dict}`` with ``patch_embed.proj.weight`` as a
conv ``[D, 3, p, p]``, ``pos_embed``/``decoder_pos_embed`` as (frozen) parameters, and the block
names ``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, which ours share.
Encoder-only releases (``mae_pretrain_vit_*.pth``) stop at ``norm``.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch

from .model import MaskedAutoencoder

_FIXED = ("pos_embed", "decoder_pos_embed")  # fixed tables: ours are buffers, recomputed


class OfficialLayoutError(ValueError):
    pass


def conv_to_linear(w: torch.Tensor) -> torch.Tensor:
    """Official conv weight (D, C, p, q) -> Linear weight (D, p*q*C) over (p, q, c) patches."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def linear_to_conv(w: torch.Tensor, patch_size: int, in_chans: int = 3) -> torch.Tensor:
    """Linear weight (D, p*q*C) -> official conv weight (D, C, p, q)."""
    return w.reshape(w.shape[0], patch_size, patch_size, in_chans).permute(0, 3, 1, 2).contiguous()


def is_encoder_key(k: str) -> bool:
    return not (k.startswith("decoder") or k == "mask_token")


def to_official_state_dict(model: MaskedAutoencoder, *, encoder_only: bool = False,
                           copy: bool = True) -> dict[str, torch.Tensor]:
    """Our model -> a state dict in the official layout (load with ``model.load_state_dict``
    of ``models_mae.MaskedAutoencoderViT``).

    ``encoder_only=True`` gives the layout of the released ``mae_pretrain_vit_*.pth`` files, which
    is also timm's ``VisionTransformer`` layout (``cls_token``, ``pos_embed`` [1, 1+L, D] with a
    zero row for the cls position, conv ``patch_embed.proj.weight``, ``blocks.N.*``, ``norm.*``):
    it loads into ``timm.create_model("vit_base_patch16_224", num_classes=0)`` with strict keys.
    ``copy=False`` shares storage with the model where the layout allows (exports of big models).
    """
    c = model.config
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if encoder_only and not is_encoder_key(k):
            continue
        v = v.detach().cpu()
        if k == "patch_embed.proj.weight":
            v = linear_to_conv(v, c.patch_size, c.in_chans)
        out[k] = v.clone() if copy else v
    out["pos_embed"] = model.pos_embed.detach().cpu().clone()
    if not encoder_only:
        out["decoder_pos_embed"] = model.decoder_pos_embed.detach().cpu().clone()
    return out


def _load_pth(path: str):
    """``torch.load(weights_only=True)`` of a ``.pth``: tensors and plain values only, plus the
    ``argparse.Namespace`` (``args``) that the official ``main_pretrain.py`` saves next to
    ``model``, ``optimizer``, ``epoch`` and ``scaler`` (allowed for this load only, not globally).
    Anything else, which could run code, is refused in one line (OfficialLayoutError)."""
    import argparse
    import pickle
    import re
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"a pickled object of class {m.group(1)}" if m else "an object that is not plain data"
        raise OfficialLayoutError(
            f"{path}: holds {what}, which a weights file never holds: refusing to load it (it could run "
            "code); use the original file, or re-save its state dict from a trusted copy "
            "(torch.save({'model': state_dict}, ...))") from None


def _read(state_dict_or_path) -> Mapping[str, torch.Tensor]:
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        path = os.fspath(state_dict_or_path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"official checkpoint {path!r} does not exist: check the path")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = _load_pth(path)
    else:
        sd = state_dict_or_path
    if isinstance(sd, Mapping) and "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]
    return sd


def load_official_state_dict(model: MaskedAutoencoder, state_dict_or_path, *, verbose: bool = True
                             ) -> dict[str, list[str]]:
    """Load an official MAE checkpoint (full or encoder-only) into ``model``.

    Also accepts this project's exports (``mae ckpt export``: full/encoder in our layout,
    official, timm), as a state dict or a ``.pth`` / ``.safetensors`` path.

    Returns ``{"missing": [...], "unexpected": [...]}``. An encoder-only checkpoint leaves the
    decoder (and mask token) as initialized, and says so. Any shape mismatch raises
    ``OfficialLayoutError`` naming the key and both shapes.
    """
    sd = dict(_read(state_dict_or_path))
    c = model.config
    if "patch_embed.proj.weight" in sd and sd["patch_embed.proj.weight"].dim() == 4:
        sd["patch_embed.proj.weight"] = conv_to_linear(sd["patch_embed.proj.weight"])
    for k in _FIXED:
        if k in sd:
            ours = getattr(model, k)
            if tuple(sd[k].shape) != tuple(ours.shape):
                raise OfficialLayoutError(
                    f"{k}: checkpoint has shape {tuple(sd[k].shape)}, model expects "
                    f"{tuple(ours.shape)} (different img_size/patch_size or width?)")
            sd.pop(k)  # fixed sin-cos tables: recomputed, identical by construction
    sd.pop("head.weight", None), sd.pop("head.bias", None)  # fine-tuned classifier heads
    own = model.state_dict()
    for k, v in sd.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise OfficialLayoutError(
                f"{k}: checkpoint has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}; "
                f"pick the preset matching the checkpoint (this model: embed_dim={c.embed_dim}, "
                f"depth={c.depth}, patch_size={c.patch_size})")
    unexpected = sorted(k for k in sd if k not in own)
    if unexpected:
        raise OfficialLayoutError(f"checkpoint has keys the model lacks, e.g. {unexpected[:5]}: "
                                  "is this an MAE checkpoint of a matching preset?")
    missing = sorted(k for k in own if k not in sd)
    encoder_missing = [k for k in missing if is_encoder_key(k)]
    if encoder_missing:
        raise OfficialLayoutError(f"checkpoint lacks encoder weights, e.g. {encoder_missing[:5]}")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v.to(own[k].dtype))
    if missing and verbose:
        print(f"[mae_model] encoder-only checkpoint: {len(missing)} decoder tensors "
              "(decoder_*, mask_token) keep their fresh initialization")
    return {"missing": missing, "unexpected": unexpected}
