"""The image loader on hostile files: every failure is the image's own, named, with a reason."""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dtop.data.images import ImageListDataset, ImageLoadError, LoadFailure, load_image, read_image_sizes
from dtop.utils.paths import decode_line, encode_line, show_path

from .hostile import FORMATS, IS_ROOT, TRIED, Corpus, broken_images, encode, texture


def finishes(fn: Callable[[], Any], seconds: float = 5.0) -> Any:
    """``fn()`` run in a daemon thread; fails the test if it has not returned after ``seconds``."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            out["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s (blocked on a FIFO?)"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_every_broken_file_of_every_format_is_an_image_load_error(tmp_path):
    """Truncated, bit-flipped and zeroed files of each format PIL writes: loaded or ImageLoadError, nothing else."""
    items = broken_images()
    assert {b.fmt for b in items} >= {"PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "DDS", "ICO"}
    failed = 0
    for item in items:
        path = tmp_path / f"{item.name}.jpg"
        path.write_bytes(item.data)
        try:
            img = load_image(path)
        except ImageLoadError as err:
            failed += 1
            assert err.path == str(path) and err.reason
            assert "\n" not in str(err)
        else:
            assert img.mode == "RGB"
    TRIED["broken image files"] += len(items)
    assert failed > len(items) // 2


def test_damaged_dds_raising_not_implemented_error_is_the_images_failure(tmp_path):
    """The issue's reproduction: PIL raises NotImplementedError on this damaged DDS."""
    good = encode(texture(0, (16, 16)), "DDS")
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(good[:80] + bytes(4) + good[84:])
    with pytest.raises(ImageLoadError, match="corrupt or unsupported image data .NotImplementedError"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "TIFF", "WEBP", "DDS", "BMP", "ICO"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_corruption_never_raises_out_of_the_loader(tmp_path, fmt, data):
    """Property: whatever bytes of a valid image are changed, cut or appended, the loader returns an RGB
    image or raises ImageLoadError."""
    good = bytearray(encode(texture(1, (24, 20)), fmt))
    edits = data.draw(st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)), max_size=12))
    for pos, value in edits:
        good[pos] = value
    cut = data.draw(st.integers(1, len(good)))
    path = tmp_path / f"fuzz{FORMATS[fmt][0]}"
    path.write_bytes(bytes(good[:cut]))
    TRIED["hypothesis-corrupted images"] += 1
    try:
        img = load_image(path, draft_long_side=8)
    except ImageLoadError as err:
        assert err.reason
    else:
        assert img.mode == "RGB" and img.size[0] > 0


def test_fifo_is_never_opened(tmp_path):
    """Defect 6: a FIFO blocks open() for reading until a writer comes; the loader refuses it first."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageLoadError, match="not a regular file"):
        finishes(lambda: load_image(fifo))
    sizes = finishes(lambda: read_image_sizes([str(fifo)] * 3, progress=False))
    assert sizes.tolist() == [[0, 0]] * 3
    TRIED["non-regular files"] += 2


@pytest.mark.parametrize("kind", ["folder", "device", "dangling", "loop", "missing"])
def test_non_regular_and_missing_entries_have_a_reason(tmp_path, kind):
    path = tmp_path / f"{kind}.jpg"
    expected = {"folder": "folder", "device": "not a regular file", "dangling": "dangling symbolic link",
                "loop": "cannot open", "missing": "file not found"}[kind]
    if kind == "folder":
        path.mkdir()
    elif kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "dangling":
        path.symlink_to(tmp_path / "nowhere.jpg")
    elif kind == "loop":
        path.symlink_to(path)
    with pytest.raises(ImageLoadError, match=expected):
        finishes(lambda: load_image(path))
    TRIED["non-regular files"] += 1


def test_permission_denied_is_not_called_corrupt(tmp_path, deny_access):
    path = tmp_path / "locked.jpg"
    texture(2).save(path)
    if IS_ROOT:
        deny_access(path)
    else:
        path.chmod(0)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert "permission denied" in info.value.reason and "corrupt" not in info.value.reason
    assert "chmod" in info.value.reason
    TRIED["unreadable files"] += 1


def test_pil_warnings_are_logged_once_naming_the_file(tmp_path, caplog, monkeypatch):
    """PIL's warning about an image (here: more pixels than MAX_IMAGE_PIXELS) is reported once, with the
    file name, through logging (it used to reach stderr twice: at the header read and at the load)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x32 = 1280 pixels: a warning, not an error
    path = tmp_path / "big.png"
    texture(3).save(path)
    with warnings.catch_warnings(record=True) as leaked, caplog.at_level(logging.WARNING, logger="dtop"):
        warnings.simplefilter("always")
        read_image_sizes([str(path)] * 70, progress=False)  # the threaded header reads
        load_image(path)
    assert not leaked, [str(w.message) for w in leaked]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith(f"{path}: Image size (1280 pixels) exceeds limit")


