"""The descriptor store: resume after a crash, concurrent writers, reuse decisions, failures."""

from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from dtop.errors import DataError
from dtop.retrieval.store import DescriptorStore, Failure
from dtop.utils.locks import file_lock

N_IMAGES, DIM, SHARD = 53, 16, 10
IMAGES = [f"jpg/img_{i:03d}.jpg" for i in range(N_IMAGES)]
SETTINGS = {"scales": [2**-0.5, 1.0, 2**0.5], "image_size": 1024, "dtype": "float16"}
MODEL = {"hash": "0123456789abcdef", "config": {"arch": "dtop", "dim": DIM}}
FAILED = {12, 37}


def descriptors() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.normalize(torch.randn(N_IMAGES, DIM, generator=g), dim=1)


def write_one(store: DescriptorStore, i: int, desc: torch.Tensor, shuffle: bool = False) -> None:
    items = list(store.shard_items(i))
    ok = [j for j in items if j not in FAILED]
    if shuffle:  # the caller's row order must not matter
        ok = ok[::-1]
    store.write_shard(i, desc[ok], ok, failures=[(j, "cannot decode") for j in items if j in FAILED])


def create(root: Path, **kw) -> DescriptorStore:
    args = {"images": IMAGES, "settings": SETTINGS, "model_info": MODEL, "shard_size": SHARD, **kw}
    return DescriptorStore.create(root, **args)


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("shard-*.safetensors"))}


def test_uninterrupted_write_and_load(tmp_path) -> None:
    desc = descriptors()
    store = create(tmp_path / "s")
    assert store.num_shards == 6 and store.shard_items(5) == range(50, 53)
    assert store.missing_shards() == list(range(6)) and not store.is_complete()
    for i in store.missing_shards():
        write_one(store, i, desc)
    assert store.is_complete() and store.verify() == []
    loaded, valid = store.load()
    assert loaded.dtype == torch.float16 and loaded.shape == (N_IMAGES, DIM)
    assert valid.sum() == N_IMAGES - len(FAILED) and not valid[12] and not valid[37]
    assert torch.equal(loaded[valid], desc.half()[valid]) and not loaded[~valid].any()
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["finished_shards"] == list(range(6)) and manifest["complete"]
    assert manifest["model"] == MODEL and manifest["settings"]["image_size"] == 1024
    assert manifest["num_images"] == N_IMAGES and manifest["shard_size"] == SHARD
    assert (tmp_path / "s" / "images.txt").read_text().splitlines() == IMAGES
    assert "shards=6/6 finished" in repr(store) and "dim=16" in repr(store)


def test_resume_after_crash_is_byte_identical(tmp_path) -> None:
    desc = descriptors()
    full = create(tmp_path / "full")
    for i in range(full.num_shards):
        write_one(full, i, desc)

    root = tmp_path / "resumed"
    first = create(root)
    for i in (0, 1, 3):
        write_one(first, i, desc, shuffle=True)
    # the crash: a temp file of shard 2 half written, shard 4 renamed but its marker never written
    (root / ".shard-00002.safetensors.x1y2z3.tmp").write_bytes(b"\0" * 100)
    (root / "shard-00004.safetensors").write_bytes(b"half a shard")

    second = create(root)  # the rerun: same model and settings, so the store is reused
    assert second.finished_shards() == [0, 1, 3]
    assert second.missing_shards() == [2, 4, 5]
    for i in second.missing_shards():
        write_one(second, i, desc)
    second.finalize()
    assert not list(root.glob(".*.tmp"))
    assert shard_bytes(root) == shard_bytes(tmp_path / "full")
    a, va = full.load()
    b, vb = DescriptorStore.open(root).load()
    assert torch.equal(a, b) and torch.equal(va, vb)
    assert second.failures() == full.failures()
    assert second.verify() == []


def _writer(root: str, rank: int, world: int) -> None:
    desc = descriptors()
    store = DescriptorStore.open(root)
    for i in store.assigned_shards(rank, world):
        write_one(store, i, desc)


def test_concurrent_writers_keep_the_manifest_consistent(tmp_path) -> None:
    root = tmp_path / "s"
    create(root, shard_size=4)  # 14 shards, 7 per writer
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(root), r, 2)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["finished_shards"] == list(range(14)) and manifest["complete"]
    assert sorted(f["index"] for f in manifest["failures"]) == sorted(FAILED)
    store = DescriptorStore.open(root)
    assert store.is_complete() and store.verify() == []
    loaded, valid = store.load()
    expected = descriptors().half()
    assert torch.equal(loaded[valid], expected[valid]) and valid.sum() == N_IMAGES - len(FAILED)
    writers = {json.loads(p.read_text())["writer"]["pid"] for p in root.glob("shard-*.done.json")}
    assert len(writers) == 2


def test_manifest_writers_wait_for_the_lock(tmp_path) -> None:
    store = create(tmp_path / "s")
    done = threading.Event()
    with file_lock(tmp_path / "s" / ".manifest.lock"):  # another writer is rewriting the manifest
        writer = threading.Thread(target=lambda: (write_one(store, 0, descriptors()), done.set()))
        writer.start()
        assert not done.wait(0.5)  # the shard's manifest refresh waits (it does not fail)
    writer.join(10)
    assert done.is_set() and json.loads((tmp_path / "s" / "manifest.json").read_text())["finished_shards"] == [0]


def test_assigned_shards_and_partial_load(tmp_path) -> None:
    store = create(tmp_path / "s")
    assert store.assigned_shards(0, 2) == [0, 2, 4] and store.assigned_shards(1, 2) == [1, 3, 5]
    write_one(store, 1, descriptors())
    assert store.assigned_shards(1, 2) == [3, 5]
    with pytest.raises(DataError, match="incomplete: 5 of 6 shards missing"):
        store.load()
    partial, valid = store.load(require_complete=False, numpy=True)
    assert isinstance(partial, np.ndarray) and valid.sum() == 9 and valid[10:20].sum() == 9


