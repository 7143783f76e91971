"""SfM-120k (cirtorch's ``retrieval-SfM-120k.pkl`` and ``ims/``): labels are the cluster ids."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from dtop.data.training.common import build_set, require_dir, require_file
from dtop.data.training.trainingset import INDEX_KEYS, TrainingSet
from dtop.errors import DataError
from dtop.utils.io import NUMPY_ARRAY_GLOBALS, safe_unpickle

SFM_PKL = "retrieval-SfM-120k.pkl"
"""File name of the SfM-120k database pickle inside its root."""


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
    require_dir(root, "SfM-120k folder", hint)
    pkl = root / SFM_PKL
    require_file(pkl, "SfM-120k database", hint)
    ims = root / "ims"
    require_dir(ims, "SfM-120k image folder", hint)
    db = read_sfm_db(pkl)
    if split not in db:
        raise DataError(f"{pkl}: no split {split!r}; it has {', '.join(sorted(db))}")
    entry = db[split]
    prefix = str(ims.absolute()) + os.sep
    paths = [prefix + sfm_relative_path(c).replace("/", os.sep) for c in entry["cids"]]
    extras = {k: entry[k] for k in INDEX_KEYS if k in entry}
    return build_set(paths, entry["cluster"], name=f"sfm120k-{split}", root=root, what=f"{pkl} [{split}]",
                     extras=extras, min_images_per_class=min_images_per_class)

