"""GLDv2-clean (``train_clean.csv`` and ``train/<a>/<b>/<c>/<id>.jpg``), optionally without listed landmarks."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from dtop.data.training.common import build_set, column_indices, require_dir, require_file
from dtop.data.training.trainingset import TrainingSet
from dtop.errors import DataError

GLDV2_CLEAN_CSV = "train_clean.csv"
"""File name of the GLDv2-clean label file inside its root."""


def gldv2_relative_path(image_id: str) -> str:
    """Relative path of GLDv2 image ``id`` under ``train/``: ``<id[0]>/<id[1]>/<id[2]>/<id>.jpg``."""
    return f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def read_landmark_ids(path: str | os.PathLike) -> set[int]:
    """Landmark ids of an exclusion file: integers separated by whitespace or commas; ``#`` comments.

    A first line without any integer (a header such as ``landmark_id``) is skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"landmark exclusion list not found: {path} (one landmark id per line)")
    ids: set[int] = set()
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = line.split("#", 1)[0]
        tokens = [t.strip().strip('"') for t in line.replace(",", " ").split()]
        for t in tokens:
            try:
                ids.add(int(t))
            except ValueError:
                if lineno == 1 and not any(s.lstrip("-").isdigit() for s in tokens):
                    break  # a header line
                raise DataError(f"{path}:{lineno}: {t!r} is not a landmark id (integers only)") from None
    return ids


def _split_header(line: str) -> list[str]:
    return [c.strip().strip('"').strip() for c in next(csv.reader([line]))]


def load_gldv2_clean(
    root: str | os.PathLike, exclude: str | os.PathLike | None = None, *, min_images_per_class: int = 1
) -> TrainingSet:
    """GLDv2-clean from ``root`` = the folder with ``train_clean.csv`` and ``train/``.

    ``exclude``: a file of landmark ids to leave out (:func:`read_landmark_ids`); the counts are in
    ``extras["excluded_landmarks"]``, ``extras["excluded_images"]`` and ids of the list that are not
    in the set in ``extras["exclude_not_found"]``.
    """
    root = Path(root)
    hint = "Download it with `dtop download gldv2-clean --root DIR` (then use DIR/gldv2)."
    require_dir(root, "GLDv2-clean folder", hint)
    csv_path = root / GLDV2_CLEAN_CSV
    if not csv_path.is_file() and (root / "metadata" / GLDV2_CLEAN_CSV).is_file():
        csv_path = root / "metadata" / GLDV2_CLEAN_CSV
    require_file(csv_path, "GLDv2-clean label file", hint)
    images = root / "train"
    require_dir(images, "GLDv2 image folder", hint)
    paths, raw = _read_clean_csv(csv_path, str(images.absolute()) + os.sep)
    full = build_set(paths, raw, name="gldv2-clean", root=root, what=str(csv_path))
    ts = full if exclude is None else _without_landmarks(full, exclude, csv_path)
    return ts.filter_min_images(min_images_per_class)


def _read_clean_csv(csv_path: Path, prefix: str) -> tuple[list[str], list[int]]:
    """Image paths (``prefix`` + relative path) and landmark ids of ``train_clean.csv``."""
    paths: list[str] = []
    raw: list[int] = []
    with open(csv_path, encoding="utf-8", newline="") as f:
        header = _split_header(f.readline())
        c_lm, c_im = column_indices(header, ("landmark_id", "images"), csv_path, "landmark_id,images")
        for lineno, line in enumerate(f, 2):
            line = line.strip()
            if not line:
                continue
            if c_lm == 0 and c_im == 1:  # the official layout: no quoting inside (hex ids, spaces)
                lm_s, _, ims_s = line.partition(",")
            else:
                row = next(csv.reader([line]))
                lm_s, ims_s = row[c_lm], row[c_im]
            try:
                lm = int(lm_s.strip().strip('"'))
            except ValueError:
                raise DataError(f"{csv_path}:{lineno}: landmark_id {lm_s!r} is not an integer") from None
            for image_id in ims_s.strip().strip('"').split():
                if len(image_id) < 3:
                    raise DataError(f"{csv_path}:{lineno}: image id {image_id!r} is too short")
                paths.append(prefix + gldv2_relative_path(image_id).replace("/", os.sep))
                raw.append(lm)
    if not paths:
        raise DataError(f"{csv_path}: no images listed")
    return paths, raw


def _without_landmarks(full: TrainingSet, exclude: str | os.PathLike, csv_path: Path) -> TrainingSet:
    """``full`` without the landmarks listed in the file ``exclude`` (counts in ``extras``)."""
    ids = read_landmark_ids(exclude)
    present = {int(c) for c in full.class_names}
    drop = np.array(sorted(present & ids), dtype=np.int64)
    lm_of = np.array([int(c) for c in full.class_names], dtype=np.int64)[full.labels]
    keep = ~np.isin(lm_of, drop)
    if not keep.any():
        raise DataError(f"the exclusion list {exclude} removes every landmark of {csv_path}")
    ts = full.subset(np.flatnonzero(keep), remap_labels=True, name="gldv2-clean")
    ts.extras.update(excluded_landmarks=int(drop.size), excluded_images=int((~keep).sum()),
                     exclude_not_found=int(len(ids - present)))
    return ts
