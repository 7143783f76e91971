"""Training sets (SPEC §4, §7): loaders for every supported format, and the training dataset.

A :class:`TrainingSet` is a list of absolute image paths with contiguous integer labels
(``0 .. num_classes - 1``; ``class_names[label]`` is the original landmark / cluster id as a
string, sorted numerically when all ids are integers, else as strings). Loaders:

- :func:`load_sfm120k`: cirtorch's ``retrieval-SfM-120k.pkl`` (``{train, val}`` each with
  ``cids``, ``cluster``, ``qidxs``, ``pidxs``), images at ``ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>``;
  labels are the cluster ids; the query/positive tuples of the contrastive protocol are kept in
  ``extras["qidxs"]`` / ``extras["pidxs"]`` (int64 indices into ``paths``).
- :func:`load_gldv2_clean`: ``train_clean.csv`` (``landmark_id,images`` with space-separated ids),
  images at ``train/<id[0]>/<id[1]>/<id[2]>/<id>.jpg``; ``exclude`` drops the landmark ids listed in
  a file (the variant without the ROxf/RPar overlap).
- :func:`load_gldv1`: Kaggle 2018 ``train.csv`` (``id,url,landmark_id``), images at
  ``train/<id>.jpg`` (the layout the Kaggle downloader writes; the nested GLDv2 layout
  ``train/<a>/<b>/<c>/<id>.jpg`` is detected too). Many GLDv1 URLs are dead, so every copy is
  incomplete: missing images are left out (counted in ``extras["missing"]``).
- :func:`load_image_folder`: one sub-folder per class.
- :func:`load_csv`: a CSV with a path and a label column (relative paths are relative to the CSV).

The loaders do not open the images (1.5M files); ``dtop data check`` does. An image that cannot
be read during training is skipped by :class:`TrainDataset` / :func:`collate_skip_bad` and counted.

**Image sizes and the cache.** Group-size sampling needs each image's aspect ratio.
:meth:`TrainingSet.aspect_ratios` reads the image headers (PIL, lazily, in threads, with a tqdm
bar) and caches the ``(width, height)`` table as ``<root>/<name>.sizes.npy``: an int64 array of
shape ``(N + 1, 2)`` whose first row is ``(key, N)``, ``key`` being a 63-bit hash of the list of
paths (relative to ``root``), followed by one ``(width, height)`` row per image (``(0, 0)`` for an
image whose header cannot be read; its aspect ratio counts as 1). A cache whose key or length does
not match is recomputed. When ``root`` is not writable the cache goes to
``~/.cache/dtop/sizes/``. Sets derived with :meth:`TrainingSet.subset` /
:meth:`~TrainingSet.filter_min_images` (exclusion lists, class filters) share the cache of the full
set they come from, so changing a filter does not read 1.5M headers again. Sizes are those of the
stored pixel layout (no EXIF rotation), as :func:`~dtop.data.images.load_image` loads them.

**Training items.** :class:`TrainDataset` takes ``(index, (height, width))`` from the batch
samplers of :mod:`dtop.data.sampler` and returns a normalised ``(3, height, width)`` tensor and
the label, or ``None`` for an unreadable image. All randomness comes from ``torch``'s global RNG,
so seeding it per item (as the trainer does) makes the augmentation reproducible.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dtop.data.folders import IMAGE_SUFFIXES
from dtop.data.formats import TRAINING_FORMATS
from dtop.data.images import RESAMPLE, load_image, read_image_sizes, to_tensor
from dtop.errors import DataError
from dtop.utils.io import NUMPY_ARRAY_GLOBALS, atomic_path, safe_unpickle

log = logging.getLogger(__name__)

SFM_PKL = "retrieval-SfM-120k.pkl"
"""File name of the SfM-120k database pickle inside its root."""

GLDV2_CLEAN_CSV = "train_clean.csv"
"""File name of the GLDv2-clean label file inside its root."""

GLDV1_CSV = "train.csv"
"""File name of the GLDv1 label file inside its root."""

INDEX_KEYS: tuple[str, ...] = ("qidxs", "pidxs")
"""``extras`` keys holding aligned arrays of indices into ``paths`` (kept consistent by subsets)."""



# ------------------------------------------------------------------------------------- TrainingSet


@dataclass
class TrainingSet:
    """Images with contiguous class labels (see the module docstring).

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
        return root / f"{_safe_name(self.name)}.sizes.npy"

    def _fallback_cache_path(self) -> Path:
        return Path.home() / ".cache" / "dtop" / "sizes" / f"{_safe_name(self.name)}-{self._cache_key():016x}.sizes.npy"

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
        otherwise the cache (module docstring) is read, or the headers are read and the cache written.
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


