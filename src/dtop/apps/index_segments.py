"""The segments of an image index: which images to add, the files a segment lists, the searchable set.

A segment is one descriptor store plus ``files.json`` (its images with their size and mtime when
listed); the searchable set is the latest descriptor of every path over all segments, failures
left out. The faiss helpers build the optional faiss index over that set.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dtop.apps.index_format import FILES_FILE
from dtop.errors import ConfigError, DataError
from dtop.retrieval.faiss_index import FaissIndex
from dtop.retrieval.store import DescriptorStore
from dtop.utils.io import write_text

log = logging.getLogger(__name__)


@dataclasses.dataclass
class AddPlan:
    """Images to extract (new and modified, resolved paths with their size and mtime) and how many are unchanged."""

    paths: list[str]
    sizes: list[int]
    mtimes: list[int]
    new: list[str]
    modified: list[str]
    unchanged: int

    def files_doc(self) -> dict[str, Any]:
        """The segment's ``files.json`` content."""
        return {"format": "dtop-index-files", "paths": self.paths, "size": self.sizes, "mtime_ns": self.mtimes}


@dataclasses.dataclass
class Searchable:
    """The searchable descriptors of an index (memory-mapped where possible) and their image paths."""

    parts: list[np.ndarray]
    paths: list[str]
    #: Latest versions of images that could not be read (not searchable).
    num_failed: int
    #: Descriptors of earlier versions of re-indexed images (not searched).
    num_superseded: int


def _resolve(path: str | os.PathLike) -> str:
    return str(Path(path).expanduser().resolve())


def _stat(path: str) -> tuple[int, int]:
    """``(size, mtime_ns)`` of a file, ``(-1, -1)`` if it cannot be accessed."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return int(st.st_size), int(st.st_mtime_ns)


def known_files(root: Path, segments: Sequence[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """Resolved path → ``(size, mtime_ns)`` of every image listed by ``segments`` (the latest wins)."""
    known: dict[str, tuple[int, int]] = {}
    for seg in segments:
        path = root / seg["dir"] / FILES_FILE
        try:
            doc = json.loads(path.read_bytes())
            rows = zip(doc["paths"], doc["size"], doc["mtime_ns"], strict=True)
            found = {p: (int(s), int(m)) for p, s, m in rows}
            if not all(isinstance(p, str) for p in found):
                raise TypeError("paths must be strings")
            known.update(found)
        except (OSError, KeyError, TypeError, ValueError) as err:  # also not JSON, or not an object
            raise DataError(f"{path} is missing or damaged ({err}); the index is damaged: run the "
                            "`dtop index build` that made it again, with --overwrite") from err
    return known


def plan_additions(known: dict[str, tuple[int, int]], images: Sequence[str | os.PathLike]) -> AddPlan:
    """Which of ``images`` are new, modified or unchanged with respect to ``known`` (path, size, mtime)."""
    seen: set[str] = set()
    plan = AddPlan([], [], [], [], [], 0)
    for image in images:
        path = _resolve(image)
        if path in seen:
            continue
        seen.add(path)
        stat = _stat(path)
        if path in known and known[path] == stat:
            plan.unchanged += 1
            continue
        (plan.modified if path in known else plan.new).append(path)
        plan.paths.append(path)
        plan.sizes.append(stat[0])
        plan.mtimes.append(stat[1])
    return plan


def prepare_segment(seg_dir: Path, plan: AddPlan, shard_size: int) -> tuple[bool, int]:
    """Resume a half-written segment of the same images, or start it afresh; returns (resumed, shard_size)."""
    doc = plan.files_doc()
    files = seg_dir / FILES_FILE
    if seg_dir.exists():
        try:
            same = json.loads(files.read_text()) == doc
        except (OSError, json.JSONDecodeError):
            same = False
        if same:
            try:
                shard_size = DescriptorStore.open(seg_dir).shard_size
            except DataError:  # killed before the store was created
                pass
            log.info("resuming the half-written segment %s", seg_dir)
            return True, shard_size
        log.info("replacing the half-written segment %s of other images", seg_dir)
        shutil.rmtree(seg_dir)  # not listed in index.json: a killed run for other images
    seg_dir.mkdir(parents=True)
    write_text(files, json.dumps(doc, separators=(",", ":")) + "\n")
    return False, shard_size


def _read_segment(root: Path, seg: dict[str, Any]) -> tuple[list[str], np.ndarray | None, np.ndarray]:
    """``(paths, descriptors or None, valid)`` of one committed segment, memory-mapped."""
    try:
        store = DescriptorStore.open(root / seg["dir"])
        paths = store.images
        if store.descriptor_dim is None:  # every image of the segment failed
            return paths, None, np.zeros(len(paths), dtype=bool)
        desc, valid = store.load(numpy=True, mmap=True)
    except DataError as err:
        raise DataError(f"segment {seg['id']} of the index {root} is damaged: {err}") from err
    return paths, np.asarray(desc), np.asarray(valid, dtype=bool)


def load_searchable(root: Path, segments: Sequence[dict[str, Any]]) -> Searchable:
    """The searchable set of the index at ``root``: for a path in several segments the latest wins."""
    segs = [_read_segment(root, seg) for seg in segments]
    seen: set[str] = set()
    keeps = []
    superseded = 0
    for paths, _, _ in reversed(segs):
        latest = np.fromiter((p not in seen for p in paths), dtype=bool, count=len(paths))
        superseded += int((~latest).sum())
        seen.update(paths)
        keeps.append(latest)
    keeps.reverse()
    db = Searchable([], [], 0, superseded)
    for (paths, desc, valid), latest in zip(segs, keeps):
        db.num_failed += int((latest & ~valid).sum())
        keep = latest & valid
        if desc is None or not keep.any():
            continue
        db.parts.append(desc if keep.all() else np.asarray(desc[keep]))
        db.paths.extend(p for p, k in zip(paths, keep.tolist()) if k)
    return db


def build_faiss(db: Searchable, factory: str, search_params: str | None) -> FaissIndex:
    """Train (where the factory needs it) and fill a faiss index over all searchable descriptors."""
    dim = int(db.parts[0].shape[1])
    index = FaissIndex(dim, factory=factory, search_params=search_params)
    if not index.index.is_trained:
        try:
            index.train(db.parts)  # a bounded sample, converted to float32 part by part
        except RuntimeError as err:
            raise ConfigError(
                f"faiss cannot train '{factory}' on the {len(db.paths)} images of the index ({str(err).strip()}); "
                "an IVF index needs at least as many images as lists (ideally 40×): use fewer lists, "
                "'Flat', or --engine torch"
            ) from err
    for part in db.parts:
        index.add(part)
    return index


def faiss_min_images(factory: str, dim: int) -> int:
    """How many vectors ``factory`` needs to train: its number of IVF lists (1 if it is not IVF)."""
    probe = FaissIndex(dim, factory=factory)
    try:
        return int(probe.faiss.extract_index_ivf(probe.index).nlist)
    except RuntimeError:  # not an IVF index
        return 1
