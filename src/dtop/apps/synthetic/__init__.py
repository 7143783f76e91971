"""The built-in instance-retrieval benchmark (``dtop-mini``), generated offline and deterministically.

``generate_benchmark(root)`` writes a benchmark in the revisited format plus a folder-per-class
training split of other instances; see ``docs/apps.md`` for the layout, the views and the measured
difficulty.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image

from dtop.apps.synthetic.drawing import _rng, render_instance
from dtop.apps.synthetic.params import (
    _DISTRACTOR_OBJECT_BASE,
    _T_DB,
    _T_DISTRACTOR,
    _T_ORDER,
    _T_QUERY,
    _T_TRAIN,
    _TEST_BASE,
    DEFAULT_NAME,
    GENERATOR_ID,
    GENERATOR_VERSION,
    MARKER,
    PALETTE,
    SyntheticParams,
)
from dtop.apps.synthetic.scenes import _jpeg, _scene
from dtop.errors import DataError

__all__ = [
    "DEFAULT_NAME", "GENERATOR_ID", "GENERATOR_VERSION", "MARKER", "PALETTE", "SyntheticParams",
    "generate_benchmark", "load_image_meta", "render_instance",
]

# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------


def _marker(params: SyntheticParams) -> dict[str, Any]:
    return {"generator": GENERATOR_ID, "version": GENERATOR_VERSION, "params": asdict(params)}


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_ours(folder: Path) -> bool:
    m = _read_marker(folder)
    return isinstance(m, dict) and m.get("generator") == GENERATOR_ID


def _write_training_split(params: SyntheticParams, train_dir: Path) -> int:
    """Training views of every training instance, a folder per class, plus ``train.csv``; the image count."""
    seed, long_side, quality = params.seed, params.image_size, params.jpeg_quality
    train_dir.mkdir(parents=True)
    rows: list[tuple[str, int]] = []
    for c in range(params.n_train_instances):
        obj = render_instance(seed, c)
        cls = f"{c:04d}"
        (train_dir / cls).mkdir()
        for v in range(params.train_views):
            img, _ = _scene(obj, "train", _rng(seed, _T_TRAIN, c, v), long_side)
            rel = f"{cls}/{cls}_{v:02d}.jpg"
            (train_dir / rel).write_bytes(_jpeg(img, quality))
            rows.append((rel, c))
    with open(train_dir / "train.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return len(rows)


_DbItem = tuple[int, str, Image.Image, dict[str, Any]]  # (instance or -1, kind, image, scene info)
_Query = tuple[int, Image.Image, dict[str, Any]]  # (instance, image, scene info)


def _render_test_views(params: SyntheticParams) -> tuple[list[_Query], list[_DbItem]]:
    """Queries and database views of the test instances, then the distractors (in generation order)."""
    seed, long_side = params.seed, params.image_size
    db_items: list[_DbItem] = []
    queries: list[_Query] = []
    kinds = ["easy"] * params.n_easy + ["hard"] * params.n_hard + ["junk"] * params.n_junk
    for t in range(params.n_test_instances):
        inst = _TEST_BASE + t
        obj = render_instance(seed, inst)
        for q in range(params.queries_per_instance):
            img, info = _scene(obj, "query", _rng(seed, _T_QUERY, inst, q), long_side)
            queries.append((inst, img, info))
        for v, kind in enumerate(kinds):
            img, info = _scene(obj, kind, _rng(seed, _T_DB, inst, v), long_side)
            db_items.append((inst, kind, img, info))
    for j in range(params.n_distractors):
        rng = _rng(seed, _T_DISTRACTOR, j)
        other = render_instance(seed, _DISTRACTOR_OBJECT_BASE + j) if rng.random() < 0.7 else None
        img, info = _scene(other, "easy", rng, long_side)
        db_items.append((-1, "distractor", img, {**info, "kind": "distractor"}))
    return queries, db_items


def _write_test_split(params: SyntheticParams, test_dir: Path, queries: list[_Query],
                      db_items: list[_DbItem]) -> dict[str, Any]:
    """The database (shuffled, opaque names), the queries, the ground truth and ``images.json``."""
    jpg = test_dir / "jpg"
    jpg.mkdir(parents=True)
    quality = params.jpeg_quality
    order = _rng(params.seed, _T_ORDER).permutation(len(db_items))
    imlist: list[str] = []
    position: dict[int, int] = {}
    images_meta: dict[str, Any] = {}
    for new, old in enumerate(order.tolist()):
        name = f"img_{new:05d}"
        imlist.append(name)
        position[old] = new
        inst, kind, img, info = db_items[old]
        (jpg / f"{name}.jpg").write_bytes(_jpeg(img, quality))
        images_meta[name] = {"instance": inst, "kind": kind, "size": list(img.size),
                             **{k: info[k] for k in ("visible", "area") if k in info}}
    qimlist, gnd = [], []
    for qi, (inst, img, info) in enumerate(queries):
        name = f"query_{qi:03d}"
        qimlist.append(name)
        (jpg / f"{name}.jpg").write_bytes(_jpeg(img, quality))
        entry: dict[str, Any] = {"bbx": info["bbx"]}
        for key in ("easy", "hard", "junk"):
            entry[key] = sorted(position[i] for i, (ii, k, _, _) in enumerate(db_items) if ii == inst and k == key)
        gnd.append(entry)
        images_meta[name] = {"instance": inst, "kind": "query", "size": list(img.size), "bbx": info["bbx"]}
    gnd_obj = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    (test_dir / f"gnd_{params.name}.pkl").write_bytes(pickle.dumps(gnd_obj, protocol=4))
    (test_dir / "images.json").write_text(json.dumps(images_meta, indent=None, sort_keys=True) + "\n",
                                          encoding="utf-8")
    per_instance = gnd[:: params.queries_per_instance]
    return {"queries": len(qimlist), "database": len(imlist),
            **{key: sum(len(g[key]) for g in per_instance) for key in ("easy", "hard", "junk")}}


def _build(params: SyntheticParams, test_dir: Path, train_dir: Path) -> dict[str, Any]:
    """Generate everything into ``test_dir`` and ``train_dir`` (both new); return the counts."""
    train_images = _write_training_split(params, train_dir)
    queries, db_items = _render_test_views(params)
    test = _write_test_split(params, test_dir, queries, db_items)
    return {
        "train_instances": params.n_train_instances,
        "train_images": train_images,
        "test_instances": params.n_test_instances,
        "queries": test["queries"],
        "database": test["database"],
        "distractors": params.n_distractors,
        "easy": test["easy"],
        "hard": test["hard"],
        "junk": test["junk"],
    }


def _result(root: Path, params: SyntheticParams, counts: dict[str, Any], generated: bool,
            seconds: float) -> dict[str, Any]:
    test_dir, train_dir = root / params.name, root / f"{params.name}-train"
    return {
        "root": str(root),
        "name": params.name,
        "dataset_dir": str(test_dir),
        "gnd": str(test_dir / f"gnd_{params.name}.pkl"),
        "images": str(test_dir / "jpg"),
        "train_dir": str(train_dir),
        "train_csv": str(train_dir / "train.csv"),
        "counts": dict(counts),
        "params": asdict(params),
        "generated": generated,
        "seconds": round(seconds, 3),
    }


def generate_benchmark(
    root: str | os.PathLike,
    name: str = DEFAULT_NAME,
    seed: int = 0,
    n_train_instances: int = 150,
    n_test_instances: int = 35,
    *,
    train_views: int = 6,
    queries_per_instance: int = 2,
    n_easy: int = 3,
    n_hard: int = 2,
    n_junk: int = 1,
    n_distractors: int = 150,
    image_size: int = 192,
    jpeg_quality: int = 90,
    force: bool = False,
) -> dict[str, Any]:
    """Generate the synthetic benchmark ``<root>/<name>`` and its training split ``<root>/<name>-train``.

    Defaults: 150 training instances × 6 views (900 images), 35 test instances × 2 queries (70
    queries), per instance 3 easy, 2 hard and 1 junk database image, 150 distractors (360 database
    images), longer side 192 px. Returns a dict with the paths (``dataset_dir``, ``gnd``, ``images``,
    ``train_dir``, ``train_csv``), ``counts``, ``params``, ``generated`` (False when a finished
    benchmark with the same parameters was found and kept) and ``seconds``.

    ``RevisitedDataset(root, name)`` reads the result. A folder in the way that this generator did
    not write is never deleted: that raises :class:`~dtop.errors.DataError`. ``force`` regenerates
    even when the parameters match.
    """
    params = SyntheticParams(
        name=str(name), seed=int(seed), n_train_instances=int(n_train_instances),
        n_test_instances=int(n_test_instances), train_views=int(train_views),
        queries_per_instance=int(queries_per_instance), n_easy=int(n_easy), n_hard=int(n_hard), n_junk=int(n_junk),
        n_distractors=int(n_distractors), image_size=int(image_size), jpeg_quality=int(jpeg_quality),
    )
    params.validate()
    root = Path(root)
    if not force:
        counts = _finished_counts(root, params)
        if counts is not None:
            return _result(root, params, counts, False, 0.0)
    start = time.perf_counter()
    counts = _build_in_place(root, params)
    return _result(root, params, counts, True, time.perf_counter() - start)


def _finished_counts(root: Path, params: SyntheticParams) -> dict[str, Any] | None:
    """The counts of a finished benchmark with these parameters under ``root``, or None."""
    test_dir, train_dir = root / params.name, root / f"{params.name}-train"
    want = _marker(params)
    found = [_read_marker(d) for d in (test_dir, train_dir)]
    if all(isinstance(m, dict) and {k: m.get(k) for k in want} == want for m in found) and \
            (test_dir / f"gnd_{params.name}.pkl").is_file():
        first = found[0]
        return dict(first.get("counts", {})) if isinstance(first, dict) else {}
    return None


def _build_in_place(root: Path, params: SyntheticParams) -> dict[str, Any]:
    """Build into a hidden folder, then move both folders into place; never overwrite foreign folders."""
    test_dir, train_dir = root / params.name, root / f"{params.name}-train"
    want = _marker(params)
    for d in (test_dir, train_dir):
        if d.exists() and not _is_ours(d) and (not d.is_dir() or any(d.iterdir())):
            raise DataError(
                f"{d} exists and was not made by the synthetic benchmark generator (no {MARKER} in it); "
                "refusing to overwrite it. Choose another root or name, or move it away."
            )
    root.mkdir(parents=True, exist_ok=True)
    work = root / f".{params.name}.partial"
    if work.exists():  # left by a killed run
        shutil.rmtree(work)
    work.mkdir()
    try:
        counts = _build(params, work / params.name, work / f"{params.name}-train")
        marker = {**want, "counts": counts}
        text = json.dumps(marker, indent=2, sort_keys=True) + "\n"
        for sub in (params.name, f"{params.name}-train"):
            (work / sub / MARKER).write_text(text, encoding="utf-8")
        # Move into place: the training split first, the benchmark (whose marker completes the pair) last.
        for sub, dest in ((f"{params.name}-train", train_dir), (params.name, test_dir)):
            if dest.exists():
                shutil.rmtree(dest)  # ours (checked above) or an empty folder
            os.replace(work / sub, dest)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return counts


def load_image_meta(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """Per-image metadata of a generated benchmark: ``{name: {instance, kind, size, visible?, area?, bbx?}}``.

    ``instance`` is -1 for distractors; ``kind`` is query, easy, hard, junk or distractor; ``visible``
    is the fraction of the object that shows, ``area`` the fraction of the image it covers.
    """
    path = Path(dataset_dir) / "images.json"
    if not path.is_file():
        raise DataError(f"{path} not found: {dataset_dir} is not a generated synthetic benchmark")
    return json.loads(path.read_text(encoding="utf-8"))
