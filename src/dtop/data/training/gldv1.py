"""GLDv1 (Kaggle landmark-recognition-2018 ``train.csv``); images of dead URLs are left out."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from dtop.data.training.common import build_set, column_indices, require_dir, require_file
from dtop.data.training.gldv2 import gldv2_relative_path
from dtop.data.training.trainingset import TrainingSet
from dtop.errors import DataError

GLDV1_CSV = "train.csv"
"""File name of the GLDv1 label file inside its root."""


def load_gldv1(
    root: str | os.PathLike,
    *,
    skip_missing: bool = True,
    layout: str = "auto",
    min_images_per_class: int = 1,
) -> TrainingSet:
    """GLDv1 (Kaggle landmark-recognition-2018, "noisy") from ``root`` = the folder with ``train.csv`` and ``train/``.

    Layout of the images: ``flat`` = ``train/<id>.jpg`` (what the Kaggle downloader writes),
    ``nested`` = ``train/<id[0]>/<id[1]>/<id[2]>/<id>.jpg`` (GLDv2 style), ``auto`` = whichever
    holds the first listed images. Rows without a landmark id (``None``) are skipped. With
    ``skip_missing`` (default) images absent from the folder are left out (many URLs are dead);
    their number is ``extras["missing"]``.
    """
    root = Path(root)
    hint = "GLDv1 comes from Kaggle (landmark-recognition-2018): put train.csv and the images in train/."
    require_dir(root, "GLDv1 folder", hint)
    csv_path = root / GLDV1_CSV
    require_file(csv_path, "GLDv1 label file", hint)
    images = root / "train"
    require_dir(images, "GLDv1 image folder", hint)
    if layout not in ("auto", "flat", "nested"):
        raise DataError(f"GLDv1 layout must be auto, flat or nested, got {layout!r}")
    ids, raw, no_label = _read_train_csv(csv_path)
    prefix = str(images.absolute()) + os.sep

    def flat(i: str) -> str:
        return prefix + i + ".jpg"

    def nested(i: str) -> str:
        return prefix + gldv2_relative_path(i).replace("/", os.sep)

    if layout == "auto":
        probe = ids[:200]
        n_flat = sum(os.path.exists(flat(i)) for i in probe)
        n_nested = sum(os.path.exists(nested(i)) for i in probe if len(i) >= 3)
        layout = "nested" if n_nested > n_flat else "flat"
    to_path = nested if layout == "nested" else flat
    paths = [to_path(i) for i in ids]
    missing = 0
    if skip_missing:
        present = _present_files(images, nested=layout == "nested")
        keep = [p[len(prefix):] in present for p in paths]
        missing = len(paths) - sum(keep)
        paths = [p for p, k in zip(paths, keep) if k]
        raw = [r for r, k in zip(raw, keep) if k]
        if not paths:
            raise DataError(f"none of the {len(ids)} images of {csv_path} is in {images} (layout {layout})")
    extras = {"missing": missing, "unlabelled": no_label, "layout": layout}
    return build_set(paths, raw, name="gldv1", root=root, what=str(csv_path), extras=extras,
                     min_images_per_class=min_images_per_class)


def _read_train_csv(csv_path: Path) -> tuple[list[str], list[int], int]:
    """Image ids and landmark ids of the labelled rows of ``train.csv``, and the number of unlabelled rows."""
    ids: list[str] = []
    raw: list[int] = []
    no_label = 0
    with open(csv_path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        c_id, c_lm = column_indices(header, ("id", "landmark_id"), csv_path, "id,url,landmark_id")
        for lineno, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) <= max(c_id, c_lm):
                raise DataError(f"{csv_path}:{lineno}: expected {len(header)} fields, got {len(row)}")
            lm_s = row[c_lm].strip()
            if lm_s in ("", "None", "none", "nan"):
                no_label += 1
                continue
            try:
                raw.append(int(lm_s))
            except ValueError:
                raise DataError(f"{csv_path}:{lineno}: landmark_id {lm_s!r} is not an integer") from None
            ids.append(row[c_id].strip())
    if not ids:
        raise DataError(f"{csv_path}: no labelled images listed")
    return ids, raw, no_label


def _present_files(folder: Path, nested: bool) -> set[str]:
    """File names in ``folder`` (flat) or relative paths below it (nested); one directory scan."""
    if not nested:
        with os.scandir(folder) as it:
            return {e.name for e in it}
    out: set[str] = set()
    base = len(str(folder.absolute())) + 1
    for dirpath, _dirs, files in os.walk(folder.absolute()):
        rel = dirpath[base:]
        out.update(os.path.join(rel, f) if rel else f for f in files)
    return out

