"""Image lists from folders and list files (for users' own photos)."""

from __future__ import annotations

import os
from pathlib import Path

from dtop.errors import DataError

IMAGE_SUFFIXES: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm"
)
"""File suffixes (lower case) that mark an image: folder scans look for them, and an image name that
ends in one keeps it (a name without one gets ``.jpg``, see :func:`dtop.data.revisited.image_file_name`)."""


def list_images(root: str | os.PathLike) -> list[Path]:
    """All image files under ``root`` (recursively, by suffix), sorted by relative path."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    found = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )
    return found


def read_image_list(source: str | os.PathLike) -> list[Path]:
    """Images of a folder, or of a text file with one path per line (relative to the file)."""
    source = Path(source)
    if source.is_dir():
        images = list_images(source)
    elif source.is_file():
        lines = [line.strip() for line in source.read_text().splitlines()]
        images = [p if p.is_absolute() else source.parent / p for p in (Path(line) for line in lines if line)]
    else:
        raise DataError(f"{source} is neither an image folder nor a list file")
    if not images:
        raise DataError(f"no images found in {source} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return images
