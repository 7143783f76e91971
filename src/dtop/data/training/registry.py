"""Training sets by format name: the one registry ``{format: loader}`` and :func:`load_training_set`."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from dtop.data.formats import TRAINING_FORMATS
from dtop.data.training.csvfile import load_csv
from dtop.data.training.folder import load_image_folder
from dtop.data.training.gldv1 import load_gldv1
from dtop.data.training.gldv2 import load_gldv2_clean
from dtop.data.training.sfm120k import load_sfm120k
from dtop.data.training.trainingset import TrainingSet
from dtop.errors import DataError

FORMATS: tuple[str, ...] = TRAINING_FORMATS
"""The training-set formats (``data.format`` of the training config, ``dtop data check --format``)."""


@dataclass(frozen=True)
class TrainingSource:
    """Where a training set lies and how to read it; each format uses the options that apply to it."""

    root: str | os.PathLike | None = None
    #: The CSV file of format ``csv`` (default: ``root``) and its columns.
    csv_path: str | os.PathLike | None = None
    path_column: str = "path"
    label_column: str = "label"
    #: gldv2-clean: a file of landmark ids to leave out.
    exclude: str | os.PathLike | None = None
    #: sfm120k: ``train`` or ``val``.
    split: str = "train"
    #: gldv1: leave out the images absent from the folder (else they stay, and fail when read).
    skip_missing: bool = True

    def folder(self, fmt: str) -> str | os.PathLike:
        """The data folder, which every format but ``csv`` needs."""
        if self.root is None:
            raise DataError(f"format {fmt} needs the data folder")
        return self.root


def _sfm120k(source: TrainingSource) -> TrainingSet:
    return load_sfm120k(source.folder("sfm120k"), source.split)


def _gldv2_clean(source: TrainingSource) -> TrainingSet:
    return load_gldv2_clean(source.folder("gldv2-clean"), source.exclude)


def _gldv1(source: TrainingSource) -> TrainingSet:
    return load_gldv1(source.folder("gldv1"), skip_missing=source.skip_missing)


def _folder(source: TrainingSource) -> TrainingSet:
    return load_image_folder(source.folder("folder"))


def _csv(source: TrainingSource) -> TrainingSet:
    path = source.csv_path or source.root
    if not path:
        raise DataError("format csv needs the CSV file of path,label (data.csv in a training config, --csv)")
    return load_csv(path, source.path_column, source.label_column)


LOADERS: dict[str, Callable[[TrainingSource], TrainingSet]] = {
    "sfm120k": _sfm120k,
    "gldv2-clean": _gldv2_clean,
    "gldv1": _gldv1,
    "folder": _folder,
    "csv": _csv,
}
"""The loader of each training-set format (the keys are :data:`FORMATS`)."""

if tuple(LOADERS) != FORMATS:  # pragma: no cover - a format added to one list and not the other
    raise RuntimeError(f"training-set loaders {tuple(LOADERS)} do not match the formats {FORMATS}")


def load_training_set(
    format: str,
    root: str | os.PathLike | None = None,
    *,
    csv_path: str | os.PathLike | None = None,
    path_column: str = "path",
    label_column: str = "label",
    exclude: str | os.PathLike | None = None,
    min_images_per_class: int = 1,
    split: str = "train",
    skip_missing: bool = True,
) -> TrainingSet:
    """Load a training set of ``format`` (one of :data:`FORMATS`) from ``root`` (``csv``: ``csv_path``).

    The options are those of :class:`TrainingSource`; an exclusion list with another format than
    gldv2-clean is an error. Classes with fewer than ``min_images_per_class`` images are dropped
    (labels renumbered).
    """
    fmt = str(format).lower()
    loader = LOADERS.get(fmt)
    if loader is None:
        raise DataError(f"unknown training-set format {format!r}; choose one of {', '.join(FORMATS)}")
    if exclude is not None and fmt != "gldv2-clean":
        raise DataError(f"an exclusion list applies to gldv2-clean only, not {fmt}")
    source = TrainingSource(root=root, csv_path=csv_path, path_column=path_column, label_column=label_column,
                            exclude=exclude, split=split, skip_missing=skip_missing)
    return loader(source).filter_min_images(min_images_per_class)