def _safe_name(name: str) -> str:
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


# ---------------------------------------------------------------------------------- label helpers


def _sort_key_ids(values: Iterable[str]) -> tuple[bool, list[str]]:
    vals = list(values)
    try:
        return True, sorted(vals, key=int)
    except ValueError:
        return False, sorted(vals)


def _contiguous(raw: Sequence[Any]) -> tuple[np.ndarray, list[str]]:
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
    _, names = _sort_key_ids(uniq_set)
    index = {name: i for i, name in enumerate(names)}
    return np.fromiter((index[s] for s in strs), dtype=np.int64, count=len(strs)), names


def _build(paths: list[str], raw_labels: Sequence[Any], *, name: str, root: str | os.PathLike, what: str,
           extras: dict[str, Any] | None = None, min_images_per_class: int = 1) -> TrainingSet:
    if not paths:
        raise DataError(f"{what}: no training images found")
    labels, names = _contiguous(raw_labels)
    ts = TrainingSet(paths=paths, labels=labels, num_classes=len(names), class_names=names, name=name,
                     root=str(Path(root).absolute()), extras=dict(extras or {}))
    return ts.filter_min_images(min_images_per_class)


def _require_dir(path: Path, what: str, hint: str) -> None:
    if not path.exists():
        raise DataError(f"{what} not found: {path}. {hint}")
    if not path.is_dir():
        raise DataError(f"{what} is not a folder: {path}")


def _require_file(path: Path, what: str, hint: str) -> None:
    if not path.is_file():
        near = ""
        if path.parent.is_dir():
            listing = sorted(p.name for p in path.parent.iterdir())[:10]
            near = f" (the folder holds: {', '.join(listing) or 'nothing'})"
        raise DataError(f"{what} not found: {path}{near}. {hint}")


# ----------------------------------------------------------------------------------------- loaders


def sfm_relative_path(cid: str) -> str:
    """Relative path of SfM-120k image ``cid``: ``<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>``."""
    return f"{cid[-2:]}/{cid[-4:-2]}/{cid[-6:-4]}/{cid}"


