"""The descriptor store under hostile names, concurrent creators, bit rot, tampered headers and crashes."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import dtop.retrieval.store as store_module
import dtop.utils.io as io_module
from dtop.errors import DataError
from dtop.retrieval.store import DescriptorStore

from .hostile import TRIED

DIM, SHARD = 8, 4
SETTINGS = {"image_size": 64, "dtype": "float32"}
MODEL = {"fingerprint": "abc", "config": {"arch": "dtop"}}
ODD_NAMES = ["plain.jpg", os.fsdecode(b"bad\xffname.jpg"), "line\nbreak.jpg", "cr\rname.jpg", "caf\u00e9.jpg",
             "\0lead-nul-is-impossible-but-stored.jpg", "-dash.jpg", "x" * 300 + ".jpg", "tab\t.jpg", "back\\slash.jpg"]


def fill(store: DescriptorStore, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    desc = torch.nn.functional.normalize(torch.randn(store.num_images, DIM, generator=g))
    for i in store.missing_shards():
        items = list(store.shard_items(i))
        store.write_shard(i, desc[items], items)
    return desc


def make(root: Path, names: list[str] | None = None, **kw) -> DescriptorStore:
    names = names or [f"img{i}.jpg" for i in range(10)]
    return DescriptorStore.create(root, names, {**SETTINGS, **kw.pop("settings", {})}, MODEL, shard_size=SHARD, **kw)


def test_any_file_name_is_stored_losslessly(tmp_path):
    """Defects 5 and 14: names that are not UTF-8 or hold line breaks used to crash or block the store."""
    store = make(tmp_path / "s", ODD_NAMES)
    fill(store)
    again = DescriptorStore.open(tmp_path / "s")
    assert again.images == ODD_NAMES
    assert again.differences(SETTINGS, MODEL, images=ODD_NAMES, shard_size=SHARD) == []
    assert make(tmp_path / "s", ODD_NAMES).images == ODD_NAMES  # reopened (resume), not refused
    TRIED["odd file names"] += len(ODD_NAMES)


def test_old_stores_read_the_same(tmp_path):
    """A UTF-8 name list is written byte for byte as before (one name per line), so old stores still open."""
    names = ["a.jpg", "caf\u00e9.jpg", "b c.jpg"]
    make(tmp_path / "s", names)
    assert (tmp_path / "s" / "images.txt").read_bytes() == "".join(f"{n}\n" for n in names).encode()


def _create_in_thread(root: Path, settings: dict, barrier: threading.Barrier, out: list) -> None:
    barrier.wait()
    try:
        out.append(("ok", make(root, settings=settings)))
    except DataError as err:
        out.append(("error", str(err)))


@pytest.mark.parametrize("trial", range(6))
def test_two_creators_with_different_settings_one_wins(tmp_path, monkeypatch, trial):
    """Defect 7: both used to succeed and mix descriptors under one manifest. Now the check and the
    creation happen under the store's lock: one creates, the other is told the store holds other settings."""
    real_now = store_module.utc_now

    def slow_now() -> str:  # widens the window between "no manifest yet" and writing it
        time.sleep(0.02)
        return real_now()

    monkeypatch.setattr(store_module, "utc_now", slow_now)
    root = tmp_path / "s"
    barrier, out = threading.Barrier(2), []
    threads = [threading.Thread(target=_create_in_thread, args=(root, {"image_size": size}, barrier, out))
               for size in (64, 96)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kinds = sorted(kind for kind, _ in out)
    assert kinds == ["error", "ok"], out
    winner = next(s for kind, s in out if kind == "ok")
    error = next(s for kind, s in out if kind == "error")
    assert "already holds descriptors of a different model or settings" in error and "--out" in error
    assert DescriptorStore.open(root).settings == winner.settings
    TRIED["concurrent creators"] += 2


def _create_process(root: str, size: int, start: float, queue) -> None:  # type: ignore[no-untyped-def]
    time.sleep(max(0.0, start - time.time()))
    try:
        make(Path(root), settings={"image_size": size})
        queue.put("ok")
    except DataError:
        queue.put("error")


def test_two_creator_processes_one_wins(tmp_path):
    """The same with processes started together (the issue's 16 of 20 trials mixed settings)."""
    ctx = multiprocessing.get_context("fork")
    for trial in range(5):
        queue = ctx.Queue()
        start = time.time() + 0.3
        procs = [ctx.Process(target=_create_process, args=(str(tmp_path / f"s{trial}"), size, start, queue))
                 for size in (64, 96)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert sorted(queue.get(timeout=5) for _ in procs) == ["error", "ok"]
    TRIED["concurrent creators"] += 10


def test_a_writer_stops_when_its_store_is_replaced(tmp_path):
    """A writer whose store another process replaced with --overwrite writes no marker into the new one."""
    a = make(tmp_path / "s")
    DescriptorStore.create(tmp_path / "s", [f"img{i}.jpg" for i in range(10)], {"image_size": 96}, MODEL,
                           shard_size=SHARD, overwrite=True)
    with pytest.raises(DataError, match="removed or replaced by another process"):
        a.write_shard(0, torch.zeros(4, DIM) + 0.5, [0, 1, 2, 3])
    assert DescriptorStore.open(tmp_path / "s").finished_shards() == []


def test_bit_rot_in_a_shard_is_detected(tmp_path):
    """Defect 8: one flipped bit in a shard used to load silently (−0.141 became −4.8e37)."""
    store = make(tmp_path / "s")
    fill(store)
    shard = tmp_path / "s" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40  # inside the last descriptor value
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="shard-00001.safetensors does not match the sha256 in shard-00001.done.json"):
        DescriptorStore.open(tmp_path / "s").load()
    with pytest.raises(DataError, match="delete it and shard-00001.done.json"):
        DescriptorStore.open(tmp_path / "s").load(mmap=True)
    TRIED["damaged store files"] += 1


def test_consolidated_copy_is_rebuilt_when_its_size_is_wrong(tmp_path):
    store = make(tmp_path / "s")
    desc = fill(store)
    store.load(numpy=True, mmap=True)
    path = tmp_path / "s" / "descriptors.npy"
    path.write_bytes(path.read_bytes()[:-16])
    loaded, valid = DescriptorStore.open(tmp_path / "s").load(numpy=True, mmap=True)
    assert np.array_equal(np.asarray(loaded), desc.numpy()) and valid.all()
    TRIED["damaged store files"] += 1


TAMPERED_MANIFESTS = {
    "num_images": -5, "num_shards": 1, "shard_size": 0, "dtype": "int8", "settings": [1, 2], "model": "m",
    "images_file": "../etc/passwd", "images_sha256": 7,
}


@pytest.mark.parametrize("key", sorted(TAMPERED_MANIFESTS))
def test_edited_manifest_is_refused_with_the_key(tmp_path, key):
    """Defect 16: `num_images: -5`, a lowered `num_shards` (which silently loaded one shard), ..."""
    store = make(tmp_path / "s")
    fill(store)
    path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, key: TAMPERED_MANIFESTS[key]}))
    with pytest.raises(DataError, match=f"manifest.json: {key} must be .*re-extract with --overwrite"):
        DescriptorStore.open(tmp_path / "s").load()
    TRIED["tampered headers"] += 1


