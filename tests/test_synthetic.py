"""The built-in synthetic benchmark: format, ground truth, determinism, idempotence, speed."""

import csv
import hashlib
import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dtop.apps.synthetic import MARKER, generate_benchmark, load_image_meta, render_instance
from dtop.data.gnd import load_gnd
from dtop.data.revisited import RevisitedDataset
from dtop.errors import DataError

SMALL = dict(n_train_instances=4, n_test_instances=3, train_views=2, n_distractors=4, image_size=96)


def tree_digest(*folders: Path) -> dict[str, str]:
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                out[f"{folder.name}/{p.relative_to(folder).as_posix()}"] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The default benchmark (what `dtop demo` uses), generated once, timed."""
    root = tmp_path_factory.mktemp("synthetic")
    start = time.perf_counter()
    info = generate_benchmark(root)
    info["elapsed"] = time.perf_counter() - start
    return info


def test_default_counts_meet_the_requirements(full):
    c = full["counts"]
    assert full["generated"] is True
    assert c["train_instances"] >= 50 and c["train_images"] >= 3 * c["train_instances"]
    assert c["queries"] >= 70
    assert c["distractors"] > 0 and c["easy"] > 0 and c["hard"] > 0 and c["junk"] > 0
    assert full["elapsed"] < 60, f"generation took {full['elapsed']:.1f} s (budget 60 s on 2 cores)"


def test_loads_with_revisited_dataset_and_load_gnd(full):
    root, name = Path(full["root"]), full["name"]
    ds = RevisitedDataset(root, name)  # checks that every image exists
    assert ds.n_queries == full["counts"]["queries"]
    assert ds.n_database == full["counts"]["database"]
    gnd = load_gnd(full["gnd"])  # the restricted unpickler: plain containers only
    assert gnd.name == name and gnd.qimlist == ds.gnd.qimlist
    raw = pickle.loads(Path(full["gnd"]).read_bytes())
    assert set(raw) == {"imlist", "qimlist", "gnd"}
    for q in raw["gnd"]:
        assert set(q) == {"bbx", "easy", "hard", "junk"}
        assert all(type(v) is float for v in q["bbx"])
        assert all(type(i) is int for k in ("easy", "hard", "junk") for i in q[k])
    # Query images are not in the database (as in ROxford5k); every database image is used once.
    assert not set(ds.gnd.qimlist) & set(ds.gnd.imlist)
    assert len(set(ds.gnd.imlist)) == ds.n_database


def test_ground_truth_is_consistent(full):
    ds = RevisitedDataset(full["root"], full["name"])
    meta = load_image_meta(full["dataset_dir"])
    positives_of: dict[int, set[int]] = {}
    for qi, q in enumerate(ds.gnd.gnd):
        easy, hard, junk = set(q["easy"]), set(q["hard"]), set(q["junk"])
        assert easy and hard and junk
        assert not (easy & hard) and not (easy & junk) and not (hard & junk)
        inst = meta[ds.gnd.qimlist[qi]]["instance"]
        for key, idx in (("easy", easy), ("hard", hard), ("junk", junk)):
            for i in idx:
                m = meta[ds.gnd.imlist[i]]
                assert m["instance"] == inst and m["kind"] == key
        positives_of.setdefault(inst, set()).update(easy | hard | junk)
    # Distractors are nobody's positive or junk; every non-distractor belongs to exactly one instance.
    used = set().union(*positives_of.values())
    for i, name in enumerate(ds.gnd.imlist):
        assert (meta[name]["kind"] == "distractor") == (i not in used)
    # Junk is barely visible, easy views are clearly visible.
    area = {k: [m["area"] for m in meta.values() if m["kind"] == k] for k in ("easy", "hard", "junk")}
    assert np.median(area["easy"]) > 3 * np.median(area["junk"])
    assert min(m["visible"] for m in meta.values() if m["kind"] == "easy") > 0.85


def test_every_bbx_inside_its_image(full):
    ds = RevisitedDataset(full["root"], full["name"])
    for path, bbx in zip(ds.query_paths, ds.query_bbxs):
        with Image.open(path) as im:
            w, h = im.size
        x1, y1, x2, y2 = bbx
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert (x2 - x1) >= 16 and (y2 - y1) >= 16  # a usable crop
        assert max(w, h) == full["params"]["image_size"]


def test_training_split_folder_per_class_and_csv(full):
    train = Path(full["train_dir"])
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    assert len(classes) == full["counts"]["train_instances"]
    with open(full["train_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == full["counts"]["train_images"]
    for r in rows:
        assert (train / r["path"]).is_file()
        assert r["path"].split("/")[0] == classes[int(r["label"])]
    per_class = {c: len(list((train / c).glob("*.jpg"))) for c in classes}
    assert min(per_class.values()) >= 3


def test_train_and_test_instances_are_disjoint(full):
    meta = load_image_meta(full["dataset_dir"])
    test_instances = {m["instance"] for m in meta.values() if m["instance"] >= 0}
    train_instances = set(range(full["counts"]["train_instances"]))
    assert len(test_instances) == full["counts"]["test_instances"]
    assert not test_instances & train_instances
    # ... and they really look different: no test object is pixel-identical to a training object.
    seed = full["params"]["seed"]
    train_objs = {hashlib.sha256(render_instance(seed, i).tobytes()).hexdigest() for i in train_instances}
    assert not {hashlib.sha256(render_instance(seed, i).tobytes()).hexdigest() for i in test_instances} & train_objs


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate_benchmark(tmp_path / "a", seed=3, **SMALL)
    b = generate_benchmark(tmp_path / "b", seed=3, **SMALL)
    c = generate_benchmark(tmp_path / "c", seed=4, **SMALL)
    da = tree_digest(Path(a["dataset_dir"]), Path(a["train_dir"]))
    db = tree_digest(Path(b["dataset_dir"]), Path(b["train_dir"]))
    dc = tree_digest(Path(c["dataset_dir"]), Path(c["train_dir"]))
    assert da == db
    assert set(da) == set(dc)  # same layout and names ...
    differing = [k for k in da if da[k] != dc[k] and k.endswith(".jpg")]
    assert len(differing) == sum(k.endswith(".jpg") for k in da)  # ... but every image differs


def test_idempotent_and_regenerates_on_new_parameters(tmp_path):
    first = generate_benchmark(tmp_path, **SMALL)
    assert first["generated"]
    gnd = Path(first["gnd"])
    stamp = gnd.stat().st_mtime_ns
    again = generate_benchmark(tmp_path, **SMALL)
    assert again["generated"] is False and again["counts"] == first["counts"]
    assert gnd.stat().st_mtime_ns == stamp
    marker = json.loads((Path(first["dataset_dir"]) / MARKER).read_text())
    assert marker["params"]["n_test_instances"] == SMALL["n_test_instances"]
    changed = generate_benchmark(tmp_path, **{**SMALL, "n_distractors": 2})
    assert changed["generated"] and changed["counts"]["database"] == first["counts"]["database"] - 2
    # No stale images of the old parameters, no temporary folder left.
    assert len(list((Path(changed["dataset_dir"]) / "jpg").glob("*.jpg"))) == (
        changed["counts"]["database"] + changed["counts"]["queries"]
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "dtop-mini").mkdir()
    (tmp_path / "dtop-mini" / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing to overwrite"):
        generate_benchmark(tmp_path, **SMALL)
    assert (tmp_path / "dtop-mini" / "precious.txt").read_text() == "keep me"


def test_a_killed_run_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    import dtop.apps.synthetic as synthetic

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_scene", boom)
    with pytest.raises(KeyboardInterrupt):
        generate_benchmark(tmp_path, **SMALL)
    assert not (tmp_path / "dtop-mini").exists() and not (tmp_path / "dtop-mini-train").exists()
    monkeypatch.undo()
    assert generate_benchmark(tmp_path, **SMALL)["generated"]
    RevisitedDataset(tmp_path, "dtop-mini")


@pytest.mark.parametrize("bad", [dict(name="../x"), dict(name="roxford5k"), dict(n_test_instances=0),
                                 dict(n_easy=0, n_hard=0), dict(image_size=8)])
def test_bad_parameters(tmp_path, bad):
    with pytest.raises(DataError):
        generate_benchmark(tmp_path, **{**SMALL, **bad})


def test_reduced_config_is_fast(tmp_path):
    start = time.perf_counter()
    generate_benchmark(tmp_path, **SMALL)
    assert time.perf_counter() - start < 10


def test_test_split_does_not_depend_on_the_training_split(tmp_path):
    a = generate_benchmark(tmp_path / "a", **SMALL)
    b = generate_benchmark(tmp_path / "b", **{**SMALL, "n_train_instances": 7, "train_views": 1})
    da, db = (tree_digest(Path(x["dataset_dir"])) for x in (a, b))
    assert da.pop(f"dtop-mini/{MARKER}") != db.pop(f"dtop-mini/{MARKER}")  # the marker records all parameters
    assert da == db  # images, ground truth and metadata are the same
