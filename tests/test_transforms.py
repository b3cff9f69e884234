"""Decode, augmentation and patch layout: unit tests, no Ray."""

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.decode import SkipImage, decode
from pipeline.patchify import patchify, unpatchify
from pipeline.synthetic import encode, odd_images, pattern
from pipeline.transforms import TransformConfig, random_resized_crop_params, transform_image
from reference import patchify_hwc


def test_random_resized_crop_bounds_over_many_draws():
    rng = np.random.default_rng(0)
    W, H = 500, 375
    areas, ratios = [], []
    for _ in range(5000):
        l, t, w, h = random_resized_crop_params(W, H, rng)
        assert 0 <= l and 0 <= t and l + w <= W and t + h <= H and w > 0 and h > 0
        areas.append(w * h / (W * H))
        ratios.append(w / h)
    areas, ratios = np.array(areas), np.array(ratios)
    # rounding to whole pixels moves the bounds by at most a pixel's worth
    assert areas.min() >= 0.2 - 0.01 and areas.max() <= 1.0
    assert ratios.min() >= 3 / 4 - 0.02 and ratios.max() <= 4 / 3 + 0.02
    assert areas.max() > 0.9 and areas.min() < 0.25  # the whole range is used
    assert (ratios < 0.85).any() and (ratios > 1.2).any()  # tall and wide crops both occur


def test_patchify_then_unpatchify_returns_the_crop():
    rng = np.random.default_rng(1)
    img = pattern(3, 64, rng)
    data = encode(img, "PNG")  # lossless: the crop is exactly comparable
    cfg = TransformConfig(img_size=32, patch_size=8, train=True, hflip=0.0, reduced_decode=False)
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    patches = transform_image(data, cfg, r1)
    assert patches.shape == (16, 8 * 8 * 3) and patches.dtype == np.uint8
    l, t, w, h = random_resized_crop_params(64, 64, r2)
    import torch
    import torchvision.transforms.v2.functional as TF
    x = torch.from_numpy(img).permute(2, 0, 1)
    crop = TF.resized_crop(x, t, l, h, w, [32, 32], interpolation=TF.InterpolationMode.BICUBIC,
                           antialias=True)  # (3, 32, 32)
    expected = crop.permute(1, 2, 0).numpy()
    assert torch.equal(unpatchify(torch.from_numpy(patches), 8), crop)
    assert np.array_equal(patchify(crop, 8).numpy(), patches)
    assert np.array_equal(patchify_hwc(expected, 8), patches)  # the reference layout, from HWC
    # and it is PIL's antialiased bicubic up to rounding
    pil = np.asarray(Image.fromarray(img).resize((32, 32), Image.BICUBIC, box=(l, t, l + w, t + h)))
    assert np.abs(pil.astype(int) - expected.astype(int)).mean() < 1.5
    # flipped (the flip and the patch layout are one copy from the resized pixels, written straight
    # into a batch row): the same as patchify of the mirrored crop
    flip = TransformConfig(img_size=32, patch_size=8, train=True, hflip=1.0, reduced_decode=False)
    batch = np.zeros((2, 16, 8 * 8 * 3), np.uint8)
    transform_image(data, flip, np.random.default_rng(5), out=batch[1])
    assert np.array_equal(batch[1], patchify_hwc(np.ascontiguousarray(expected[:, ::-1]), 8)) and not batch[0].any()


def test_eval_transform_is_deterministic_center_crop():
    img = pattern(0, 80, np.random.default_rng(2))
    cfg = TransformConfig(img_size=32, patch_size=4, train=False)
    a = transform_image(encode(img, "PNG"), cfg, np.random.default_rng(0))
    b = transform_image(encode(img, "PNG"), cfg, np.random.default_rng(99))
    assert np.array_equal(a, b)


