"""Image loading (bad and unusual files), the resize policy and the image-list dataset."""

from __future__ import annotations

import gc
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from dtop.data.images import (
    ALPHA_BACKGROUND,
    ImageListDataset,
    ImageLoadError,
    LoadFailure,
    ResizeToTensor,
    collate_with_failures,
    crop_bbx,
    load_image,
    normalize,
    resize_image,
    round_to_multiple,
    target_size,
    to_tensor,
    to_uint8_tensor,
)
from dtop.data.sampler import bucket_size
from dtop.engine.mining import common_size
from dtop.errors import DataError, DtopError


def _rgb(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
    return np.clip(base + rng.normal(0, 5, (h, w, 3)), 0, 255).astype(np.uint8)


def _mode(path) -> str:
    with Image.open(path) as im:
        return im.mode


@pytest.fixture
def jpeg(tmp_path):
    path = tmp_path / "a.jpg"
    Image.fromarray(_rgb()).save(path, quality=95)
    return path


# ---------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="not found") as info:
        load_image(tmp_path / "nope.jpg")
    assert isinstance(info.value, DataError) and isinstance(info.value, DtopError)
    assert "nope.jpg" in str(info.value)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty file") as info:
        load_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_jpeg_is_refused(tmp_path, jpeg, keep):
    data = jpeg.read_bytes()
    path = tmp_path / "trunc.jpg"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageLoadError, match="truncated") as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_load_truncated_images_flag_must_stay_off(jpeg, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DataError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(jpeg)


def test_non_image_bytes(tmp_path):
    path = tmp_path / "text.jpg"
    path.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(ImageLoadError, match="not an image") as info:
        load_image(path)
    assert "text.jpg" in str(info.value)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(tmp_path)


# ---------------------------------------------------------------- modes


def test_rgb_jpeg(jpeg):
    img = load_image(jpeg)
    assert img.mode == "RGB" and img.size == (64, 48)
    assert np.abs(np.asarray(img).astype(int) - _rgb().astype(int)).mean() < 6


def test_grayscale(tmp_path):
    g = (np.arange(48 * 64).reshape(48, 64) % 256).astype(np.uint8)
    for ext in ("png", "jpg"):
        path = tmp_path / f"g.{ext}"
        Image.fromarray(g, mode="L").save(path)
        img = load_image(path)
        arr = np.asarray(img)
        assert img.mode == "RGB" and arr.shape == (48, 64, 3)
        assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert (np.asarray(load_image(tmp_path / "g.png"))[..., 0] == g).all()


def test_bilevel(tmp_path):
    path = tmp_path / "b.png"
    Image.fromarray(np.eye(16, dtype=bool)).save(path)
    arr = np.asarray(load_image(path))
    assert arr.shape == (16, 16, 3) and set(np.unique(arr)) == {0, 255}


def test_palette(tmp_path):
    path = tmp_path / "p.png"
    Image.fromarray(_rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path)
    assert _mode(path) == "P"
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (64, 48)


def test_palette_gif_with_transparency(tmp_path):
    path = tmp_path / "t.gif"
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    p.paste(0, (0, 0, 4, 8))
    p.save(path, transparency=0)
    arr = np.asarray(load_image(path))
    assert tuple(arr[0, 0]) == ALPHA_BACKGROUND  # transparent index on white
    assert tuple(arr[0, 7]) == (255, 0, 0)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "c.jpg"
    rgb = _rgb()
    Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    assert _mode(path) == "CMYK"
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (64, 48)
    assert np.abs(np.asarray(img).astype(int) - rgb.astype(int)).mean() < 10


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(4, 0)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    assert _mode(path).startswith("I")
    arr = np.asarray(load_image(path))
    assert arr[0, :, 0].tolist() == [0, 1, 128, 255]


def test_png_with_alpha_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red everywhere
    rgba[:, :4, 3] = 0  # left half fully transparent
    rgba[:, 4:6, 3] = 255  # opaque
    rgba[:, 6:, 3] = 128  # half transparent
    path = tmp_path / "a.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    arr = np.asarray(load_image(path)).astype(int)
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[0, 4]) == (200, 0, 0)
    assert abs(arr[0, 7, 0] - (200 * 128 + 255 * 127) / 255) <= 1
    assert abs(arr[0, 7, 1] - 255 * 127 / 255) <= 1
    black = np.asarray(load_image(path, background=(0, 0, 0)))
    assert tuple(black[0, 0]) == (0, 0, 0)


