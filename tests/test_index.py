"""Image index of one's own photos: dtop index build/add/info, dtop search, contact sheets."""

import json
import os
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageEnhance

import dtop.apps.index as index_module
from dtop.apps.index import FORMAT, ImageIndex, build_image_index
from dtop.cli.main import main
from dtop.engine.extract import ExtractSettings, model_fingerprint
from dtop.errors import ConfigError, DataError
from dtop.report.contact_sheet import CAPTION_HEIGHT, PAD, SEPARATOR, contact_sheet, sheet_size
from dtop.utils.locks import file_lock

BUILD_OPTS = ["--image-size", "64", "--workers", "0", "--no-progress"]
RUN_OPTS = ["--workers", "0", "--no-progress"]
SIZES = [(96, 72), (72, 96), (80, 80), (100, 60)]


def texture(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A random colour texture: coarse random colours upsampled, plus fine noise."""
    coarse = rng.integers(0, 255, (int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int64)
    noise = rng.integers(-40, 40, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(7)
    lib, more = root / "lib", root / "more"
    lib.mkdir()
    more.mkdir()
    lib_paths = []
    for i in range(8):
        path = lib / f"img{i}.jpg"
        texture(rng, *SIZES[i % len(SIZES)]).save(path, quality=92)
        lib_paths.append(path)
    flipped = more / "img0_flipped.jpg"
    Image.open(lib_paths[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped, quality=92)
    cropped = more / "img1_crop_bright.png"
    img1 = Image.open(lib_paths[1])
    ImageEnhance.Brightness(img1.crop((8, 8, img1.width - 8, img1.height - 16))).enhance(1.3).save(cropped)
    listing = root / "all.txt"
    listing.write_text("".join(f"{p}\n" for p in [*lib_paths, flipped, cropped]))
    return SimpleNamespace(root=root, lib=lib, more=more, lib_paths=lib_paths, more_paths=[flipped, cropped],
                           listing=listing)


@pytest.fixture(scope="module")
def built(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("indexes") / "lib.index"
    rc = main(["index", "build", "--images", str(photos.lib), "--model", "dtop_tiny", "--out", str(out), *BUILD_OPTS])
    assert rc == 0
    return out


@pytest.fixture
def index_copy(built, tmp_path):
    """A private copy of the built index (it refers to the same absolute image paths)."""
    out = tmp_path / "copy.index"
    shutil.copytree(built, out)
    return out


def run_json(capsys, args, tmp_path, name="out.json"):
    out = tmp_path / name
    rc = main([*args, "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    return json.loads(out.read_text()), text


def file_states(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------------------------- build/search


def test_build_then_search_finds_each_image_first(built, photos, capsys, tmp_path):
    meta = json.loads((built / "index.json").read_text())
    assert meta["format"] == FORMAT and meta["num_images"] == 8
    assert meta["settings"]["image_size"] == 64 and len(meta["settings"]["scales"]) == 3
    assert [s["dir"] for s in meta["segments"]] == ["segments/000"]
    index = ImageIndex.open(built)
    assert model_fingerprint(index.load_model()) == meta["model"]["fingerprint"]  # self-contained model copy
    assert len(index) == 8 and sorted(index.paths) == sorted(str(p.resolve()) for p in photos.lib_paths)

    queries = [str(p) for p in photos.lib_paths]
    data, text = run_json(capsys, ["search", "--index", str(built), *queries, "--topk", "3", *RUN_OPTS], tmp_path)
    assert data["topk"] == 3 and data["engine"] == "torch" and len(data["queries"]) == 8
    for q, entry in zip(queries, data["queries"]):
        assert entry["query"] == q
        ranks = entry["results"]
        assert [r["rank"] for r in ranks] == [1, 2, 3]
        assert ranks[0]["path"] == str(Path(q).resolve())
        assert ranks[0]["score"] == pytest.approx(1.0, abs=1e-4)
        scores = [r["score"] for r in ranks]
        assert scores == sorted(scores, reverse=True) and scores[1] < 0.9999
    assert text.endswith(f"wrote {tmp_path / 'out.json'}\n")
    blocks = text.strip().rsplit("\n", 1)[0].split("\n\n")
    assert len(blocks) == 8 and blocks[0].splitlines()[0] == f"query {queries[0]}"
    assert re.fullmatch(r"\s+1  1\.0000  \S+img0\.jpg", blocks[0].splitlines()[1])
    assert all(re.fullmatch(r"\s+\d+  \d\.\d{4}  \S+", line) for b in blocks for line in b.splitlines()[1:])


def test_index_info(built, capsys):
    assert main(["index", "info", "--index", str(built)]) == 0
    text = capsys.readouterr().out
    assert "8 searchable" in text and "dtop_tiny" in text and "exact (torch)" in text
    assert main(["index", "info", "--index", str(built), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 8 and summary["segments"] == 1 and summary["descriptor_dim"] == 64


def test_rerunning_build_adds_nothing(built, photos, capsys):
    before = (built / "index.json").read_bytes()
    rc = main(["index", "build", "--images", str(photos.lib), "--model", "dtop_tiny", "--out", str(built),
               *BUILD_OPTS])
    out = capsys.readouterr().out
    assert rc == 0
    assert "already an index of this model and settings" in out and "nothing to add (8 image(s)" in out
    assert (built / "index.json").read_bytes() == before


# --------------------------------------------------------------------------------------------------- add


def test_add_extracts_only_new_images(index_copy, photos, capsys, tmp_path):
    seg0 = index_copy / "segments" / "000"
    before = file_states(seg0)
    rc = main(["index", "add", "--index", str(index_copy), "--images", str(photos.listing), *RUN_OPTS])
    out = capsys.readouterr().out
    assert rc == 0
    assert "segment 001: 2 image(s) indexed (2 new), 8 unchanged skipped" in out
    assert "10 searchable image(s) in 2 segment(s)" in out
    assert file_states(seg0) == before  # the old segment is untouched
    index = ImageIndex.open(index_copy)
    assert [s["num_images"] for s in index.segments] == [8, 2]
    seg1 = json.loads((index_copy / "segments" / "001" / "manifest.json").read_text())
    assert seg1["num_images"] == 2 and seg1["complete"]
    assert sorted(Path(p).name for p in seg1_images(index_copy / "segments" / "001")) == [
        "img0_flipped.jpg", "img1_crop_bright.png"
    ]
    queries = [str(p) for p in photos.more_paths]
    data, _ = run_json(capsys, ["search", "--index", str(index_copy), *queries, "--topk", "10", *RUN_OPTS], tmp_path)
    for q, entry in zip(queries, data["queries"]):
        assert entry["results"][0]["path"] == str(Path(q).resolve())
        assert entry["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert len(entry["results"]) == 10  # old and new images are all searched
    # a second add finds nothing new
    assert main(["index", "add", "--index", str(index_copy), "--images", str(photos.listing), *RUN_OPTS]) == 0
    assert "nothing to add (10 image(s) already indexed" in capsys.readouterr().out


def seg1_images(store_dir: Path) -> list[str]:
    return (store_dir / "images.txt").read_text().splitlines()


def test_modified_image_is_reindexed_and_replaces_the_old_one(tmp_path, tiny_model):
    rng = np.random.default_rng(3)
    folder = tmp_path / "pics"
    folder.mkdir()
    paths = []
    for i in range(3):
        paths.append(folder / f"p{i}.png")
        texture(rng, 80, 64).save(paths[-1])
    settings = ExtractSettings(image_size=64, scales=[1.0])
    index, report = build_image_index(tmp_path / "idx", paths, tiny_model, settings, num_workers=0, progress=False)
    assert report.segment == 0 and len(report.new) == 3 and report.extracted == 3
    texture(rng, 64, 80).save(paths[1])  # new content, new size
    st = paths[1].stat()
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    report = index.add(paths, num_workers=0, progress=False)
    assert report.segment == 1 and report.new == [] and report.modified == [str(paths[1].resolve())]
    assert report.unchanged == 2
    assert len(index) == 3 and index.summary()["superseded"] == 1
    result = index.query([paths[1]], topk=3)[0]
    assert result.paths[0] == str(paths[1].resolve()) and result.scores[0] == pytest.approx(1.0, abs=1e-4)
    assert len(result.paths) == 3 and len(set(result.paths)) == 3  # the old version is not searched


def test_unreadable_images_are_skipped_and_reported(tmp_path, capsys):
    rng = np.random.default_rng(5)
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(2):
        texture(rng, 72, 72).save(folder / f"ok{i}.jpg")
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    out = tmp_path / "mixed.index"
    rc = main(["index", "build", "--images", str(folder), "--model", "dtop_tiny", "--out", str(out), *BUILD_OPTS])
    text = capsys.readouterr().out
    assert rc == 0
    assert "2 unreadable image(s) skipped" in text and "broken.jpg" in text and "empty.png" in text
    assert "2 image(s) indexed (4 new)" in text and "2 searchable image(s)" in text
    assert main(["index", "add", "--index", str(out), "--images", str(folder), *RUN_OPTS]) == 0
    assert "nothing to add (4 image(s)" in capsys.readouterr().out  # unchanged failures are not retried
    texture(rng, 72, 72).save(folder / "broken.jpg")  # fixed: re-indexed
    assert main(["index", "add", "--index", str(out), "--images", str(folder), *RUN_OPTS]) == 0
    text = capsys.readouterr().out
    assert "1 image(s) indexed (0 new, 1 modified)" in text and "3 searchable image(s)" in text


def test_killed_add_leaves_the_index_valid_and_resumes(index_copy, photos, monkeypatch):
    real = index_module.extract_to_store

    def killed(*args, **kwargs):
        real(*args, **kwargs, max_shards=1)
        raise KeyboardInterrupt

    before = (index_copy / "index.json").read_bytes()
    monkeypatch.setattr(index_module, "extract_to_store", killed)
    with pytest.raises(KeyboardInterrupt):
        ImageIndex.open(index_copy).add(photos.more_paths, shard_size=1, num_workers=0, progress=False)
    assert (index_copy / "index.json").read_bytes() == before  # not committed
    index = ImageIndex.open(index_copy)
    assert len(index) == 8 and index.query([photos.lib_paths[2]], topk=1)[0].scores[0] == pytest.approx(1, abs=1e-4)
    marker = index_copy / "segments" / "001" / "shard-00000.done.json"
    assert marker.is_file() and not (index_copy / "segments" / "001" / "shard-00001.done.json").exists()
    stamp = marker.stat().st_mtime_ns
    monkeypatch.setattr(index_module, "extract_to_store", real)
    report = index.add(photos.more_paths, num_workers=0, progress=False)  # shard size comes from the half segment
    assert report.resumed and report.segment == 1 and report.extracted == 2
    assert marker.stat().st_mtime_ns == stamp  # the finished shard was kept
    assert len(ImageIndex.open(index_copy)) == 10


def test_faiss_engine_is_built_and_rebuilt_on_add(photos, tmp_path, capsys):
    out = tmp_path / "faiss.index"
    rc = main(["index", "build", "--images", str(photos.lib), "--model", "dtop_tiny", "--out", str(out),
               "--engine", "faiss", "--factory", "IVF2,Flat", "--search-params", "nprobe=2", *BUILD_OPTS])
    assert rc == 0
    assert "faiss IVF2,Flat, nprobe=2 search" in capsys.readouterr().out
    assert (out / "faiss-0001.index").is_file()
    query = str(photos.lib_paths[3])
    data, _ = run_json(capsys, ["search", "--index", str(out), query, "--topk", "4", *RUN_OPTS], tmp_path)
    assert data["engine"] == "faiss"
    first = data["queries"][0]["results"][0]
    assert first["path"] == str(Path(query).resolve()) and first["score"] == pytest.approx(1.0, abs=1e-4)
    assert main(["index", "add", "--index", str(out), "--images", str(photos.more), *RUN_OPTS]) == 0
    capsys.readouterr()
    meta = json.loads((out / "index.json").read_text())
    assert meta["search"]["file"] == "faiss-0002.index" and meta["search"]["ntotal"] == 10
    assert (out / "faiss-0002.index").is_file() and not (out / "faiss-0001.index").exists()
    exact, _ = run_json(capsys, ["search", "--index", str(out), query, "--exact", "--topk", "10", *RUN_OPTS], tmp_path)
    assert exact["engine"] == "torch" and len(exact["queries"][0]["results"]) == 10


# ---------------------------------------------------------------------------------------------- sheets


def test_search_writes_a_contact_sheet(built, photos, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    queries = [str(photos.lib_paths[0]), str(photos.lib_paths[5])]
    rc = main(["search", "--index", str(built), *queries, "--topk", "3", "--sheet", str(sheet), "--thumb", "64",
               *RUN_OPTS])
    assert rc == 0 and f"wrote {sheet}" in capsys.readouterr().out
    with Image.open(sheet) as img:
        assert img.format == "PNG"
        assert img.size == sheet_size(2, 4, 64)
        assert img.size == (PAD + 4 * (64 + PAD) + SEPARATOR, PAD + 2 * (64 + CAPTION_HEIGHT + PAD))


def test_contact_sheet_handles_missing_images_and_ragged_lists(photos, tmp_path):
    out = tmp_path / "s.png"
    results = [([str(photos.lib_paths[1]), str(tmp_path / "gone.jpg")], [0.9, 0.5]), ([], [])]
    path = contact_sheet([photos.lib_paths[0], photos.lib_paths[2]], results, out, thumb=48)
    assert path == out and Image.open(out).size == sheet_size(2, 3, 48)
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ConfigError, match="one list per query"):
        contact_sheet([photos.lib_paths[0]], results, out)
    with pytest.raises(ConfigError, match="2 paths but 1 scores"):
        contact_sheet([photos.lib_paths[0]], [(["a", "b"], [1.0])], out)


# ---------------------------------------------------------------------------------------------- errors


def test_clear_errors(built, photos, tmp_path, capsys):
    def error(args):
        assert main(args) == 2
        return capsys.readouterr().err

    err = error(["search", "--index", str(tmp_path / "nope"), str(photos.lib_paths[0])])
    assert "index folder not found" in err and "dtop index build" in err
    (tmp_path / "plain").mkdir()
    err = error(["search", "--index", str(tmp_path / "plain"), str(photos.lib_paths[0])])
    assert "is not a dtop image index" in err and "index.json" in err
    err = error(["index", "add", "--index", str(tmp_path / "plain"), "--images", str(photos.lib)])
    assert "is not a dtop image index" in err
    outdated = tmp_path / "outdated"
    shutil.copytree(built, outdated)
    meta = json.loads((outdated / "index.json").read_text())
    (outdated / "index.json").write_text(json.dumps({**meta, "format_version": 0}))
    err = error(["search", "--index", str(outdated), str(photos.lib_paths[0])])
    assert "format version 0; this dtop reads 1" in err and "--overwrite" in err
    err = error(["search", "--index", str(built), str(tmp_path / "missing.jpg"), *RUN_OPTS])
    assert "no query image could be read" in err and "missing.jpg: file not found" in err
    (tmp_path / "garbage.jpg").write_bytes(b"GIF89a but not really")
    err = error(["search", "--index", str(built), str(tmp_path / "garbage.jpg"), *RUN_OPTS])
    assert "no query image could be read" in err and "garbage.jpg" in err
    err = error(["search", "--index", str(built), str(photos.lib_paths[0]), "--topk", "0"])
    assert "--topk must be from 1" in err
    err = error(["search", "--index", str(built), str(photos.lib_paths[0]), "--search-params", "nprobe=4", *RUN_OPTS])
    assert "faiss indexes only" in err
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    plain = str(tmp_path / "plain")
    err = error(["index", "build", "--images", str(photos.lib), "--model", "dtop_tiny", "--out", plain, *BUILD_OPTS])
    assert "not empty and not a dtop index" in err and (tmp_path / "plain" / "notes.txt").exists()
    err = error(["index", "build", "--images", str(photos.lib), "--model", "dtop_tiny", "--out", str(built),
                 "--image-size", "96", "--workers", "0", "--no-progress"])
    assert "another model or other settings" in err and "image_size" in err and "--overwrite" in err
    err = error(["index", "build", "--images", str(photos.lib), "--model", "dtop_tiny", "--out", str(tmp_path / "f"),
                 "--factory", "IVF4,Flat", *BUILD_OPTS])
    assert "torch engine is exact" in err


def test_empty_index_replace_and_overwrite(tmp_path, tiny_model, photos):
    root = tmp_path / "idx"
    first, other = ExtractSettings(image_size=64, scales=[1.0]), ExtractSettings(image_size=64, scales=[1.0, 0.5])
    index = ImageIndex.create(root, tiny_model, first)
    with pytest.raises(DataError, match="holds no searchable images yet"):
        index.query([photos.lib_paths[0]])
    replaced = ImageIndex.create(root, tiny_model, other)  # no segment yet: simply replaced
    assert not replaced.reopened and ImageIndex.open(root).settings.scales == [1.0, 0.5]
    replaced.add(photos.lib_paths[:2], num_workers=0, progress=False)
    with pytest.raises(DataError, match="scales.*--overwrite"):
        ImageIndex.create(root, tiny_model, first)
    assert ImageIndex.create(root, tiny_model, other).reopened
    fresh = ImageIndex.create(root, tiny_model, first, overwrite=True)
    assert not (root / "segments").exists() and ImageIndex.open(root).settings.scales == [1.0]
    assert fresh.segments == [] and fresh.summary()["images"] == 0


def test_faiss_ivf_with_too_few_images_fails_before_extracting(tmp_path, tiny_model, photos):
    index = ImageIndex.create(tmp_path / "ivf", tiny_model, ExtractSettings(image_size=64, scales=[1.0]),
                              engine="faiss", factory="IVF16,Flat")
    with pytest.raises(ConfigError, match="needs at least 16 images"):
        index.add(photos.lib_paths, num_workers=0, progress=False)
    assert not (tmp_path / "ivf" / "segments").exists()


def test_engine_checks_and_missing_faiss(tmp_path, tiny_model, monkeypatch):
    with pytest.raises(ConfigError, match="unknown search engine 'annoy'"):
        ImageIndex.create(tmp_path / "a", tiny_model, engine="annoy")
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install faiss-cpu.*engine='torch'"):
        ImageIndex.create(tmp_path / "b", tiny_model, engine="faiss")
    assert not (tmp_path / "b").exists()


def test_a_second_writer_fails_fast(index_copy, photos):
    before = (index_copy / "index.json").read_bytes()
    with file_lock(index_copy / ".lock"):  # another writer (flock: one holder per open file)
        with pytest.raises(DataError, match="another dtop process is building or adding to the index"):
            ImageIndex.open(index_copy).add(photos.more_paths, num_workers=0, progress=False)
    assert (index_copy / "index.json").read_bytes() == before