def test_reduced_size_decode_stays_close_to_full_decode():
    rng = np.random.default_rng(3)
    big = np.asarray(Image.fromarray(pattern(3, 128, rng)).resize((1024, 768), Image.BICUBIC))
    data = encode(big, "JPEG", quality=90)
    out = []
    for reduced in (True, False):
        cfg = TransformConfig(img_size=64, patch_size=8, train=False, reduced_decode=reduced)
        out.append(transform_image(data, cfg, np.random.default_rng(0)).astype(np.float64))
    diff = np.abs(out[0] - out[1])
    psnr = 10 * math.log10(255**2 / max((diff**2).mean(), 1e-9))
    print(f"reduced vs full decode: mean abs diff {diff.mean():.2f}, PSNR {psnr:.1f} dB")
    assert diff.mean() < 3.0 and psnr > 30
    # and the reduced decode really decoded fewer pixels
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (1024 // 8, 768 // 8))
    assert img.size[0] < 1024


@pytest.mark.parametrize("name", sorted(odd_images()))
def test_every_odd_kind_converts_or_skips_with_reason(name):
    data, ok = odd_images()[name]
    cfg = TransformConfig(img_size=32, patch_size=4)
    if ok:
        p = transform_image(data, cfg, np.random.default_rng(0))
        assert p.shape == (64, 48) and p.dtype == np.uint8
        assert decode(data).mode == "RGB"
    else:
        with pytest.raises(SkipImage) as e:
            transform_image(data, cfg, np.random.default_rng(0))
        assert e.value.reason in {"empty", "not_an_image", "truncated", "corrupt", "too_many_pixels"}


def test_exif_orientation_is_applied():
    data, _ = odd_images()["exif_rotated.jpg"]
    raw = Image.open(io.BytesIO(data)).size
    assert decode(data).size == (raw[1], raw[0])


def test_alpha_is_composited_on_white():
    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent black
    out = np.asarray(decode(encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert (out == 255).all()


def test_pixel_guard_is_configurable():
    data = encode(pattern(0, 64, np.random.default_rng(0)), "PNG")
    with pytest.raises(SkipImage, match="too_many_pixels"):
        transform_image(data, TransformConfig(img_size=32, patch_size=4, max_pixels=1000), np.random.default_rng(0))


def test_device_decode_path_gives_the_cpu_pipelines_patches():
    """data.decode=gpu, run here on the CPU device (decode_jpeg(device="cpu"): the same code path as
    on a GPU): JPEGs of several sizes (one EXIF-rotated, one CMYK), PNG and WebP, with the crop and
    flip the CPU path draws for the same seeds, give the CPU pipeline's patches within rounding."""
    import torch

    from pipeline.gpu_decode import crop_plan, decode_on_device
    rng = np.random.default_rng(5)
    odd = odd_images(size=96)
    images = [encode(pattern(i % 4, s, rng), "JPEG", quality=90) for i, s in enumerate((64, 100, 160, 333))]
    images += [odd[k][0] for k in ("exif_rotated.jpg", "cmyk.jpg", "rgba.png", "webp.webp", "sixteen_bit.png")]
    for train in (True, False):
        cfg = TransformConfig(img_size=32, patch_size=4, train=train, reduced_decode=False)
        want = np.stack([transform_image(d, cfg, np.random.default_rng([7, i])) for i, d in enumerate(images)])
        plans = [crop_plan(d, cfg, np.random.default_rng([7, i])) for i, d in enumerate(images)]
        boxes = np.asarray([p[0] for p in plans], np.float32)
        flips = np.asarray([p[1] for p in plans])
        if train:
            assert flips.any() and not flips.all()  # both branches are exercised
        got, keep, skipped = decode_on_device(images, boxes, flips, img_size=32, patch_size=4,
                                              device=torch.device("cpu"))
        assert skipped == 0 and keep.tolist() == list(range(len(images)))
        assert got.dtype == torch.uint8 and tuple(got.shape) == want.shape
        diff = np.abs(got.numpy().astype(int) - want.astype(int))
        # float vs uint8 fixed-point bicubic: off by one here and there; hard 0/255 edges more
        assert diff.mean() < 0.5 and (diff <= 1).mean() > 0.995 and diff.max() <= 16, (train, diff.mean(), diff.max())


def test_device_decode_skips_and_counts_a_body_it_cannot_decode():
    import torch

    from pipeline.gpu_decode import crop_plan, decode_on_device
    good = encode(pattern(0, 64, np.random.default_rng(0)), "JPEG", quality=90)
    # a valid header, a body of zeros: everything up to the scan's data (its SOS segment) is kept
    # (a cut at a fixed offset was inside the header with another Pillow's encoder)
    sos = good.index(b"\xff\xda")
    body = sos + 2 + int.from_bytes(good[sos + 2:sos + 4], "big")
    broken = good[:body] + bytes(len(good) - body)
    cfg = TransformConfig(img_size=32, patch_size=4)
    plans = [crop_plan(d, cfg, np.random.default_rng(i)) for i, d in enumerate((good, broken, good))]
    boxes = np.asarray([p[0] for p in plans], np.float32)
    got, keep, skipped = decode_on_device([good, broken, good], boxes, np.zeros(3, bool), img_size=32,
                                          patch_size=4, device=torch.device("cpu"))
    assert keep.tolist() == [0, 2] and skipped == 1 and got.shape[0] == 2
    with pytest.raises(SkipImage):  # a header that is not an image is a skip in the decode task
        crop_plan(b"not an image at all", cfg, np.random.default_rng(0))


def _shown_as(shown: np.ndarray, orientation: int, fmt: str = "JPEG") -> bytes:
    """An image file whose stored pixels, turned as its EXIF ``orientation`` says (what
    ``ImageOps.exif_transpose`` does), are ``shown`` (H, W, 3)."""
    undo = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_270}
    img = Image.fromarray(shown)
    if orientation in undo:
        img = img.transpose(undo[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, fmt, exif=exif.tobytes(), **({"quality": 90} if fmt == "JPEG" else {}))


def _asymmetric(h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8, smooth, and changed by every flip and transpose: red ramps left to right,
    green top to bottom, blue rings around an off-centre point."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    rings = 127 + 100 * np.sin(np.hypot(yy - 0.3 * h, xx - 0.7 * w) / 5)
    return np.stack([40 + 180 * xx / w, 30 + 190 * yy / h, rings], -1).round().astype(np.uint8)


def test_exif_orient_turns_a_tensor_as_pil_does():
    import torch

    from pipeline.gpu_decode import exif_orient
    stored = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for o in range(0, 10):  # 0 and 9: not orientations, left as stored (as PIL does)
        exif = Image.Exif()
        exif[0x0112] = o
        img = Image.open(io.BytesIO(encode(stored, "PNG", exif=exif.tobytes())))  # lossless
        want = np.asarray(ImageOps.exif_transpose(img))
        got = exif_orient(torch.from_numpy(stored).permute(2, 0, 1), o).permute(1, 2, 0).numpy()
        assert np.array_equal(got, want), o


@pytest.mark.parametrize("decoder", ["ignores_exif", "torchvision_cpu"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_device_decode_applies_exif_orientation_before_the_crop(orientation, decoder, monkeypatch):
    """The crop boxes are drawn in displayed (post-EXIF) pixels; nvJPEG returns the stored ones.
    With a decoder that ignores EXIF as nvJPEG does (torchvision's CPU decoder told to), and with
    torchvision's CPU decoder as it is (which applies EXIF only when asked: never twice), a JPEG of
    every orientation gives the CPU pipeline's patches, train and eval crops alike."""
    import torch
    import torchvision.io

    from pipeline.gpu_decode import crop_plan, decode_on_device
    if decoder == "ignores_exif":
        real = torchvision.io.decode_jpeg

        def like_nvjpeg(*a, **kw):
            return real(*a, **{**kw, "apply_exif_orientation": False})
        monkeypatch.setattr(torchvision.io, "decode_jpeg", like_nvjpeg)
    shown = _asymmetric(72, 120)  # w != h: orientations 5-8 swap them
    data = _shown_as(shown, orientation)
    assert np.abs(np.asarray(decode(data)).astype(int) - shown).mean() < 2  # displayed as `shown`
    for train in (True, False):
        cfg = TransformConfig(img_size=32, patch_size=4, train=train, hflip=0.0, reduced_decode=False)
        want = np.stack([transform_image(data, cfg, np.random.default_rng([3, i])) for i in range(4)])
        plans = [crop_plan(data, cfg, np.random.default_rng([3, i])) for i in range(4)]
        assert all(p.orient == orientation for p in plans)
        boxes = np.asarray([p.box for p in plans], np.float32)
        orients = np.asarray([p.orient for p in plans], np.int8)
        got, keep, skipped = decode_on_device([data] * 4, boxes, np.zeros(4, bool), orients, img_size=32,
                                              patch_size=4, device=torch.device("cpu"))
        assert skipped == 0 and tuple(got.shape) == want.shape
        diff = np.abs(got.numpy().astype(int) - want.astype(int))
        # the tolerance of the device path's other tests: float vs uint8 fixed-point bicubic
        assert diff.mean() < 0.5 and (diff <= 1).mean() > 0.995 and diff.max() <= 16, (train, diff.mean(), diff.max())
        # the orientation shipped or read from the header here: the same pixels
        again, _, _ = decode_on_device([data] * 4, boxes, np.zeros(4, bool), img_size=32, patch_size=4,
                                       device=torch.device("cpu"))
        assert torch.equal(again, got)


def test_a_crop_changes_with_the_epoch_and_not_with_a_restart():
    """Crops are seeded by (seed, epoch, key): the stream tags every read unit with its epoch (no
    Ray-private execution counter), so epoch 1 sees other crops than epoch 0, and a restarted run
    that reaches epoch 1 again sees epoch 1's crops exactly."""
    from pipeline.dataset import decode_batch
    rng = np.random.default_rng(0)
    batch = {"key": [f"c/{i}.jpg" for i in range(4)],
             "image": [encode(pattern(i, 64, rng), "JPEG", quality=90) for i in range(4)]}
    cfg = TransformConfig(img_size=32, patch_size=4)

    def patches(epoch):
        return decode_batch(batch, tcfg=cfg, seed=3, epoch=epoch, class_index=None, root=None)[0]["patches"]
    e0, e1 = patches(0), patches(1)
    assert all(not np.array_equal(a, b) for a, b in zip(e0, e1))
    assert np.array_equal(patches(1), e1) and np.array_equal(patches(0), e0)


def test_a_decode_task_cancelled_while_importing_torch_leaves_the_worker_usable():
    """A decode task's first batch imports torch in the worker's main thread; Ray Data cancels the
    running tasks when a run's worker group restarts (a KeyboardInterrupt there). One that landed
    inside `import torch` left torch half-initialized in that worker, and its next task failed with
    "partially initialized module 'torch'" (seen as a failed run after a worker restart). Here the
    interrupt comes from a timer, in a fresh interpreter whose first decode imports torch."""
    import os
    import subprocess
    import sys
    code = """
import signal, sys
import numpy as np
from pipeline.crops import TransformConfig
from pipeline.dataset import decode_batch
from pipeline.synthetic import encode, pattern
assert "torch" not in sys.modules
batch = {"key": ["c/0.jpg"], "image": [encode(pattern(0, 64, np.random.default_rng(0)), "JPEG", quality=90)]}
def cancel(*a):
    raise KeyboardInterrupt
signal.signal(signal.SIGALRM, cancel)
signal.setitimer(signal.ITIMER_REAL, 0.5)  # inside the first decode's `import torch` (~2 s here)
try:
    decode_batch(batch, tcfg=TransformConfig(img_size=32, patch_size=4), seed=0, epoch=0, class_index=None, root=None)
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted")
out, n, _ = decode_batch(batch, tcfg=TransformConfig(img_size=32, patch_size=4), seed=0, epoch=0, class_index=None, root=None)
assert n == 1 and out["patches"].shape == (1, 64, 48), out["patches"].shape
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "interrupted" in r.stdout.split()  # the interrupt did land in the first decode
