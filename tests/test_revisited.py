"""Revisited-format datasets: query crop guard, whole database images, missing files, R1M list."""

from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dtop.data.gnd import GroundTruth, load_gnd
from dtop.data.images import load_image
from dtop.data.revisited import (
    R1M_SIZE,
    RevisitedDataset,
    image_file_name,
    load_r1m_list,
    read_image_names,
)
from dtop.errors import DataError

REAL = Path("/work/shared/data/revisitop")
ROXF = REAL / "gnd_roxford5k.pkl"
needs_real = pytest.mark.skipif(not ROXF.is_file(), reason="real ground-truth files not available")


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x % 256, y % 256, (x // 256 + 64 * (y // 256) + seed * 17) % 256], -1)
    arr = arr + rng.integers(0, 3, arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def real_gnd() -> GroundTruth:
    if not ROXF.is_file():
        pytest.skip("real ground-truth files not available")
    return load_gnd(ROXF)


@pytest.fixture
def mini(tmp_path, real_gnd) -> Path:
    """A small user dataset in the revisited format, built from real ROxford5k queries and bbx.

    The database holds 4 real database images *and* the 3 query images (as in a user's dataset
    where queries are also database images), so the guard can check their database copies stay
    whole.
    """
    q = [0, 1, 2]
    qnames = [real_gnd.qimlist[i] for i in q]
    dbnames = real_gnd.imlist[:4] + qnames
    gnd = []
    for i in q:
        e = real_gnd.gnd[i]
        gnd.append({"bbx": list(e["bbx"]), "easy": [0, 1, 4 + i], "hard": [2], "junk": [3]})
    folder = tmp_path / "mini"
    (folder / "jpg").mkdir(parents=True)
    data = {"imlist": dbnames, "qimlist": qnames, "gnd": gnd}
    (folder / "gnd_mini.pkl").write_bytes(pickle.dumps(data, protocol=3))
    for k, name in enumerate(dict.fromkeys(dbnames + qnames)):
        bbx = next((g["bbx"] for n, g in zip(qnames, gnd) if n == name), None)
        w, h = (1024, 768)
        if bbx is not None and (bbx[2] > w or bbx[3] > h):
            w, h = 768, 1024
        _image(w, h, k).save(folder / "jpg" / f"{name}.jpg", quality=90)
    return folder


def test_queries_are_cropped_database_is_whole(mini, real_gnd):
    ds = RevisitedDataset(None, mini)
    assert ds.n_queries == 3 and ds.n_database == 7
    assert ds.query_bbxs == [tuple(real_gnd.gnd[i]["bbx"]) for i in range(3)]
    qds = ds.query_dataset()
    dbds = ds.database_dataset()
    for i, path in enumerate(ds.query_paths):
        img, idx = qds[i]
        assert idx == i
        with Image.open(path) as im:
            whole = im.convert("RGB")
        reference = whole.crop(ds.query_bbxs[i])  # the revisitop example code
        assert img.size == reference.size != whole.size
        assert (np.asarray(img) == np.asarray(reference)).all()
        j = ds.database_paths.index(path)  # the same image in the database ...
        db_img, db_idx = dbds[j]
        assert db_idx == j and db_img.size == whole.size  # ... stays whole
        assert (np.asarray(db_img) == np.asarray(whole)).all()
    assert all(dbds.bbx(j) is None for j in range(len(dbds)))


def test_float_bbx_rounding_matches_pil(mini, real_gnd):
    ds = RevisitedDataset(None, mini)
    bbx = ds.query_bbxs[0]
    assert bbx == (136.5, 34.1, 648.5, 955.7)
    img, _ = ds.query_dataset()[0]
    # PIL rounds each coordinate half to even: 136.5 → 136, 648.5 → 648, 34.1 → 34, 955.7 → 956.
    assert img.size == (648 - 136, 956 - 34)


def test_uncropped_queries_option(mini):
    ds = RevisitedDataset(None, mini)
    img, _ = ds.query_dataset(crop=False)[0]
    assert img.size == load_image(ds.query_paths[0]).size


def test_dataset_from_gnd_file_json_and_relative_path(mini):
    gt = load_gnd(mini / "gnd_mini.pkl")
    (mini / "gnd_mini.pkl").unlink()
    gt.save_json(mini / "gnd_mini.json")
    ds = RevisitedDataset(mini.parent, "mini")  # relative to root
    assert ds.gnd_path.name == "gnd_mini.json" and ds.n_queries == 3
    ds2 = RevisitedDataset(None, mini / "gnd_mini.json")
    assert ds2.database_paths == ds.database_paths


def test_missing_images_are_listed(mini):
    paths = sorted((mini / "jpg").iterdir())
    for p in paths[:2]:
        p.unlink()
    with pytest.raises(DataError) as info:
        RevisitedDataset(None, mini)
    msg = str(info.value)
    assert "2 of 7 images are missing" in msg and paths[0].name in msg
    assert RevisitedDataset(None, mini, check_images=False).n_database == 7


def test_missing_gnd_and_ambiguous_gnd(tmp_path, mini):
    with pytest.raises(DataError, match="dtop download roxford5k"):
        RevisitedDataset(tmp_path, "roxford5k")
    with pytest.raises(DataError, match="not found"):
        RevisitedDataset(None, tmp_path / "nowhere")
    shutil.copy(mini / "gnd_mini.pkl", mini / "gnd_other.pkl")
    RevisitedDataset(None, mini)  # gnd_<folder name> wins
    (mini / "gnd_mini.pkl").rename(mini / "gnd_third.pkl")
    with pytest.raises(DataError, match="several ground-truth files"):
        RevisitedDataset(None, mini)


@needs_real
def test_official_benchmark_layout(tmp_path):
    name = "roxford5k"  # rparis6k goes through the same code in test_download's end-to-end test
    folder = tmp_path / name
    (folder / "jpg").mkdir(parents=True)
    shutil.copy(REAL / f"gnd_{name}.pkl", folder)
    gt = load_gnd(folder / f"gnd_{name}.pkl")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG")
    names = gt.imlist + gt.qimlist
    for n in names[:-3]:
        (folder / "jpg" / f"{n}.jpg").write_bytes(buf.getvalue())
    with pytest.raises(DataError) as info:
        RevisitedDataset(tmp_path, name)
    msg = str(info.value)
    assert f"3 of {len(names)} images are missing" in msg
    assert f"dtop download {name} --root {tmp_path}" in msg and f"{names[-1]}.jpg" in msg
    for n in names[-3:]:
        (folder / "jpg" / f"{n}.jpg").write_bytes(buf.getvalue())
    ds = RevisitedDataset(tmp_path, name.upper())
    assert (ds.n_queries, ds.n_database) == (70, 4993)
    assert ds.query_paths[0] == folder / "jpg" / f"{gt.qimlist[0]}.jpg"
    assert ds.query_bbxs[5] == tuple(gt.gnd[5]["bbx"])
    assert ds.query_dataset().bbx(5) == tuple(gt.gnd[5]["bbx"])
    assert ds.database_dataset().bbx(0) is None


def test_image_file_names():
    assert image_file_name("all_souls_000013") == "all_souls_000013.jpg"
    assert image_file_name("x/y.JPG") == "x/y.JPG"
    assert image_file_name("photo.v2") == "photo.v2.jpg"


def test_r1m_list(tmp_path):
    folder = tmp_path / "revisitop1m"
    (folder / "jpg" / "a").mkdir(parents=True)
    (folder / "revisitop1m.txt").write_text("a/one.jpg\n\ntwo\nthree.jpg\n")
    (folder / "jpg" / "a" / "one.jpg").write_bytes(b"x")
    (folder / "jpg" / "two.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match=f"{R1M_SIZE:,}"):
        load_r1m_list(tmp_path)
    paths = load_r1m_list(tmp_path, check_count=False)
    assert paths == [folder / "jpg" / "a" / "one.jpg", folder / "jpg" / "two.jpg", folder / "jpg" / "three.jpg"]
    assert load_r1m_list(folder, check_count=False) == paths  # the R1M folder itself
    with pytest.raises(DataError, match="1 of 3 images are missing.*three.jpg"):
        load_r1m_list(tmp_path, check_count=False, check_files=True)
    with pytest.raises(DataError, match="dtop download revisitop1m"):
        load_r1m_list(tmp_path / "empty")
    (folder / "revisitop1m.txt").write_text("../etc/passwd\n")
    with pytest.raises(DataError, match="not a relative image path"):
        read_image_names(folder / "revisitop1m.txt")
