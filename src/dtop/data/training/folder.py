"""A training set of one sub-folder of images per class."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dtop.data.folders import IMAGE_SUFFIXES
from dtop.data.training.common import build_set, require_dir
from dtop.data.training.trainingset import TrainingSet, safe_name
from dtop.errors import DataError

log = logging.getLogger(__name__)


def load_image_folder(root: str | os.PathLike, *, min_images_per_class: int = 1) -> TrainingSet:
    """A folder per class: ``root/<class>/**/<image>`` (class names = folder names, sorted).

    Hidden folders and files are ignored, and so are images directly in ``root`` (they have no
    class; a warning says how many). Images are found by suffix (``.jpg``, ``.png``, ...).
    """
    root = Path(root)
    require_dir(root, "image folder", "Give a folder with one sub-folder of images per class.")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sum(1 for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if loose:
        log.warning("%s: %d images directly in the folder have no class folder; ignored", root, loose)
    if not class_dirs:
        raise DataError(f"{root} has no class folders; expected {root}/<class>/<image> (a folder per class)")
    paths: list[str] = []
    raw: list[str] = []
    for d in class_dirs:
        found = sorted(
            str(p.absolute())
            for p in d.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(d).parts)
            and p.is_file()
        )
        paths.extend(found)
        raw.extend([d.name] * len(found))
    if not paths:
        raise DataError(f"{root}: the class folders hold no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    # Folder names are labels as given (sorted as strings, or numerically when all are integers).
    return build_set(paths, raw, name=safe_name(root.absolute().name), root=root, what=str(root),
                     min_images_per_class=min_images_per_class)