TAMPERED_MARKERS = {
    "list": [], "count": {"count": "4"}, "too many": {"count": 9}, "dim": {"dim": -1}, "shard": {"shard": 3},
    "failures": {"failures": "none"}, "dtype": {"dtype": "float16"}, "json": None,
}


@pytest.mark.parametrize("kind", sorted(TAMPERED_MARKERS))
def test_edited_done_marker_is_refused_with_the_repair(tmp_path, kind):
    store = make(tmp_path / "s")
    fill(store)
    path = tmp_path / "s" / "shard-00001.done.json"
    marker = json.loads(path.read_text())
    change = TAMPERED_MARKERS[kind]
    if change is None:
        path.write_text("{not json")
    else:
        path.write_text(json.dumps(change if isinstance(change, list) else {**marker, **change}))
    with pytest.raises(DataError, match="shard-00001.done.json is damaged .*delete it and shard-00001.safetensors"):
        DescriptorStore.open(tmp_path / "s").load()
    TRIED["tampered headers"] += 1


@pytest.mark.parametrize("fail_at", range(1, 9))
def test_a_crash_at_any_write_leaves_a_store_that_resumes_identically(tmp_path, monkeypatch, fail_at):
    """Fault injection: the n-th atomic rename raises (as a kill between writes would stop there); the
    store is never reported complete with missing rows, and a rerun completes it byte-identically."""
    reference = make(tmp_path / "ref")
    fill(reference)
    real_replace, count = os.replace, [0]

    def failing_replace(src, dst):  # type: ignore[no-untyped-def]
        count[0] += 1
        if count[0] == fail_at:
            raise OSError(28, "No space left on device (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(io_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        fill(make(tmp_path / "s"))
    monkeypatch.setattr(io_module.os, "replace", real_replace)
    try:
        partial = DescriptorStore.open(tmp_path / "s")
        assert not partial.is_complete()
        with pytest.raises(DataError, match="incomplete"):
            partial.load()
    except DataError as err:  # killed before the manifest existed
        assert "not a descriptor store" in str(err)
    resumed = make(tmp_path / "s")
    fill(resumed)
    assert resumed.is_complete() and resumed.verify() == []
    for i in range(resumed.num_shards):
        name = f"shard-{i:05d}.safetensors"
        assert (tmp_path / "s" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    TRIED["injected write failures"] += 1
