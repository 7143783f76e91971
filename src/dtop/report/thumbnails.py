"""Thumbnails: the one way reports and contact sheets shrink images."""

from __future__ import annotations

import os

from PIL import Image, ImageOps

from dtop.data.images import load_image
from dtop.errors import DataError

RESAMPLE = Image.Resampling.LANCZOS


def fit(image: Image.Image, size: int, *, upscale: bool = False) -> Image.Image:
    """``image`` as a new RGB image, aspect ratio kept, scaled so that its longer side is at most ``size``.

    ``upscale``: smaller images are enlarged to ``size`` too (tiles of a fixed size).
    """
    image = image.convert("RGB")  # a copy even when already RGB: the caller may draw on it
    if max(image.size) <= size and not (upscale and max(image.size) < size):
        return image
    return ImageOps.contain(image, (size, size), RESAMPLE)


def load_thumbnail(
    path: str | os.PathLike, size: int, *, exif_transpose: bool = False, upscale: bool = False
) -> Image.Image | None:
    """The image file at ``path`` as a thumbnail (see :func:`fit`), or ``None`` when it cannot be read."""
    try:
        # JPEGs are decoded at a reduced scale when that still leaves enough pixels for `fit`.
        img = load_image(path, exif_transpose, draft_long_side=size)
    except DataError:
        return None
    return fit(img, size, upscale=upscale)


class ThumbnailCache:
    """Loads each image file once, as a thumbnail (see :func:`load_thumbnail`), and keeps it in memory."""

    def __init__(self, size: int, *, exif_transpose: bool = False, upscale: bool = False) -> None:
        self.size = size
        self.exif_transpose = exif_transpose
        self.upscale = upscale
        self._cache: dict[str, Image.Image | None] = {}

    def get(self, path: str | os.PathLike) -> Image.Image | None:
        """The thumbnail of the image at ``path``, or ``None`` when it cannot be read."""
        key = os.fspath(path)
        if key not in self._cache:
            self._cache[key] = load_thumbnail(key, self.size, exif_transpose=self.exif_transpose,
                                              upscale=self.upscale)
        return self._cache[key]
