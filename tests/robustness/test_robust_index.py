"""`dtop index build/add/info` on a hostile corpus, tampered index headers and failed commits."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import dtop.utils.io as io_module
from dtop.apps.index import ImageIndex
from dtop.errors import DataError
from dtop.retrieval.store import DescriptorStore
from dtop.utils.paths import show_path

from .hostile import OPTS, TRIED, make_corpus, run_dtop, texture


def searchable(index_dir: Path) -> set[str]:
    return set(ImageIndex.open(index_dir).paths)


def segment_failures(index_dir: Path) -> dict[str, str]:
    out = {}
    for seg in ImageIndex.open(index_dir).segments:
        out.update({f.path: f.reason for f in DescriptorStore.open(index_dir / seg["dir"]).failures()})
    return out


def test_build_on_hostile_corpus_indexes_every_good_image(hostile):
    """Defects 1, 5, 6, 14, 15: one run over corrupt files of many formats, FIFOs, links, odd names."""
    corpus, ix, result, linked = hostile
    assert result.code == 0, result.err
    paths = searchable(ix)
    for good in [*corpus.good, *linked]:
        assert str(good.resolve()) in paths, f"{show_path(good)} was not indexed"
    failures = segment_failures(ix)
    for bad in corpus.bad:
        assert failures.get(str(bad.resolve())), f"{show_path(bad)} has no recorded failure"
    assert len(paths) == len(corpus.good) + len(linked)
    for line in result.out.splitlines():  # every failure and skipped entry on one printable line
        assert line.isprintable()
    for odd in corpus.odd:
        if odd.name != "folder.jpg":  # a folder is listed (recursed into), not skipped
            assert show_path(odd.name) in result.out, f"{odd.name} not reported as skipped"


def test_hostile_build_names_each_problem_with_its_reason(hostile):
    corpus, ix, result, _ = hostile
    failures = segment_failures(ix)
    dds = failures[str((corpus.root / "corrupt-dds.jpg").resolve())]
    assert dds.startswith("corrupt or unsupported image data (NotImplementedError")  # defect 1 of the issue
    locked = failures[str((corpus.root / "locked.jpg").resolve())]
    assert locked.startswith("permission denied") and "corrupt" not in locked
    assert "private: cannot list the folder (Permission denied); make it readable" in result.out
    assert "linked-folder" not in result.out  # followed, not skipped
    assert "loop: a link to a folder listed already" in result.out


def test_add_commits_only_complete_segments_and_keeps_going(hostile, tmp_path, monkeypatch):
    """Defect 3 at its root: an extraction that planned no batches (as `--batch-size -3` did) left the
    shards unwritten and the index committed the segment anyway, every image lost. Now the add fails
    and commits nothing; the next add of the same folder resumes and indexes every good image."""
    import dtop.engine.extract as extract_module

    _, ix, _, _ = hostile
    copy = tmp_path / "ix"
    shutil.copytree(ix, copy, symlinks=True)
    more = make_corpus(tmp_path / "more", n_good=2, broken=4, odd_names=False)
    argv = ["index", "add", "--index", copy, "--images", more.root, "--workers", "0", "--no-progress"]
    with monkeypatch.context() as mp:
        mp.setattr(extract_module, "plan_batches", lambda shapes, batch_size: [])
        failed = run_dtop(*argv)
    assert failed.code == 2 and "unwritten" in failed.err and len(failed.error_lines) == 1
    assert len(ImageIndex.open(copy).segments) == 1
    result = run_dtop(*argv)
    assert result.code == 0, result.err
    assert "(resumed)" in result.out and "unreadable image(s) skipped" in result.out
    paths = searchable(copy)
    assert all(str(p.resolve()) in paths for p in more.good)
    TRIED["corpus entries (index add)"] += more.size


@pytest.mark.parametrize("option, value", [("--batch-size", "-3"), ("--batch-size", "0"), ("--workers", "-1"),
                                           ("--shard-size", "0"), ("--image-size", "100000"),
                                           ("--image-size", "-5"), ("--batch-size", "10000000")])
def test_numeric_options_are_checked_before_any_work(tmp_path, option, value):
    """Defects 3 and 9: `--batch-size -3` used to commit an index with every image lost."""
    photos = tmp_path / "photos"
    photos.mkdir()
    texture(0).save(photos / "a.jpg")
    opts = [o for o in OPTS]
    if option in opts:
        i = opts.index(option)
        del opts[i : i + 2]
    result = run_dtop("index", "build", "--images", photos, "--model", "dtop_tiny", "--out", tmp_path / "ix",
                      *opts, option, value)
    assert result.code == 2
    assert len(result.error_lines) == 1
    assert option in result.err or option.lstrip("-").replace("-", "_") in result.err
    assert not (tmp_path / "ix").exists()
    TRIED["bad numeric options"] += 1


TAMPERED_INDEX = {
    "segment outside": lambda m: m["segments"][0].update(dir="../../etc"),
    "segment id": lambda m: m["segments"][0].update(id="0"),
    "generation": lambda m: m.update(generation="x"),
    "engine": lambda m: m["search"].update(engine="bogus"),
    "faiss file": lambda m: m["search"].update(file="../model.safetensors"),
    "settings": lambda m: m["settings"].update(image_size=-1),
    "settings key": lambda m: m["settings"].update(colour="red"),
    "segments": lambda m: m.update(segments={"0": 1}),
    "model": lambda m: m.update(model=["x"]),
    "not an object": lambda m: m.clear(),
}


@pytest.mark.parametrize("kind", sorted(TAMPERED_INDEX))
def test_tampered_index_json_is_refused_in_one_line(hostile, tmp_path, kind):
    """Defect 16: edited headers are type-checked (a segment `dir` used to be followed outside the index)."""
    _, ix, _, _ = hostile
    copy = tmp_path / "ix"
    shutil.copytree(ix, copy, symlinks=True)
    meta = json.loads((copy / "index.json").read_text())
    TAMPERED_INDEX[kind](meta)
    (copy / "index.json").write_text(json.dumps(meta))
    for argv in (["index", "info", "--index", copy], ["search", "--index", copy, str(hostile[0].good[0]),
                                                       "--workers", "0", "--no-progress"]):
        result = run_dtop(*argv)
        assert result.code == 2, (kind, result.out)
        assert len(result.error_lines) == 1 and "index.json" in result.err and "build" in result.err
    TRIED["tampered headers"] += 1


def test_tampered_files_json_is_refused(hostile, tmp_path):
    _, ix, _, _ = hostile
    copy = tmp_path / "ix"
    shutil.copytree(ix, copy, symlinks=True)
    (copy / "segments" / "000" / "files.json").write_text('{"paths": [1, 2], "size": [1, 2], "mtime_ns": [1, 2]}')
    more = tmp_path / "more"
    more.mkdir()
    texture(9).save(more / "x.jpg")
    result = run_dtop("index", "add", "--index", copy, "--images", more, "--workers", "0", "--no-progress")
    assert result.code == 2 and "files.json is missing or damaged" in result.err
    TRIED["tampered headers"] += 1


@pytest.mark.slow
def test_failed_write_at_any_point_of_add_leaves_the_index_as_it_was(hostile, tmp_path, monkeypatch):
    """Fault injection: the n-th atomic rename of an `add` fails (a disk full, a kill between writes);
    the index still searches its old images, and the next add completes the segment."""
    corpus, ix, _, _ = hostile
    more = tmp_path / "more"
    more.mkdir()
    for i in range(3):
        texture(300 + i).save(more / f"m{i}.jpg")
    real_replace = os.replace
    counted = tmp_path / "counted"
    shutil.copytree(ix, counted, symlinks=True)
    calls = [0]

    def counting(src, dst):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return real_replace(src, dst)

    monkeypatch.setattr(io_module.os, "replace", counting)
    ImageIndex.open(counted).add(sorted(more.iterdir()), num_workers=0, progress=False, shard_size=2)
    n_writes = calls[0]
    before = searchable(ix)
    assert n_writes >= 6
    for fail_at in sorted({1, 2, n_writes // 2, n_writes - 1, n_writes}):  # the whole sweep takes minutes
        copy = tmp_path / f"ix{fail_at}"
        shutil.copytree(ix, copy, symlinks=True)
        calls[0] = 0

        def failing(src, dst, fail_at=fail_at):  # type: ignore[no-untyped-def]
            calls[0] += 1
            if calls[0] == fail_at:
                raise OSError(28, "No space left on device (injected)")
            return real_replace(src, dst)

        monkeypatch.setattr(io_module.os, "replace", failing)
        with pytest.raises((OSError, DataError)):
            ImageIndex.open(copy).add(sorted(more.iterdir()), num_workers=0, progress=False, shard_size=2)
        monkeypatch.setattr(io_module.os, "replace", real_replace)
        if fail_at < n_writes:  # the last rename is index.json itself
            assert searchable(copy) == before
        ImageIndex.open(copy).add(sorted(more.iterdir()), num_workers=0, progress=False, shard_size=2)
        assert searchable(copy) == before | {str(p.resolve()) for p in more.iterdir()}
        TRIED["injected write failures"] += 1
