"""Shared steps of the training-set loaders: labels from raw class ids, path checks."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dtop.data.training.trainingset import TrainingSet
from dtop.errors import DataError


def _sorted_ids(values: Iterable[str]) -> list[str]:
    vals = list(values)
    try:
        return sorted(vals, key=int)
    except ValueError:
        return sorted(vals)


def contiguous_labels(raw: Sequence[Any]) -> tuple[np.ndarray, list[str]]:
    """Map raw class ids to ``0..K-1`` (numeric order when they are all integers); return labels, names."""
    if len(raw) == 0:
        return np.zeros(0, dtype=np.int64), []
    if all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in raw[:1000]):
        try:
            arr = np.asarray(raw, dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            arr = None
        if arr is not None:
            uniq, inv = np.unique(arr, return_inverse=True)
            return inv.astype(np.int64), [str(int(u)) for u in uniq]
    strs = [str(v).strip() for v in raw]
    uniq_set = set(strs)
    names = _sorted_ids(uniq_set)
    index = {name: i for i, name in enumerate(names)}
    return np.fromiter((index[s] for s in strs), dtype=np.int64, count=len(strs)), names


def build_set(paths: list[str], raw_labels: Sequence[Any], *, name: str, root: str | os.PathLike, what: str,
              extras: dict[str, Any] | None = None, min_images_per_class: int = 1) -> TrainingSet:
    """A :class:`TrainingSet` of ``paths`` with the raw class ids renumbered; ``what`` names the source."""
    if not paths:
        raise DataError(f"{what}: no training images found")
    labels, names = contiguous_labels(raw_labels)
    ts = TrainingSet(paths=paths, labels=labels, num_classes=len(names), class_names=names, name=name,
                     root=str(Path(root).absolute()), extras=dict(extras or {}))
    return ts.filter_min_images(min_images_per_class)


def require_dir(path: Path, what: str, hint: str) -> None:
    """Raise a :class:`DataError` (with ``hint``) unless ``path`` is a folder."""
    if not path.exists():
        raise DataError(f"{what} not found: {path}. {hint}")
    if not path.is_dir():
        raise DataError(f"{what} is not a folder: {path}")


def require_file(path: Path, what: str, hint: str) -> None:
    """Raise a :class:`DataError` naming what the folder holds (and ``hint``) unless ``path`` is a file."""
    if not path.is_file():
        near = ""
        if path.parent.is_dir():
            listing = sorted(p.name for p in path.parent.iterdir())[:10]
            near = f" (the folder holds: {', '.join(listing) or 'nothing'})"
        raise DataError(f"{what} not found: {path}{near}. {hint}")



def column_indices(header: Sequence[str], names: Sequence[str], csv_path: Path, expected: str) -> list[int]:
    """Positions of ``names`` in a CSV ``header``; a DataError naming the ``expected`` columns otherwise."""
    try:
        return [list(header).index(name) for name in names]
    except ValueError:
        raise DataError(
            f"{csv_path}: expected the columns {expected}; found {', '.join(header) or 'nothing'}"
        ) from None