def test_dataset_skip_mode_on_the_corpus(corpus: Corpus):
    """Every good image (odd names included) loads; every other entry is a LoadFailure with a reason."""
    paths = corpus.good + corpus.bad + corpus.odd
    ds = ImageListDataset(paths, on_error="skip")
    results = finishes(lambda: [ds[i][0] for i in range(len(ds))], seconds=20)
    n_good = len(corpus.good)
    assert all(isinstance(r, Image.Image) for r in results[:n_good])
    failures = results[n_good:]
    assert all(isinstance(f, LoadFailure) and f.reason for f in failures)
    assert [f.path for f in failures] == [str(p) for p in corpus.bad + corpus.odd]


def test_show_path_prints_any_name_on_one_line():
    names = ["plain.jpg", "café.jpg", os.fsdecode(b"bad\xffname.jpg"), "line\nbreak.jpg", "tab\t.jpg", "\x1b[31m.jpg",
             "quote'.jpg", "\ud800lone.jpg"]
    for name in names:
        shown = show_path(name)
        assert shown.isprintable() and "\n" not in shown
        shown.encode("utf-8")
        assert decode_line(encode_line(name)) == name
        assert b"\n" not in encode_line(name)
    assert show_path("plain.jpg") == "plain.jpg"
    assert show_path(os.fsdecode(b"bad\xffname.jpg")) == "'bad\\xffname.jpg'"
    assert show_path(Path("a\nb")) == "'a\\nb'"
    TRIED["odd file names"] += len(names)


def test_loader_survives_huge_declared_size(tmp_path):
    """A header declaring a gigantic image is refused (decompression bomb), not decoded."""
    path = tmp_path / "bomb.png"
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = (60000).to_bytes(4, "big") + (60000).to_bytes(4, "big")  # IHDR width, height
    path.write_bytes(bytes(data))
    with pytest.raises(ImageLoadError):
        load_image(path)
    assert np.all(read_image_sizes([str(path)], progress=False) >= 0)
    TRIED["broken image files"] += 1


def test_training_loader_skips_every_hostile_file(corpus: Corpus):
    """Defect 1 for training: the damaged DDS (NotImplementedError) used to abort `dtop train`, although
    `dtop data check` promises that training skips unreadable images. Every entry that is not a good
    image gives None (skipped by the collate function); the good ones load."""
    from dtop.data.training.dataset import TrainDataset
    from dtop.data.training.trainingset import TrainingSet

    dds = encode(texture(0, (16, 16)), "DDS")
    (corpus.root / "corrupt-dds.jpg").write_bytes(dds[:80] + bytes(4) + dds[84:])
    paths = [*corpus.good, *corpus.bad, *corpus.odd, corpus.root / "corrupt-dds.jpg"]
    ts = TrainingSet(paths=[str(p) for p in paths], labels=np.zeros(len(paths), dtype=np.int64), num_classes=1,
                     class_names=["a"])
    ds = TrainDataset(ts, augment=True, mean=(0.5,) * 3, std=(0.5,) * 3)
    items = finishes(lambda: [ds[(i, (32, 32))] for i in range(len(paths))], seconds=30)
    assert all(item is not None for item in items[: len(corpus.good)])
    assert all(item is None for item in items[len(corpus.good):])
    TRIED["training loader inputs"] += len(paths)