def test_gray_with_alpha(tmp_path):
    la = np.zeros((4, 4, 2), dtype=np.uint8)
    la[..., 0] = 10
    la[:, 2:, 1] = 255
    path = tmp_path / "la.png"
    Image.fromarray(la, mode="LA").save(path)
    arr = np.asarray(load_image(path))
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[0, 3]) == (10, 10, 10)


def test_exif_orientation_off_by_default(tmp_path):
    path = tmp_path / "rot.jpg"
    img = Image.fromarray(_rgb(48, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    img.save(path, exif=exif)
    assert load_image(path).size == (64, 48)  # stored layout
    assert load_image(path, exif_transpose=True).size == (48, 64)


def _handle_leaks(load, path) -> list[str]:
    """What ``load(path)`` leaves open: descriptors of ``path`` still open while its result is alive
    (from /proc/self/fd), and files closed only by the garbage collector (their ResourceWarning,
    recorded here because a warning raised as an error in a finaliser would be swallowed)."""

    def open_fds() -> int:
        fd_dir = Path("/proc/self/fd")
        if not fd_dir.is_dir():
            return 0
        target = os.path.realpath(path)
        count = 0
        for fd in fd_dir.iterdir():
            try:
                count += os.readlink(fd) == target
            except OSError:  # closed meanwhile (the descriptor of the listing itself)
                pass
        return count

    leaks: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        before = open_fds()
        results = [load(path) for _ in range(3)]
        still_open = open_fds() - before
        if still_open:
            leaks.append(f"{still_open} descriptor(s) of {path} open after loading")
        del results
        gc.collect()
    leaks += [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    return leaks


def test_file_handles_are_closed(jpeg):
    assert _handle_leaks(load_image, jpeg) == []
    assert _handle_leaks(lambda p: ImageListDataset([p])[0][0], jpeg) == []


def test_the_handle_check_catches_leaking_loaders(jpeg):
    def lazy(path):  # PIL's lazy open keeps the file open until the pixels are loaded
        return Image.open(path)

    def dropped(path):  # a file left for the garbage collector to close
        f = open(path, "rb")  # noqa: SIM115 - the leak under test
        f.read(2)
        return load_image(path)

    assert any("descriptor" in leak for leak in _handle_leaks(lazy, jpeg))
    assert any("unclosed file" in leak for leak in _handle_leaks(dropped, jpeg))


# ---------------------------------------------------------------- resize policy


@pytest.mark.parametrize("long_side", [1024, 1024 / math.sqrt(2), 1024 * math.sqrt(2), 512, 300.4])
def test_resize_policy_properties(long_side):
    rng = np.random.default_rng(1)
    sizes = [(1024, 768), (768, 1024), (800, 800), (5, 3000), (3000, 5), (1, 1)] + [
        tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(300)
    ]
    target_long = math.floor(long_side + 0.5)
    for w, h in sizes:
        W, H = target_size(w, h, long_side)
        assert W % 16 == 0 and H % 16 == 0 and W >= 16 and H >= 16
        longer = W if w >= h else H
        assert abs(longer - target_long) <= 8  # the longer side is long_side, to the nearest 16
        s = target_long / max(w, h)
        for new, old in ((W, w), (H, h)):
            exact = old * s
            if exact >= 16:
                assert abs(new - exact) <= 8.5  # per-side error: half a multiple + rounding
        if min(w, h) * s >= 64:
            ratio_err = abs(math.log((W / H) / (w / h)))
            assert ratio_err <= 8.5 / (min(w, h) * s) * 2 + 1e-9


def test_resize_examples():
    assert target_size(1024, 768, 1024) == (1024, 768)
    assert target_size(1024, 768, 1024 / math.sqrt(2)) == (720, 544)  # 724 x 543 → nearest 16
    assert target_size(768, 1024, 1024 * math.sqrt(2)) == (1088, 1456)  # 1086 x 1448 (tie → up)
    assert target_size(10, 2000, 512) == (16, 512)  # at least 16
    img = resize_image(Image.new("RGB", (1024, 768)), 1024 / math.sqrt(2))
    assert img.size == (720, 544)


@pytest.mark.parametrize(
    ("side", "rounded", "bankers"),
    [(40, 48, 32), (72, 80, 64), (104, 112, 96), (24, 32, 32), (56, 64, 64)],
)
def test_every_side_is_rounded_half_up_by_the_one_rounding(side, rounded, bankers):
    """Model inputs, training buckets and tuple batches agree on halves (Python's round would not)."""
    assert max(16, round(side / 16) * 16) == bankers  # what banker's rounding would give
    assert round_to_multiple(side) == rounded
    assert target_size(128, side, 128) == (128, rounded)  # extraction / evaluation inputs
    assert bucket_size(128 / side, 128) == (rounded, 128)  # group-size training buckets
    assert common_size([(side, 128)], 128) == (rounded, 128)  # contrastive tuple batches


def test_resize_rejects_bad_sizes():
    with pytest.raises(DataError):
        target_size(10, 10, 0)
    with pytest.raises(DataError):
        target_size(0, 10, 100)


def test_to_tensor_normalises():
    img = Image.fromarray(np.full((2, 3, 3), [0, 128, 255], dtype=np.uint8))
    t = to_tensor(img, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert torch.allclose(t[:, 0, 0], torch.tensor([-1.0, 128 / 255 * 2 - 1, 1.0]), atol=1e-6)
    with pytest.raises(DataError):
        to_tensor(img, mean=(0.5, 0.5), std=(0.5, 0.5, 0.5))


def test_normalize_of_a_uint8_batch_equals_to_tensor_per_image():
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)) for _ in range(3)]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    batch = torch.stack([to_uint8_tensor(img) for img in imgs])
    assert batch.dtype == torch.uint8 and batch.shape == (3, 3, 5, 7)
    out = normalize(batch, mean, std)
    for i, img in enumerate(imgs):
        assert torch.equal(out[i], to_tensor(img, mean, std))
    with pytest.raises(DataError, match="positive"):
        normalize(batch, mean, (0.2, 0.0, 0.2))


def test_draft_changes_little(tmp_path):
    h, w = 1200, 1600
    y, x = np.mgrid[0:h, 0:w] / 40.0
    rng = np.random.default_rng(0)
    arr = np.stack([np.sin(x) + np.cos(1.3 * y), np.sin(0.7 * x + 0.5 * y), np.cos(0.3 * x - 0.9 * y)], -1)
    arr = np.clip((arr + 2) / 4 * 200 + rng.normal(0, 6, arr.shape), 0, 255).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(arr).save(path, quality=92)
    full = np.asarray(resize_image(load_image(path), 256)).astype(int)
    drafted = load_image(path, draft_long_side=256)
    assert max(drafted.size) < 1600 and max(drafted.size) >= 512  # decoded at reduced DCT scale
    fast = np.asarray(resize_image(drafted, 256)).astype(int)
    assert full.shape == fast.shape
    diff = np.abs(full - fast)
    assert diff.mean() < 1.0 and diff.max() <= 8


# ---------------------------------------------------------------- dataset


def test_dataset_crop_transform_and_errors(tmp_path, jpeg):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    paths = [jpeg, jpeg, bad]
    bbxs = [None, (10.5, 4.2, 30.5, 20.7), None]
    ds = ImageListDataset(paths, bbxs=bbxs)
    assert len(ds) == 3
    img0, i0 = ds[0]
    assert i0 == 0 and img0.size == (64, 48)
    img1, _ = ds[1]
    with Image.open(jpeg) as im:
        ref = im.convert("RGB").crop((10.5, 4.2, 30.5, 20.7))  # the reference code
    assert img1.size == ref.size == (20, 17)  # round half to even: 10.5→10, 30.5→30; 4.2→4, 20.7→21
    assert (np.asarray(img1) == np.asarray(ref)).all()
    with pytest.raises(ImageLoadError, match="empty file"):
        ds[2]

    tds = ImageListDataset(paths, transform=ResizeToTensor(64, (0.5,) * 3, (0.5,) * 3), on_error="skip")
    x, idx = tds[0]
    assert x.shape == (3, 48, 64) and idx == 0
    failure, idx = tds[2]
    assert isinstance(failure, LoadFailure) and failure.index == 2 and "empty" in failure.reason
    assert failure.path == str(bad)

    loader = torch.utils.data.DataLoader(tds, batch_size=3, collate_fn=collate_with_failures)
    images, indices, failures = next(iter(loader))
    assert indices == [0, 1] and len(images) == 2 and [f.index for f in failures] == [2]


def test_dataset_works_in_worker_processes(tmp_path, jpeg):
    ds = ImageListDataset([jpeg] * 4, transform=ResizeToTensor(64, (0.5,) * 3, (0.5,) * 3))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert [b[1].tolist() for b in batches] == [[0, 1], [2, 3]]
    assert batches[0][0].shape == (2, 3, 48, 64)


def test_dataset_validates_arguments(jpeg):
    with pytest.raises(DataError, match="bbxs"):
        ImageListDataset([jpeg], bbxs=[None, None])
    with pytest.raises(DataError, match="on_error"):
        ImageListDataset([jpeg], on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ImageLoadError, match="empty"):
        crop_bbx(Image.new("RGB", (10, 10)), (3.2, 3, 3.4, 8))
