"""Training sets: loaders for every format, the sizes cache, the training dataset, ``dtop data check``
and the SfM-120k / GLDv2-clean downloads (against a local server on 127.0.0.1)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import dtop.data.images
from dtop.cli.main import build_parser
from dtop.cli.main import main as cli_main
from dtop.data import download as dl
from dtop.data import training as T
from dtop.data.download import CATALOGUE, ChecksumError, DownloadError, Resource, download_dataset, parse_md5_file
from dtop.data.images import read_image_sizes
from dtop.data.sampler import GroupSizeBatchSampler
from dtop.data.training import (
    TrainDataset,
    TrainingSet,
    collate_skip_bad,
    load_csv,
    load_gldv1,
    load_gldv2_clean,
    load_image_folder,
    load_sfm120k,
)
from dtop.errors import DataError

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _jpeg_bytes(size=(40, 30), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _write_jpeg(path: Path, size=(40, 30), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_jpeg_bytes(size, color))
    return path


# ------------------------------------------------------------------------------------ fixtures


def _hexid(k: int, n: int = 16) -> str:
    return hashlib.md5(str(k).encode()).hexdigest()[:n]


@pytest.fixture
def sfm_root(tmp_path):
    root = tmp_path / "retrieval-SfM-120k"
    cids = [f"{_hexid(k, 12)}" for k in range(12)]
    clusters = [100, 100, 100, 7, 7, 7, 7, 42, 42, 42, 5, 5]
    for k, cid in enumerate(cids):
        _write_jpeg(root / "ims" / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid, size=(40 + k, 30))
    db = {
        "train": {"cids": cids[:10], "cluster": clusters[:10], "qidxs": [0, 3, 7], "pidxs": [1, 4, 8]},
        "val": {"cids": cids[10:], "cluster": clusters[10:], "qidxs": [10], "pidxs": [11]},
    }
    db["val"]["qidxs"], db["val"]["pidxs"] = [0], [1]
    (root / "retrieval-SfM-120k.pkl").write_bytes(pickle.dumps(db, protocol=2))
    return root


@pytest.fixture
def gldv2_root(tmp_path):
    root = tmp_path / "gldv2"
    rows = {17: [_hexid(k) for k in range(0, 4)], 3: [_hexid(k) for k in range(4, 6)],
            99: [_hexid(k) for k in range(6, 9)]}
    lines = ["landmark_id,images"]
    for lm, ids in rows.items():
        lines.append(f"{lm},{' '.join(ids)}")
        for i in ids:
            _write_jpeg(root / "train" / i[0] / i[1] / i[2] / f"{i}.jpg", size=(30, 40))
    (root / "train_clean.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def folder_root(tmp_path):
    root = tmp_path / "mine"
    for cls, n in (("cat", 3), ("dog", 2), ("emu", 1)):
        for k in range(n):
            _write_jpeg(root / cls / f"{k}.jpg", size=(48, 32))
    _write_jpeg(root / "dog" / "sub" / "deep.png", size=(32, 48))
    _write_jpeg(root / "loose.jpg")  # no class: ignored
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


# ------------------------------------------------------------------------------------- loaders


def test_sfm120k(sfm_root):
    ts = load_sfm120k(sfm_root)
    assert ts.name == "sfm120k-train" and len(ts) == 10
    assert ts.class_names == ["7", "42", "100"] and ts.num_classes == 3  # numeric order
    assert ts.labels.tolist() == [2, 2, 2, 0, 0, 0, 0, 1, 1, 1]
    assert ts.labels.dtype == np.int64
    cid = Path(ts.paths[0]).name
    assert ts.paths[0] == str((sfm_root / "ims" / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid).absolute())
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in ts.paths)
    assert ts.extras["qidxs"].tolist() == [0, 3, 7] and ts.extras["pidxs"].tolist() == [1, 4, 8]
    val = load_sfm120k(sfm_root, split="val")
    assert len(val) == 2 and val.class_names == ["5"]
    with pytest.raises(DataError, match="no split 'test'.*train, val"):
        load_sfm120k(sfm_root, split="test")
    # min_images_per_class drops cluster 100 (3 images) and 42 (3), keeps 7 (4); tuples follow.
    small = load_sfm120k(sfm_root, min_images_per_class=4)
    assert small.class_names == ["7"] and len(small) == 4 and small.labels.tolist() == [0, 0, 0, 0]
    assert small.extras["qidxs"].tolist() == [0] and small.extras["pidxs"].tolist() == [1]


def test_sfm120k_pickle_with_numpy_arrays_and_a_malicious_one(sfm_root):
    pkl = sfm_root / "retrieval-SfM-120k.pkl"
    db = pickle.loads(pkl.read_bytes())
    db["train"]["cluster"] = np.asarray(db["train"]["cluster"], dtype=np.int32)
    db["train"]["qidxs"] = np.asarray(db["train"]["qidxs"])
    pkl.write_bytes(pickle.dumps(db))
    assert load_sfm120k(sfm_root).num_classes == 3

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    pkl.write_bytes(pickle.dumps({"train": Evil()}))
    with pytest.raises(DataError, match="refused"):
        load_sfm120k(sfm_root)


def test_sfm120k_bad_inputs(tmp_path, sfm_root):
    with pytest.raises(DataError, match="SfM-120k folder not found.*dtop download sfm120k"):
        load_sfm120k(tmp_path / "nope")
    pkl = sfm_root / "retrieval-SfM-120k.pkl"
    pkl.write_bytes(pickle.dumps({"train": {"cids": ["abcdefgh"], "cluster": [1, 2]}}))
    with pytest.raises(DataError, match="1 cids but 2 cluster"):
        load_sfm120k(sfm_root)
    pkl.write_bytes(pickle.dumps({"train": {"cids": ["abcdefgh"]}}))
    with pytest.raises(DataError, match="lacks \\['cluster'\\]"):
        load_sfm120k(sfm_root)
    pkl.write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="not a readable dataset pickle"):
        load_sfm120k(sfm_root)


def test_gldv2_clean_and_exclusion(gldv2_root, tmp_path):
    ts = load_gldv2_clean(gldv2_root)
    assert len(ts) == 9 and ts.class_names == ["3", "17", "99"]
    first = _hexid(0)
    assert ts.paths[0] == str(gldv2_root.absolute() / "train" / first[0] / first[1] / first[2] / f"{first}.jpg")
    assert ts.labels.tolist() == [1] * 4 + [0] * 2 + [2] * 3
    excl = tmp_path / "overlap.txt"
    excl.write_text("landmark_id\n17  # shared with ROxf\n12345\n")
    ex = load_gldv2_clean(gldv2_root, exclude=excl)
    assert ex.class_names == ["3", "99"] and len(ex) == 5 and ex.labels.tolist() == [0, 0, 1, 1, 1]
    assert ex.extras["excluded_landmarks"] == 1 and ex.extras["excluded_images"] == 4
    assert ex.extras["exclude_not_found"] == 1
    assert all(first not in p for p in ex.paths)
    bad = tmp_path / "bad.txt"
    bad.write_text("17\nseventeen\n")
    with pytest.raises(DataError, match="bad.txt:2.*not a landmark id"):
        load_gldv2_clean(gldv2_root, exclude=bad)
    with pytest.raises(DataError, match="exclusion list not found"):
        load_gldv2_clean(gldv2_root, exclude=tmp_path / "missing.txt")
    assert load_gldv2_clean(gldv2_root, min_images_per_class=3).class_names == ["17", "99"]


def test_gldv2_bad_inputs(gldv2_root, tmp_path):
    (gldv2_root / "train_clean.csv").write_text("landmark,image_ids\n1,abc\n")
    with pytest.raises(DataError, match="landmark_id,images; found landmark, image_ids"):
        load_gldv2_clean(gldv2_root)
    (gldv2_root / "train_clean.csv").write_text("landmark_id,images\n")
    with pytest.raises(DataError, match="no images listed"):
        load_gldv2_clean(gldv2_root)
    empty = tmp_path / "empty_gld"
    empty.mkdir()
    (empty / "train_clean.csv").write_text("landmark_id,images\n1,abcd\n")
    with pytest.raises(DataError, match="GLDv2 image folder not found"):
        load_gldv2_clean(empty)


def test_gldv1_flat_layout_skips_missing(tmp_path):
    root = tmp_path / "gldv1"
    rows = ['"id","url","landmark_id"']
    for k in range(8):
        i = _hexid(k)
        rows.append(f'"{i}","http://example.invalid/{k}.jpg","{k % 3}"')
        if k != 5:  # one dead URL: never downloaded
            _write_jpeg(root / "train" / f"{i}.jpg")
    rows.append(f'"{_hexid(99)}","None","None"')
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    ts = load_gldv1(root)
    assert len(ts) == 7 and ts.extras["missing"] == 1 and ts.extras["unlabelled"] == 1
    assert ts.extras["layout"] == "flat" and ts.class_names == ["0", "1", "2"]
    assert all(os.path.isfile(p) for p in ts.paths)
    assert len(load_gldv1(root, skip_missing=False)) == 8


def test_gldv1_nested_layout_is_detected(tmp_path):
    root = tmp_path / "gldv1"
    rows = ["id,url,landmark_id"]
    for k in range(4):
        i = _hexid(k)
        rows.append(f"{i},http://x/{k},{k}")
        _write_jpeg(root / "train" / i[0] / i[1] / i[2] / f"{i}.jpg")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    ts = load_gldv1(root)
    assert ts.extras["layout"] == "nested" and len(ts) == 4 and ts.extras["missing"] == 0


def test_image_folder(folder_root, tmp_path):
    ts = load_image_folder(folder_root)
    assert ts.class_names == ["cat", "dog", "emu"]
    assert ts.images_per_class().tolist() == [3, 3, 1]
    assert any(p.endswith("deep.png") for p in ts.paths) and not any("loose" in p for p in ts.paths)
    assert ts.summary()["images_per_class"] == {"min": 1, "median": 3.0, "max": 3}
    two = load_image_folder(folder_root, min_images_per_class=2)
    assert two.class_names == ["cat", "dog"] and two.num_classes == 2 and len(two) == 6
    assert two.extras["dropped_classes"] == 1
    with pytest.raises(DataError, match="no class has at least 10"):
        load_image_folder(folder_root, min_images_per_class=10)
    with pytest.raises(DataError, match="image folder not found"):
        load_image_folder(tmp_path / "missing")
    flat = tmp_path / "flat"
    _write_jpeg(flat / "a.jpg")
    with pytest.raises(DataError, match="no class folders"):
        load_image_folder(flat)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="hold no images"):
        load_image_folder(tmp_path / "empty")


def test_csv(tmp_path):
    _write_jpeg(tmp_path / "imgs" / "a.jpg")
    _write_jpeg(tmp_path / "imgs" / "b.jpg")
    absolute = _write_jpeg(tmp_path / "elsewhere" / "c.jpg")
    csv_file = tmp_path / "lists" / "train.csv"
    csv_file.parent.mkdir()
    csv_file.write_text(f"path,label,extra\n../imgs/a.jpg,eiffel,1\n../imgs/b.jpg,louvre,2\n{absolute},eiffel,3\n")
    ts = load_csv(csv_file)
    assert ts.class_names == ["eiffel", "louvre"] and ts.labels.tolist() == [0, 1, 0]
    assert ts.paths[0] == str((csv_file.parent / "../imgs/a.jpg").absolute())
    assert all(os.path.isfile(p) for p in ts.paths)
    with pytest.raises(DataError, match="no label column 'landmark'; the columns are: path, label, extra"):
        load_csv(csv_file, label_column="landmark")
    tsv = tmp_path / "t.tsv"
    tsv.write_text(f"file\tcls\n{absolute}\t5\n{absolute}\t10\n")
    t2 = load_csv(tsv, path_column="file", label_column="cls")
    assert t2.class_names == ["5", "10"]  # integer labels sort numerically
    (tmp_path / "empty.csv").write_text("path,label\n")
    with pytest.raises(DataError, match="lists no images"):
        load_csv(tmp_path / "empty.csv")
    (tmp_path / "hole.csv").write_text("path,label\na.jpg,\n")
    with pytest.raises(DataError, match="hole.csv:2: empty label"):
        load_csv(tmp_path / "hole.csv")
    with pytest.raises(DataError, match="training CSV not found"):
        load_csv(tmp_path / "nope.csv")


def test_training_set_validation():
    with pytest.raises(DataError, match="empty"):
        TrainingSet(paths=[], labels=np.zeros(0), num_classes=0, class_names=[])
    with pytest.raises(DataError, match="labels must lie"):
        TrainingSet(paths=["/a"], labels=[3], num_classes=2, class_names=["x", "y"])


# --------------------------------------------------------------------------------- sizes cache


def test_aspect_ratios_are_read_once_and_cached(folder_root, monkeypatch):
    ts = load_image_folder(folder_root)
    ratios = ts.aspect_ratios(progress=False)
    deep = [i for i, p in enumerate(ts.paths) if p.endswith("deep.png")][0]
    assert ratios[deep] == pytest.approx(32 / 48) and ratios[0] == pytest.approx(48 / 32)
    cache = ts.cache_path()
    assert cache == folder_root.absolute() / "mine.sizes.npy" and cache.is_file()
    table = np.load(cache)
    assert table.shape == (len(ts) + 1, 2) and table[0, 1] == len(ts)

    def boom(path):
        raise AssertionError("headers must come from the cache")

    monkeypatch.setattr(dtop.data.images, "_read_one_size", boom)
    again = load_image_folder(folder_root)
    assert np.array_equal(again.aspect_ratios(progress=False), ratios)
    # A filtered set shares the full set's cache.
    sub = load_image_folder(folder_root, min_images_per_class=2)
    assert np.array_equal(sub.aspect_ratios(progress=False), ratios[sub.base_indices])
    monkeypatch.undo()
    # Another path list (an image added) does not use the stale cache.
    _write_jpeg(folder_root / "emu" / "9.jpg", size=(100, 20))
    grown = load_image_folder(folder_root)
    assert grown.aspect_ratios(progress=False).max() == pytest.approx(5.0)


def test_unreadable_headers_count_as_square(tmp_path):
    _write_jpeg(tmp_path / "c" / "ok.jpg", size=(60, 30))
    (tmp_path / "c" / "bad.jpg").write_bytes(b"not a jpeg")
    ts = load_image_folder(tmp_path)
    assert sorted(ts.aspect_ratios(cache=False, progress=False).tolist()) == [1.0, 2.0]


def test_threaded_header_reading(tmp_path):
    paths = [str(_write_jpeg(tmp_path / f"{k}.jpg", size=(16 + k, 16))) for k in range(80)]
    sizes = read_image_sizes(paths, workers=4, progress=False)
    assert sizes[:, 0].tolist() == [16 + k for k in range(80)] and set(sizes[:, 1].tolist()) == {16}


# ------------------------------------------------------------------------------- TrainDataset


def test_train_dataset_sizes_and_normalisation(folder_root):
    ts = load_image_folder(folder_root)
    plain = TrainDataset(ts, augment=False, mean=MEAN, std=STD)
    x, label = plain[(0, (96, 144))]
    assert x.shape == (3, 96, 144) and x.dtype == torch.float32 and label == 0
    # a uniform red image stays red: (200/255 - .5)/.5 for R
    assert x[0].mean().item() == pytest.approx(200 / 255 * 2 - 1, abs=0.03)
    aug = TrainDataset(ts, augment=True, mean=MEAN, std=STD)
    torch.manual_seed(0)
    a = aug[(3, (64, 48))][0]
    torch.manual_seed(0)
    b = aug[(3, (64, 48))][0]
    assert a.shape == (3, 64, 48) and torch.equal(a, b)  # reproducible under a seeded torch RNG
    with pytest.raises(DataError, match="index, \\(height, width\\)"):
        plain[0]


def test_unreadable_training_image_is_skipped_and_counted(folder_root, caplog):
    (folder_root / "cat" / "1.jpg").write_bytes(_jpeg_bytes()[:40])  # truncated
    ts = load_image_folder(folder_root)
    (folder_root / "dog" / "0.jpg").unlink()  # deleted after listing: missing
    ds = TrainDataset(ts, augment=True, mean=MEAN, std=STD)
    sampler = GroupSizeBatchSampler(ts.aspect_ratios(progress=False), batch_size=2, train_size=64,
                                    drop_last=False)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_skip_bad, num_workers=0)
    skipped, seen = 0, 0
    with caplog.at_level("WARNING"):
        for images, labels, n_skipped in loader:
            skipped += n_skipped
            if images is not None:
                assert images.shape[0] == labels.shape[0] and max(images.shape[2:]) == 64
                seen += images.shape[0]
    assert skipped == 2 and seen == len(ts) - 2
    assert "skipping training image" in caplog.text
    assert collate_skip_bad([None, None]) == (None, None, 2)


# ---------------------------------------------------------------------------- dtop data check


def test_data_check_cli(folder_root, tmp_path, capsys):
    assert cli_main(["data", "check", str(folder_root), "--format", "folder", "--workers", "1",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "images:  7" in out and "classes: 3" in out and "min 1, median 3, max 3" in out and "OK" in out
    (folder_root / "cat" / "1.jpg").write_bytes(b"\xff\xd8\xff garbage")
    report = tmp_path / "report.json"
    rc = cli_main(["data", "check", str(folder_root), "--format", "folder", "--workers", "2", "--json",
                   str(report), "--no-progress"])
    assert rc == 1
    r = json.loads(report.read_text())
    assert r["images"] == 7 and r["missing"] == 0 and r["unreadable"] == 1 and not r["ok"]
    assert r["unreadable_images"][0]["path"].endswith("1.jpg") and "not an image" in r["unreadable_images"][0]["reason"]
    # without decoding only presence is checked
    assert cli_main(["data", "check", str(folder_root), "--format", "folder", "--no-decode", "--workers", "1",
                     "--no-progress"]) == 0
    # bad input: exit status 2 with a message
    assert cli_main(["data", "check", str(tmp_path / "nope"), "--format", "folder", "--no-progress"]) == 2
    assert "image folder not found" in capsys.readouterr().err


def test_data_check_csv_json_on_stdout(tmp_path, capsys):
    _write_jpeg(tmp_path / "a.jpg")
    (tmp_path / "t.csv").write_text("image,landmark\na.jpg,1\nb.jpg,2\n")
    rc = cli_main(["data", "check", str(tmp_path / "t.csv"), "--format", "csv", "--path-column", "image",
                   "--label-column", "landmark", "--workers", "1", "--json", "-", "--no-progress"])
    assert rc == 1
    r = json.loads(capsys.readouterr().out)
    assert r["format"] == "csv" and r["classes"] == 2 and r["missing"] == 1
    rc = cli_main(["data", "check", str(tmp_path / "t.csv"), "--format", "csv", "--label-column", "cls",
                   "--no-progress"])
    assert rc == 2 and "the columns are: image, landmark" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- downloads


class _Server:
    """Serves in-memory files on 127.0.0.1 (Range-capable); logs every request path."""

    def __init__(self) -> None:
        files: dict[str, bytes] = {}
        log: list[str] = []
        self.files, self.log = files, log

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                log.append(self.path)
                data = files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _tar(members: dict[str, bytes], gz: bool) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz" if gz else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


FAST = dict(progress=False, backoff=0.0, timeout=10)


def test_parse_md5_file():
    h = "0123456789abcdef0123456789abcdef"
    assert parse_md5_file(f"{h}  images_000.tar\n", "images_000.tar") == h
    assert parse_md5_file(f"{h.upper()} *images_000.tar\n", "images_000.tar") == h
    assert parse_md5_file(f"{h}\n", "images_000.tar") == h
    with pytest.raises(DownloadError, match="not 'images_001.tar'"):
        parse_md5_file(f"{h}  images_000.tar\n", "images_001.tar")
    with pytest.raises(DownloadError, match="no md5"):
        parse_md5_file("<html>not found</html>", "images_000.tar")


def test_catalogue_entries_for_training_sets():
    sfm = CATALOGUE["sfm120k"]
    assert sfm.directory == "retrieval-SfM-120k" and sfm.image_dir == "ims"
    assert sfm.resource("sfm-db").url == "http://cmp.felk.cvut.cz/cnnimageretrieval/data/train/dbs/retrieval-SfM-120k.pkl"
    assert sfm.archives[0].url == "http://cmp.felk.cvut.cz/cnnimageretrieval/data/train/ims/ims.tar.gz"
    gld = CATALOGUE["gldv2-clean"]
    assert gld.directory == "gldv2" and gld.image_dir == "train" and gld.expected_images == 1_580_470
    assert len(gld.archives) == 500
    assert gld.archives[0].url == "https://s3.amazonaws.com/google-landmark/train/images_000.tar"
    assert gld.archives[-1].md5_url == "https://s3.amazonaws.com/google-landmark/md5sum/train/md5.images_499.txt"
    assert gld.resource("gldv2-csv").url == "https://s3.amazonaws.com/google-landmark/metadata/train_clean.csv"
    choices = build_parser()._subparsers._group_actions[0].choices["download"]
    assert "sfm120k" in choices.format_help() and "gldv2-clean" in choices.format_help()


def test_download_sfm120k_through_the_cli(server, tmp_path, sfm_root):
    db = (sfm_root / "retrieval-SfM-120k.pkl").read_bytes()
    members = {}
    for p in sorted((sfm_root / "ims").rglob("*")):
        if p.is_file():
            members["ims/" + p.relative_to(sfm_root / "ims").as_posix()] = p.read_bytes()
    members["ims/zz/yy/xx/not-in-the-db"] = b"x"
    server.files["/sfm120k/retrieval-SfM-120k.pkl"] = db
    server.files["/sfm120k/ims.tar.gz"] = _tar(members, gz=True)
    root = tmp_path / "data"
    assert cli_main(["download", "sfm120k", "--root", str(root), "--base-url", server.url, "--no-progress"]) == 0
    ts = load_sfm120k(root / "retrieval-SfM-120k")
    assert len(ts) == 10 and all(os.path.isfile(p) for p in ts.paths)
    assert not (root / "retrieval-SfM-120k" / "ims" / "zz").exists()  # not listed: not extracted
    n_requests = len(server.log)
    assert cli_main(["download", "sfm120k", "--root", str(root), "--base-url", server.url, "--no-progress"]) == 0
    assert len(server.log) == n_requests  # idempotent: nothing fetched again


def _gld_source(n_archives: int) -> dl.DatasetSource:
    real = CATALOGUE["gldv2-clean"]
    index = real.resource("gldv2-csv")
    archives = real.archives[:n_archives]
    return dataclasses.replace(real, resources=(index, *archives), expected_images=None)


def test_download_gldv2_clean_md5_verified(server, tmp_path, gldv2_root, monkeypatch):
    csv_bytes = (gldv2_root / "train_clean.csv").read_bytes()
    images = {p.relative_to(gldv2_root / "train").as_posix(): p.read_bytes()
              for p in (gldv2_root / "train").rglob("*.jpg")}
    names = sorted(images)
    tars = [_tar({n: images[n] for n in names[:5]} | {"f/f/f/fff_not_clean.jpg": b"x"}, gz=False),
            _tar({n: images[n] for n in names[5:]}, gz=False)]
    server.files["/gldv2-clean/train_clean.csv"] = csv_bytes
    for k, data in enumerate(tars):
        server.files[f"/gldv2-clean/images_00{k}.tar"] = data
        server.files[f"/gldv2-clean/md5.images_00{k}.txt"] = \
            f"{hashlib.md5(data).hexdigest()}  images_00{k}.tar\n".encode()
    monkeypatch.setitem(CATALOGUE, "gldv2-clean", _gld_source(2))
    root = tmp_path / "data"
    assert cli_main(["download", "gldv2-clean", "--root", str(root), "--base-url", server.url,
                     "--no-progress"]) == 0
    assert "/gldv2-clean/md5.images_000.txt" in server.log and "/gldv2-clean/md5.images_001.txt" in server.log
    ts = load_gldv2_clean(root / "gldv2")
    assert len(ts) == 9 and all(os.path.isfile(p) for p in ts.paths)
    assert not (root / "gldv2" / "train" / "f").exists()
    assert not (root / "gldv2" / ".download").exists()  # archives and md5 files cleaned up

    # A corrupt archive (md5 mismatch) is refused and not kept.
    server.files["/gldv2-clean/md5.images_000.txt"] = b"0" * 32 + b"  images_000.tar\n"
    with pytest.raises(ChecksumError, match="md5 mismatch"):
        download_dataset(_gld_source(2), tmp_path / "again", base_url=server.url, **FAST)
    dl_dir = tmp_path / "again" / "gldv2" / ".download"
    assert not (dl_dir / "images_000.tar").exists() and not (dl_dir / "images_000.tar.part").exists()


def test_download_index_is_validated(server, tmp_path):
    server.files["/gldv2-clean/train_clean.csv"] = b"id,url\n1,2\n"
    src = dataclasses.replace(_gld_source(1), resources=(_gld_source(1).resources[0],))
    with pytest.raises(DownloadError, match="not valid.*landmark_id,images"):
        download_dataset(src, tmp_path, base_url=server.url, **FAST)
    assert not (tmp_path / "gldv2" / "train_clean.csv").exists()


def test_resource_md5_url_on_a_mirror():
    res = CATALOGUE["gldv2-clean"].archives[7]
    md5_res = dl.md5_resource(res)
    assert md5_res is not None and md5_res.filename == "md5.images_007.txt"
    assert dl.resource_url(CATALOGUE["gldv2-clean"], md5_res, "http://127.0.0.1:1/m") == \
        "http://127.0.0.1:1/m/gldv2-clean/md5.images_007.txt"
    assert dl.md5_resource(Resource("a", "http://x/a", "archive")) is None


def test_dataloader_workers_and_load_by_format(folder_root, gldv2_root):
    ts = T.load_training_set("folder", folder_root)
    ds = TrainDataset(ts, augment=True, mean=MEAN, std=STD)
    sampler = GroupSizeBatchSampler(ts.aspect_ratios(progress=False), batch_size=3, train_size=48)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_skip_bad, num_workers=2)
    batches = list(loader)
    assert len(batches) == len(sampler) and all(b[0].shape[0] == 3 and b[2] == 0 for b in batches)
    assert len(T.load_training_set("gldv2-clean", gldv2_root)) == 9
    with pytest.raises(DataError, match="gldv2-clean only"):
        T.load_training_set("folder", folder_root, exclude="x.txt")
    with pytest.raises(DataError, match="unknown training-set format 'coco'"):
        T.load_training_set("coco", folder_root)


def test_data_check_gldv1_reports_dead_urls(tmp_path, capsys):
    root = tmp_path / "gldv1"
    _write_jpeg(root / "train" / "aaa1.jpg")
    (root / "train.csv").write_text("id,url,landmark_id\naaa1,http://x/1,3\nbbb2,http://x/2,3\n")
    assert cli_main(["data", "check", str(root), "--format", "gldv1", "--workers", "1", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "missing files:     1" in out and "dead" in out
