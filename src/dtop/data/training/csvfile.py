"""A training set listed in a CSV file of image paths and labels."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from dtop.data.training.common import build_set
from dtop.data.training.trainingset import TrainingSet, safe_name
from dtop.errors import DataError


def load_csv(
    path: str | os.PathLike,
    path_column: str = "path",
    label_column: str = "label",
    *,
    image_root: str | os.PathLike | None = None,
    min_images_per_class: int = 1,
) -> TrainingSet:
    """A CSV (comma or tab separated, with a header) of image paths and labels.

    Relative paths are relative to the CSV's folder (or ``image_root``). Labels are any strings
    (landmark ids, names); they are renumbered ``0..K-1``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"training CSV not found: {path}")
    base = Path(image_root) if image_root is not None else path.parent
    with open(path, encoding="utf-8-sig", newline="") as f:
        first = f.readline()
        f.seek(0)
        delimiter = "\t" if "\t" in first and "," not in first else ","
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if not columns:
            raise DataError(f"{path}: empty CSV; expected a header with the columns {path_column},{label_column}")
        reader.fieldnames = columns
        for col, what in ((path_column, "path"), (label_column, "label")):
            if col not in columns:
                raise DataError(
                    f"{path}: no {what} column {col!r}; the columns are: {', '.join(columns)} "
                    f"(choose with data.{what}_column / --{what}-column)"
                )
        base_abs = base.absolute()
        paths: list[str] = []
        raw: list[str] = []
        for lineno, row in enumerate(reader, 2):
            p = (row.get(path_column) or "").strip()
            lab = (row.get(label_column) or "").strip()
            if not p and not lab:
                continue
            if not p or not lab:
                raise DataError(f"{path}:{lineno}: empty {'path' if not p else 'label'}")
            q = Path(p)
            paths.append(str(q if q.is_absolute() else base_abs / q))
            raw.append(lab)
    if not paths:
        raise DataError(f"{path}: the CSV lists no images")
    return build_set(paths, raw, name=safe_name(path.stem), root=path.parent, what=str(path),
                     min_images_per_class=min_images_per_class)