def test_settings_or_model_mismatch_is_a_clear_error(tmp_path) -> None:
    root = tmp_path / "s"
    store = create(root)
    write_one(store, 0, descriptors())
    with pytest.raises(DataError, match=r"model\.hash.*--out.*--overwrite"):
        create(root, model_info={**MODEL, "hash": "fedcba9876543210"})
    with pytest.raises(DataError, match=r"settings\.image_size: store has 1024, requested 512"):
        create(root, settings={**SETTINGS, "image_size": 512})
    with pytest.raises(DataError, match="image list"):
        create(root, images=IMAGES[:-1])
    with pytest.raises(DataError, match="shard_size"):
        create(root, shard_size=20)
    assert store.differences(SETTINGS, MODEL) == []
    assert store.differences({**SETTINGS, "dtype": "float32"}, MODEL) == [
        "settings.dtype: store has 'float16', requested 'float32'"
    ]
    # tuples and lists are the same setting (JSON round trip)
    assert store.differences({**SETTINGS, "scales": tuple(SETTINGS["scales"])}, MODEL) == []
    fresh = create(root, settings={**SETTINGS, "image_size": 512}, overwrite=True)
    assert fresh.missing_shards() == list(range(6)) and fresh.settings["image_size"] == 512
    assert not list(root.glob("shard-*"))


def test_failures_recorded_and_checked(tmp_path) -> None:
    store = create(tmp_path / "s")
    desc = descriptors()
    store.record_failures([(12, "truncated file"), Failure(15, "", "later fixed")])
    assert [(f.index, f.path) for f in store.failures()] == [(12, IMAGES[12]), (15, IMAGES[15])]
    with pytest.raises(DataError, match=r"6 image\(s\) have neither a descriptor nor a recorded failure"):
        store.write_shard(1, desc[10:12], [10, 11])  # 13, 14, 16..19: no descriptor, no failure
    ok = [10, 11, 13, 14, 15, 16, 17, 18, 19]  # 15 succeeded after all: the success wins
    store.write_shard(1, desc[ok], ok)
    assert store.failures() == [Failure(12, IMAGES[12], "truncated file")]
    with pytest.raises(DataError, match="already finished"):
        store.record_failures([(13, "too late")])
    # a shard where every image failed
    store.write_shard(5, torch.empty(0, DIM), [], failures=[(j, "missing") for j in range(50, 53)])
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["num_failures"] == 4
    assert manifest["failures"][0] == {"index": 12, "path": IMAGES[12], "reason": "truncated file"}


def test_write_shard_validation(tmp_path) -> None:
    store = create(tmp_path / "s")
    desc = descriptors()
    items = list(range(10))
    bad = desc[:10].clone()
    bad[3, 0] = float("nan")
    with pytest.raises(DataError, match="finite"):
        store.write_shard(0, bad, items)
    with pytest.raises(DataError, match="outside"):
        store.write_shard(0, desc[:10], [j + 5 for j in items])
    with pytest.raises(DataError, match="does not exist"):
        store.write_shard(6, desc[:3], [60, 61, 62])
    with pytest.raises(DataError, match="len\\(indices\\)"):
        store.write_shard(0, desc[:9], items)
    store.write_shard(0, desc[:10], items)
    with pytest.raises(DataError, match="other shards are 16-d"):
        store.write_shard(2, torch.zeros(10, 8), list(range(20, 30)))


def test_mmap_load_and_float32(tmp_path) -> None:
    store = create(tmp_path / "s", settings={**SETTINGS, "dtype": "float32"})
    desc = descriptors()
    for i in range(store.num_shards):
        write_one(store, i, desc)
    dense, valid = store.load()
    mm, mvalid = store.load(numpy=True, mmap=True)
    assert isinstance(mm, np.memmap) and mm.dtype == np.float32
    assert np.array_equal(mm, dense.numpy()) and np.array_equal(mvalid, valid.numpy())
    t, tv = store.load(mmap=True)  # reuses the consolidated copy
    assert torch.equal(t, dense) and torch.equal(tv, valid)
    assert torch.equal(dense[valid], desc[valid])


def test_open_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="not a descriptor store"):
        DescriptorStore.open(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(DataError, match="not a dtop descriptor store"):
        DescriptorStore.open(tmp_path)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "shard-00000.safetensors").write_bytes(b"x")
    with pytest.raises(DataError, match="damaged store"):
        create(damaged)
    with pytest.raises(DataError, match="empty image list"):
        DescriptorStore.create(tmp_path / "e", [], SETTINGS, MODEL)


def test_damaged_or_outdated_manifest_says_how_to_fix_it(tmp_path) -> None:
    root = tmp_path / "s"
    create(root)
    path = root / "manifest.json"
    good = json.loads(path.read_text())
    path.write_text(path.read_text()[:-20])
    with pytest.raises(DataError, match="not readable JSON.*re-extract with --overwrite"):
        DescriptorStore.open(root)
    path.write_text(json.dumps({**good, "format_version": 99}))
    with pytest.raises(DataError, match="format version 99; this dtop reads 1. Re-extract"):
        DescriptorStore.open(root)
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "num_shards"}))
    with pytest.raises(DataError, match=r"lacks the key\(s\) \['num_shards'\]"):
        DescriptorStore.open(root)
    path.write_text(json.dumps(good))
    assert DescriptorStore.open(root).manifest()["num_shards"] == good["num_shards"]
