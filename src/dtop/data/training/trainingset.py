"""The training set (image paths with contiguous labels) and its cache of image sizes.

Group-size sampling needs each image's aspect ratio: :meth:`TrainingSet.image_sizes` reads the
image headers once and caches them as ``<root>/<name>.sizes.npy`` (``docs/data.md`` describes the
file and when it is recomputed); sets derived with :meth:`TrainingSet.subset` share the cache of
the full set.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dtop.data.images import read_image_sizes
from dtop.errors import DataError
from dtop.utils.io import atomic_path

log = logging.getLogger(__name__)

INDEX_KEYS: tuple[str, ...] = ("qidxs", "pidxs")
"""``extras`` keys holding aligned arrays of indices into ``paths`` (kept consistent by subsets)."""



# ------------------------------------------------------------------------------------- TrainingSet


@dataclass
class TrainingSet:
    """Images with contiguous class labels.

    ``paths``: absolute image paths. ``labels``: int64 array in ``0 .. num_classes - 1``.
    ``class_names[label]``: the original id. ``sizes``: ``(N, 2)`` width, height if known.
    ``root``: the data folder (the sizes cache goes there). ``extras``: format-specific data, e.g.
    the SfM-120k tuples ``qidxs``/``pidxs`` (indices into ``paths``), ``missing`` (GLDv1).
    """

    paths: list[str]
    labels: np.ndarray
    num_classes: int
    class_names: list[str]
    sizes: np.ndarray | None = None
    name: str = "train"
    root: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    # The full set this one was derived from and the indices into it (shares its sizes cache).
    base: TrainingSet | None = field(default=None, repr=False, compare=False)
    base_indices: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.paths = [str(p) for p in self.paths]
        n = len(self.paths)
        if n == 0:
            raise DataError(f"training set {self.name!r} is empty: no images (check the data folder and filters)")
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if self.labels.shape[0] != n:
            raise DataError(f"training set {self.name!r}: {n} paths but {self.labels.shape[0]} labels")
        self.num_classes = int(self.num_classes)
        if len(self.class_names) != self.num_classes:
            raise DataError(
                f"training set {self.name!r}: {len(self.class_names)} class names for {self.num_classes} classes"
            )
        self.class_names = [str(c) for c in self.class_names]
        if self.labels.min() < 0 or self.labels.max() >= self.num_classes:
            raise DataError(
                f"training set {self.name!r}: labels must lie in 0..{self.num_classes - 1}, "
                f"found {int(self.labels.min())}..{int(self.labels.max())}"
            )
        if self.sizes is not None:
            self.sizes = np.asarray(self.sizes, dtype=np.int64)
            if self.sizes.shape != (n, 2):
                raise DataError(f"training set {self.name!r}: sizes must have shape ({n}, 2), got {self.sizes.shape}")

    def __len__(self) -> int:
        return len(self.paths)

    # ------------------------------------------------------------------ sizes

    def cache_path(self) -> Path:
        """Where the ``(width, height)`` cache of this set lives (``<root>/<name>.sizes.npy``)."""
        root = Path(self.root) if self.root else Path(os.path.commonpath(self.paths[:1000]) or ".")
        if root.is_file():
            root = root.parent
        return root / f"{safe_name(self.name)}.sizes.npy"

    def _fallback_cache_path(self) -> Path:
        return Path.home() / ".cache" / "dtop" / "sizes" / f"{safe_name(self.name)}-{self._cache_key():016x}.sizes.npy"

    def _cache_key(self) -> int:
        root = str(Path(self.root).absolute()) if self.root else ""
        prefix = root.rstrip(os.sep) + os.sep if root else ""
        h = hashlib.sha1()
        for p in self.paths:
            h.update((p[len(prefix):] if prefix and p.startswith(prefix) else p).encode("utf-8", "surrogateescape"))
            h.update(b"\n")
        return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)

    def image_sizes(self, *, cache: bool = True, workers: int | None = None, progress: bool = True) -> np.ndarray:
        """``(N, 2)`` int64 width, height of every image (``(0, 0)`` when the header is unreadable).

        Known sizes are returned as they are; a derived set takes them from the full set it came from;
        otherwise the size cache (``<root>/<name>.sizes.npy``, see ``docs/data.md``) is read, or the
        headers are read and the cache written.
        """
        if self.sizes is not None:
            return self.sizes
        if self.base is not None and self.base_indices is not None:
            self.sizes = self.base.image_sizes(cache=cache, workers=workers, progress=progress)[self.base_indices]
            return self.sizes
        n = len(self.paths)
        key = self._cache_key() if cache else 0
        if cache:
            for path in (self.cache_path(), self._fallback_cache_path()):
                table = _read_size_cache(path, key, n)
                if table is not None:
                    self.sizes = table
                    return table
        sizes = read_image_sizes(self.paths, workers=workers, progress=progress, desc=f"image sizes ({self.name})")
        if cache:
            table = np.concatenate([np.array([[key, n]], dtype=np.int64), sizes], axis=0)
            for path in (self.cache_path(), self._fallback_cache_path()):
                try:
                    with atomic_path(path) as tmp:
                        with open(tmp, "wb") as f:
                            np.save(f, table, allow_pickle=False)
                    break
                except OSError as err:
                    log.warning("cannot write the image-size cache %s (%s)", path, err)
        self.sizes = sizes
        return sizes

    def aspect_ratios(self, *, cache: bool = True, workers: int | None = None, progress: bool = True) -> np.ndarray:
        """Aspect ratio width / height of every image (float64, 1.0 where the size is unknown)."""
        sizes = self.image_sizes(cache=cache, workers=workers, progress=progress).astype(np.float64)
        w, h = sizes[:, 0], sizes[:, 1]
        ok = (w > 0) & (h > 0)
        out = np.ones(len(self), dtype=np.float64)
        out[ok] = w[ok] / h[ok]
        return out

    # ------------------------------------------------------------------ subsets

    def images_per_class(self) -> np.ndarray:
        """Number of images of each class (int64, length ``num_classes``)."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    def subset(self, indices: Sequence[int] | np.ndarray, remap_labels: bool = False, name: str | None = None
               ) -> TrainingSet:
        """The images at ``indices`` (in that order).

        By default the label space is kept (``num_classes`` and ``class_names`` unchanged, so a
        classifier trained on the subset fits the full set); ``remap_labels=True`` keeps only the
        classes that occur and renumbers them ``0..K-1`` in their original order. The index
        extras (``qidxs``/``pidxs``) keep the pairs whose two images are both in the subset.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise DataError(f"subset indices must lie in 0..{len(self) - 1}")
        labels = self.labels[idx]
        class_names = self.class_names
        num_classes = self.num_classes
        if remap_labels:
            used = np.unique(labels)
            lut = np.full(self.num_classes, -1, dtype=np.int64)
            lut[used] = np.arange(used.size)
            labels = lut[labels]
            class_names = [self.class_names[i] for i in used]
            num_classes = int(used.size)
        extras = _subset_extras(self.extras, idx, len(self))
        if self.sizes is not None:
            base, base_idx, sizes = None, None, self.sizes[idx]
        elif self.base is not None and self.base_indices is not None:
            base, base_idx, sizes = self.base, self.base_indices[idx], None
        else:
            base, base_idx, sizes = self, idx, None
        return TrainingSet(
            paths=[self.paths[i] for i in idx.tolist()],
            labels=labels,
            num_classes=num_classes,
            class_names=list(class_names),
            sizes=sizes,
            name=name or self.name,
            root=self.root,
            extras=extras,
            base=base,
            base_indices=base_idx,
        )

    def filter_min_images(self, min_images: int) -> TrainingSet:
        """Drop the classes with fewer than ``min_images`` images (labels renumbered contiguously)."""
        min_images = int(min_images)
        if min_images <= 1:
            return self
        counts = self.images_per_class()
        keep = counts[self.labels] >= min_images
        if not keep.any():
            raise DataError(
                f"training set {self.name!r}: no class has at least {min_images} images "
                f"(the largest has {int(counts.max())}); lower min_images_per_class"
            )
        if keep.all():
            return self
        out = self.subset(np.flatnonzero(keep), remap_labels=True)
        out.extras["dropped_classes"] = int((counts > 0).sum() - (counts >= min_images).sum())
        out.extras["dropped_images"] = int((~keep).sum())
        return out

    def summary(self) -> dict[str, Any]:
        """Counts: images, classes (with at least one image), images per class min/median/max."""
        counts = self.images_per_class()
        counts = counts[counts > 0]
        return {
            "name": self.name,
            "images": len(self),
            "classes": int(counts.size),
            "images_per_class": {
                "min": int(counts.min()),
                "median": float(np.median(counts)),
                "max": int(counts.max()),
            },
        }


def safe_name(name: str) -> str:
    """``name`` with every character but letters, digits and ``-_.`` replaced by ``_`` (a file name)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "train"


def _read_size_cache(path: Path, key: int, n: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        table = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        log.warning("ignoring the unreadable image-size cache %s (%s)", path, err)
        return None
    if table.ndim != 2 or table.shape != (n + 1, 2) or int(table[0, 0]) != key or int(table[0, 1]) != n:
        return None
    return table[1:].astype(np.int64)


def _subset_extras(extras: dict[str, Any], idx: np.ndarray, n: int) -> dict[str, Any]:
    out = {k: v for k, v in extras.items() if k not in INDEX_KEYS}
    if all(k in extras for k in INDEX_KEYS):
        new_pos = np.full(n, -1, dtype=np.int64)
        new_pos[idx] = np.arange(idx.size)
        arrays = [new_pos[np.asarray(extras[k], dtype=np.int64)] for k in INDEX_KEYS]
        keep = np.all([a >= 0 for a in arrays], axis=0)
        for k, a in zip(INDEX_KEYS, arrays):
            out[k] = a[keep]
    return out