def read_sfm_db(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read and validate ``retrieval-SfM-120k.pkl``: ``{split: {cids, cluster, qidxs, pidxs}}``.

    ``cids`` become a list of str; ``cluster`` an int64 array; ``qidxs``/``pidxs`` (optional, must
    come together) int64 arrays of indices into ``cids``.
    """
    path = Path(path)
    # Python 2 pickles hold byte strings; latin1 decodes them losslessly (ids are ASCII).
    obj = safe_unpickle(path, allowed=NUMPY_ARRAY_GLOBALS, kind="dataset pickle",
                        holds="lists, dicts, strings, numbers and numpy arrays",
                        hint="Download the official file again.", encoding="latin1")
    if not isinstance(obj, dict) or not obj:
        raise DataError(f"{path}: expected a dict of splits ({{'train': ..., 'val': ...}}), got {type(obj).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for split, db in obj.items():
        where = f"{path}: split {split!r}"
        if not isinstance(db, dict):
            raise DataError(f"{where} must be a dict with 'cids' and 'cluster', got {type(db).__name__}")
        missing = [k for k in ("cids", "cluster") if k not in db]
        if missing:
            raise DataError(f"{where} lacks {missing} (it has {sorted(map(str, db))})")
        cids = [c.decode() if isinstance(c, bytes) else c for c in list(db["cids"])]
        bad = next((c for c in cids if not isinstance(c, str) or len(c) < 6), None)
        if bad is not None:
            raise DataError(f"{where}: 'cids' must be image names of at least 6 characters, found {bad!r}")
        try:
            cluster = np.asarray(db["cluster"], dtype=np.int64).reshape(-1)
        except (TypeError, ValueError) as err:
            raise DataError(f"{where}: 'cluster' must hold integers ({err})") from err
        if cluster.shape[0] != len(cids):
            raise DataError(f"{where}: {len(cids)} cids but {cluster.shape[0]} cluster ids")
        entry: dict[str, Any] = {"cids": cids, "cluster": cluster}
        has = [k in db for k in INDEX_KEYS]
        if any(has):
            if not all(has):
                raise DataError(f"{where}: 'qidxs' and 'pidxs' must both be present or both absent")
            try:
                q = np.asarray(db["qidxs"], dtype=np.int64).reshape(-1)
                p = np.asarray(db["pidxs"], dtype=np.int64).reshape(-1)
            except (TypeError, ValueError) as err:
                raise DataError(f"{where}: 'qidxs'/'pidxs' must hold integers ({err})") from err
            if q.shape != p.shape:
                raise DataError(f"{where}: {q.size} qidxs but {p.size} pidxs; they are pairs")
            for k, a in (("qidxs", q), ("pidxs", p)):
                if a.size and (a.min() < 0 or a.max() >= len(cids)):
                    raise DataError(f"{where}: '{k}' holds indices outside 0..{len(cids) - 1}")
            entry["qidxs"], entry["pidxs"] = q, p
        out[str(split)] = entry
    return out


def load_sfm120k(root: str | os.PathLike, split: str = "train", *, min_images_per_class: int = 1) -> TrainingSet:
    """SfM-120k from ``root`` = the folder with ``retrieval-SfM-120k.pkl`` and ``ims/`` (cirtorch layout).

    Labels are the cluster ids of ``split`` (``train``: 551 clusters, ``val``: 162). The tuples of
    the contrastive protocol are in ``extras["qidxs"]``, ``extras["pidxs"]``.
    """
    root = Path(root)
    hint = "Download it with `dtop download sfm120k --root DIR` (then use DIR/retrieval-SfM-120k)."
    _require_dir(root, "SfM-120k folder", hint)
    pkl = root / SFM_PKL
    _require_file(pkl, "SfM-120k database", hint)
    ims = root / "ims"
    _require_dir(ims, "SfM-120k image folder", hint)
    db = read_sfm_db(pkl)
    if split not in db:
        raise DataError(f"{pkl}: no split {split!r}; it has {', '.join(sorted(db))}")
    entry = db[split]
    prefix = str(ims.absolute()) + os.sep
    paths = [prefix + sfm_relative_path(c).replace("/", os.sep) for c in entry["cids"]]
    extras = {k: entry[k] for k in INDEX_KEYS if k in entry}
    return _build(paths, entry["cluster"], name=f"sfm120k-{split}", root=root, what=f"{pkl} [{split}]",
                  extras=extras, min_images_per_class=min_images_per_class)


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
    _require_dir(root, "GLDv2-clean folder", hint)
    csv_path = root / GLDV2_CLEAN_CSV
    if not csv_path.is_file() and (root / "metadata" / GLDV2_CLEAN_CSV).is_file():
        csv_path = root / "metadata" / GLDV2_CLEAN_CSV
    _require_file(csv_path, "GLDv2-clean label file", hint)
    images = root / "train"
    _require_dir(images, "GLDv2 image folder", hint)
    prefix = str(images.absolute()) + os.sep
    paths: list[str] = []
    raw: list[int] = []
    with open(csv_path, encoding="utf-8", newline="") as f:
        header = _split_header(f.readline())
        try:
            c_lm, c_im = header.index("landmark_id"), header.index("images")
        except ValueError:
            raise DataError(
                f"{csv_path}: expected the columns landmark_id,images; found {', '.join(header) or 'nothing'}"
            ) from None
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
    full = _build(paths, raw, name="gldv2-clean", root=root, what=str(csv_path))
    ts = full
    if exclude is not None:
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
    return ts.filter_min_images(min_images_per_class)


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
    _require_dir(root, "GLDv1 folder", hint)
    csv_path = root / GLDV1_CSV
    _require_file(csv_path, "GLDv1 label file", hint)
    images = root / "train"
    _require_dir(images, "GLDv1 image folder", hint)
    if layout not in ("auto", "flat", "nested"):
        raise DataError(f"GLDv1 layout must be auto, flat or nested, got {layout!r}")
    ids: list[str] = []
    raw: list[int] = []
    no_label = 0
    with open(csv_path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        try:
            c_id, c_lm = header.index("id"), header.index("landmark_id")
        except ValueError:
            raise DataError(
                f"{csv_path}: expected the columns id,url,landmark_id; found {', '.join(header) or 'nothing'}"
            ) from None
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
    return _build(paths, raw, name="gldv1", root=root, what=str(csv_path), extras=extras,
                  min_images_per_class=min_images_per_class)


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


def load_image_folder(root: str | os.PathLike, *, min_images_per_class: int = 1) -> TrainingSet:
    """A folder per class: ``root/<class>/**/<image>`` (class names = folder names, sorted).

    Hidden folders and files are ignored, and so are images directly in ``root`` (they have no
    class; a warning says how many). Images are found by suffix (``.jpg``, ``.png``, ...).
    """
    root = Path(root)
    _require_dir(root, "image folder", "Give a folder with one sub-folder of images per class.")
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
    return _build(paths, raw, name=_safe_name(root.absolute().name), root=root, what=str(root),
                  min_images_per_class=min_images_per_class)


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
    return _build(paths, raw, name=_safe_name(path.stem), root=path.parent, what=str(path),
                  min_images_per_class=min_images_per_class)


# ------------------------------------------------------------------------------------- the dataset


class TrainDataset(Dataset):
    """Training images at the batch's common size: ``dataset[(index, (H, W))] -> (tensor, label) | None``.

    Without augmentation the image is centre-cropped to the aspect ratio ``W / H`` (the sampler's
    bucket is close to the image's own ratio, so little is cut) and resized to exactly ``H × W``.
    With augmentation (random-resized-crop style, aspect kept near the bucket's):

    - a crop of the target aspect ratio times a factor in ``[1/ratio_jitter, ratio_jitter]``,
      covering a fraction of ``scale`` of the largest such crop's area, at a random position;
      resized to ``H × W`` (so the content is stretched by at most ``ratio_jitter``);
    - a horizontal flip with probability ``flip`` (0.5);
    - colour jitter (brightness, contrast, saturation each ± ``color_jitter``).

    Then ``(x / 255 - mean) / std``. An image that cannot be loaded gives ``None`` (and a warning
    for the first ``max_warnings`` of a process); :func:`collate_skip_bad` drops it.
    """

    def __init__(
        self,
        training_set: TrainingSet,
        augment: bool,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio_jitter: float = 1.1,
        flip: float = 0.5,
        color_jitter: float = 0.2,
        max_warnings: int = 20,
    ) -> None:
        self.training_set = training_set
        self.augment = bool(augment)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if not (0 < scale[0] <= scale[1] <= 1):
            raise DataError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if ratio_jitter < 1:
            raise DataError(f"ratio_jitter must be >= 1, got {ratio_jitter}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio_jitter = float(ratio_jitter)
        self.flip = float(flip)
        self.color_jitter = float(color_jitter)
        self.max_warnings = int(max_warnings)
        self._warned = 0
        self._jitter = None
        if self.augment and self.color_jitter > 0:
            from torchvision.transforms import v2

            c = self.color_jitter
            self._jitter = v2.ColorJitter(brightness=c, contrast=c, saturation=c)

    def __len__(self) -> int:
        return len(self.training_set)

    def _crop_box(self, w: int, h: int, target: float) -> tuple[float, float, float, float]:
        if self.augment:
            lo = math.log(1.0 / self.ratio_jitter)
            ratio = target * math.exp(lo + (-2 * lo) * float(torch.rand(())))
        else:
            ratio = target
        # The largest crop of aspect `ratio` inside the image.
        if w / h > ratio:
            ch, cw = float(h), h * ratio
        else:
            cw, ch = float(w), w / ratio
        if self.augment:
            s0, s1 = self.scale
            area = s0 + (s1 - s0) * float(torch.rand(()))
            k = math.sqrt(area)
            cw, ch = cw * k, ch * k
            x0 = (w - cw) * float(torch.rand(()))
            y0 = (h - ch) * float(torch.rand(()))
        else:
            x0, y0 = (w - cw) / 2.0, (h - ch) / 2.0
        return x0, y0, x0 + cw, y0 + ch

    def load(self, index: int, size: tuple[int, int]) -> Image.Image:
        """The transformed PIL image (before normalisation) of ``index`` at ``size`` = (H, W); may raise."""
        height, width = int(size[0]), int(size[1])
        if height < 1 or width < 1:
            raise DataError(f"invalid training size {size!r}; expected (height, width)")
        path = self.training_set.paths[index]
        img = load_image(path, draft_long_side=max(height, width))
        w, h = img.size
        box = self._crop_box(w, h, width / height)
        out = img.resize((width, height), resample=RESAMPLE, box=box)
        if self.augment:
            if self.flip > 0 and float(torch.rand(())) < self.flip:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if self._jitter is not None:
                out = self._jitter(out)
        return out

    def __getitem__(self, item: Any) -> tuple[torch.Tensor, int] | None:
        if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[1], tuple | list)):
            raise DataError(
                "TrainDataset items are (index, (height, width)) from a batch sampler of dtop.data.sampler; "
                f"got {item!r}"
            )
        index = int(item[0])
        label = int(self.training_set.labels[index])
        try:
            img = self.load(index, (int(item[1][0]), int(item[1][1])))
        except (DataError, OSError, ValueError, Image.DecompressionBombError) as err:
            if self._warned < self.max_warnings:
                self._warned += 1
                more = " (further warnings of this worker are suppressed)" if self._warned == self.max_warnings else ""
                log.warning("skipping training image %d: %s%s", index, err, more)
            return None
        return to_tensor(img, self.mean, self.std), label


def collate_skip_bad(
    batch: Sequence[tuple[torch.Tensor, int] | None],
) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """DataLoader ``collate_fn`` for :class:`TrainDataset`: drop unreadable images (``None``).

    Returns ``(images (B, 3, H, W), labels int64 (B,), n_skipped)``; when every image of the batch
    was unreadable, ``(None, None, n_skipped)``.
    """
    good = [b for b in batch if b is not None]
    n_skipped = len(batch) - len(good)
    if not good:
        return None, None, n_skipped
    shapes = {tuple(g[0].shape) for g in good}
    if len(shapes) != 1:
        raise DataError(
            f"a training batch mixes image sizes {sorted(shapes)}; use a batch sampler of dtop.data.sampler"
        )
    images = torch.stack([g[0] for g in good])
    labels = torch.tensor([int(g[1]) for g in good], dtype=torch.int64)
    return images, labels, n_skipped


def collate_tuples(
    batch: Sequence[tuple[torch.Tensor, int] | None], tuple_size: int
) -> tuple[torch.Tensor | None, None, int]:
    """DataLoader ``collate_fn`` for batches of tuples ``(q, p, n1 … nk)`` laid out one after the other.

    A tuple with an unreadable image is dropped whole (its loss needs every image). Returns
    ``(images (T * tuple_size, 3, H, W), None, n_skipped)`` with ``n_skipped`` the images of the
    dropped tuples; ``(None, None, n_skipped)`` when no tuple is left.
    """
    if len(batch) % tuple_size:
        raise DataError(f"a batch of {len(batch)} images is not made of tuples of {tuple_size}")
    kept: list[tuple[torch.Tensor, int]] = []
    for start in range(0, len(batch), tuple_size):
        one = batch[start : start + tuple_size]
        if all(item is not None for item in one):
            kept.extend(one)
    images, _, _ = collate_skip_bad(kept) if kept else (None, None, 0)
    return images, None, len(batch) - len(kept)


# ------------------------------------------------------------------------------------------ by name

FORMATS: tuple[str, ...] = TRAINING_FORMATS
"""The training-set formats (``data.format`` of the training config)."""


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
    """Load a training set of ``format`` (one of :data:`FORMATS`); ``csv_path`` for ``csv`` (else ``root``)."""
    fmt = str(format).lower()
    if fmt not in FORMATS:
        raise DataError(f"unknown training-set format {format!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "csv":
        source = csv_path or root
        if source is None:
            raise DataError("format csv needs the CSV file (path,label)")
        return load_csv(source, path_column, label_column, min_images_per_class=min_images_per_class)
    if root is None:
        raise DataError(f"format {fmt} needs the data folder")
    if exclude is not None and fmt != "gldv2-clean":
        raise DataError(f"an exclusion list applies to gldv2-clean only, not {fmt}")
    if fmt == "sfm120k":
        return load_sfm120k(root, split, min_images_per_class=min_images_per_class)
    if fmt == "gldv2-clean":
        return load_gldv2_clean(root, exclude, min_images_per_class=min_images_per_class)
    if fmt == "gldv1":
        return load_gldv1(root, skip_missing=skip_missing, min_images_per_class=min_images_per_class)
    return load_image_folder(root, min_images_per_class=min_images_per_class)
