"""An on-disk image index of a user's own photos: build it, add new images, search it.

The folder layout, how images are identified, and why updates are atomic: docs/index.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from dtop import __version__
from dtop.apps.index_format import (
    FAISS_FILE_RE,
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    LOCK_FILE,
    MODEL_FILE,
    check_engine,
    check_new_folder,
    faiss_file,
    read_index_meta,
    remove_own_files,
    segment_dir,
)
from dtop.apps.index_results import AddReport, SearchResult
from dtop.apps.index_segments import (
    AddPlan,
    Searchable,
    build_faiss,
    faiss_min_images,
    known_files,
    load_searchable,
    plan_additions,
    prepare_segment,
)
from dtop.engine.extract import extract_to_store, extract_with_failures
from dtop.engine.runtime import resolve_device
from dtop.engine.settings import ExtractSettings, check_runtime
from dtop.errors import ConfigError, DataError
from dtop.models.base import RetrievalModel
from dtop.models.identity import model_fingerprint
from dtop.retrieval.faiss_index import FaissIndex
from dtop.retrieval.postprocess import PostProcessing
from dtop.retrieval.search import search
from dtop.utils.io import write_json
from dtop.utils.locks import file_lock, utc_now
from dtop.utils.paths import show_path


def _locked(root: Path) -> contextlib.AbstractContextManager[None]:
    """Hold the index's write lock (non-blocking: a second writer gets a clear error)."""
    return file_lock(
        root / LOCK_FILE,
        busy_error=f"another dtop process is building or adding to the index {root} (it holds {root / LOCK_FILE}); "
        "wait for it to finish, then run the command again",
    )


class ImageIndex:
    """An image index folder; make one with :meth:`create` (or :func:`build_image_index`), or :meth:`open` it."""

    def __init__(self, root: Path, meta: dict[str, Any]) -> None:
        self.root = root
        self.meta = meta
        self._model: RetrievalModel | None = None
        self._db: tuple[int, Searchable] | None = None
        #: Whether :meth:`create` found this index already there (same model and settings) and reopened it.
        self.reopened = False

    # ---------------------------------------------------------------------------- construction

    @classmethod
    def open(cls, root: str | os.PathLike) -> Self:
        """Open an existing index (clear errors for a missing folder or one that is not an index)."""
        root = Path(root)
        return cls(root, read_index_meta(root))

    @classmethod
    def create(
        cls,
        root: str | os.PathLike,
        model: RetrievalModel,
        settings: ExtractSettings | None = None,
        *,
        source: str | None = None,
        engine: str = "torch",
        factory: str | None = None,
        search_params: str | None = None,
        overwrite: bool = False,
    ) -> Self:
        """Create an empty index of ``model`` at ``root`` (a new or empty folder).

        If ``root`` already is an index of the same model (by fingerprint), settings and search
        engine, it is opened instead (so that rerunning a killed build resumes it); another model
        or other settings are an error unless ``overwrite`` or the index has no segment yet; the
        index's own files are then removed (never other files: a folder holding anything else is
        refused). ``engine`` is ``torch`` (exact) or ``faiss`` with an index-factory string
        ``factory`` (default ``Flat``) and default ``search_params`` (e.g. ``nprobe=16``).
        ``source`` records where the model came from (informational).
        """
        root = Path(root)
        settings = settings or ExtractSettings()
        engine, factory = check_engine(engine, factory)
        if factory is not None:  # engine faiss: fail now on a bad factory string or a missing faiss
            FaissIndex(model.descriptor_dim, factory=factory, search_params=search_params)
        if (root / INDEX_FILE).is_file() and not overwrite:
            index = cls.open(root)
            diffs = index._differences(model, settings, engine, factory)
            if diffs and index.meta["segments"]:
                raise DataError(
                    f"{root} already is an index of another model or other settings (" + "; ".join(diffs[:6])
                    + f"). Add images to it with `dtop index add --index {root} --images DIR` (it uses its own "
                    "model and settings), choose another --out, or pass --overwrite to rebuild it."
                )
            if not diffs:
                index.reopened = True
                return index
            # an index without segments holds nothing but its model: replace it
        check_new_folder(root)
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root):
            remove_own_files(root)
            from dtop.models import load_model, save_checkpoint

            save_checkpoint(model, root / MODEL_FILE)  # with the model's checkpoint extras
            loaded = load_model(root / MODEL_FILE)
            meta = _new_meta(loaded, settings, source, engine, factory, search_params)
            write_json(root / INDEX_FILE, meta)
        index = cls(root, meta)
        index._model = loaded
        return index

    def _differences(self, model: RetrievalModel, settings: ExtractSettings, engine: str, factory: str | None
                     ) -> list[str]:
        diffs = []
        stored = {**dataclasses.asdict(ExtractSettings()), **self.meta["settings"]}  # newer keys: their defaults
        for key, value in json.loads(json.dumps(dataclasses.asdict(settings))).items():
            if stored.get(key) != value:
                diffs.append(f"{key}: index has {stored.get(key)!r}, requested {value!r}")
        search_meta = self.meta["search"]
        if search_meta.get("engine") != engine or search_meta.get("factory") != factory:
            diffs.append(
                f"search engine: index has {search_meta.get('engine')} {search_meta.get('factory') or ''}".rstrip()
                + f", requested {engine} {factory or ''}".rstrip()
            )
        fingerprint = model_fingerprint(model)
        if fingerprint != self.model_fingerprint:
            diffs.append(f"model: index has fingerprint {self.model_fingerprint}, requested {fingerprint}")
        return diffs

    # ------------------------------------------------------------------------------ properties

    @property
    def settings(self) -> ExtractSettings:
        """The extraction settings of the index (used for its images and for queries)."""
        return ExtractSettings(**self.meta["settings"])  # checked when index.json was read

    @property
    def engine(self) -> str:
        """``torch`` (exact search) or ``faiss``."""
        return str(self.meta["search"]["engine"])

    @property
    def model_fingerprint(self) -> str:
        """Fingerprint of the index's model."""
        return str(self.meta["model"]["fingerprint"])

    @property
    def segments(self) -> list[dict[str, Any]]:
        """The committed segments (id, dir, counts), in order."""
        return list(self.meta["segments"])

    @property
    def paths(self) -> list[str]:
        """Paths of the searchable images; search indices refer to this list."""
        return self._database().paths

    def __len__(self) -> int:
        return len(self.paths)

    def load_model(self, device: str | None = None) -> RetrievalModel:
        """The index's model (from ``model.safetensors``, checked against the recorded fingerprint)."""
        if self._model is None:
            from dtop.models import load_model

            path = self.root / MODEL_FILE
            if not path.is_file():
                raise DataError(f"{path} is missing: the index is damaged; rebuild it with `dtop index build`")
            model = load_model(path)
            found = model_fingerprint(model)
            if found != self.model_fingerprint:
                raise DataError(
                    f"{path} does not match {INDEX_FILE} (fingerprint {found}, expected {self.model_fingerprint}): "
                    "the model file was replaced or damaged; rebuild the index"
                )
            self._model = model
        if device is not None:
            self._model = self._model.to(resolve_device(device))
        return self._model

    def summary(self) -> dict[str, Any]:
        """Counts and settings of the index (what ``dtop index info`` prints)."""
        db = self._database()
        return {
            "index": str(self.root),
            "images": len(db.paths),
            "unreadable": db.num_failed,
            "superseded": db.num_superseded,
            "segments": len(self.meta["segments"]),
            "descriptor_dim": self.meta["model"]["descriptor_dim"],
            "model": {k: self.meta["model"].get(k) for k in ("source", "fingerprint", "arch")},
            "settings": self.meta["settings"],
            "search": {k: v for k, v in self.meta["search"].items() if v is not None},
            "updated": self.meta.get("updated"),
        }

    # ---------------------------------------------------------------------------------- adding

    def plan(self, images: Sequence[str | os.PathLike]) -> AddPlan:
        """Which of ``images`` are new, modified or unchanged (by resolved path, size and mtime)."""
        return plan_additions(known_files(self.root, self.meta["segments"]), images)

    def add(
        self,
        images: Sequence[str | os.PathLike],
        *,
        batch_size: int | None = None,
        num_workers: int | None = None,
        device: str | None = None,
        amp: str = "auto",
        shard_size: int = 1000,
        progress: bool = True,
    ) -> AddReport:
        """Extract the new and modified ones among ``images`` into a new segment and commit it.

        Unchanged images are skipped; unreadable ones are recorded and reported, never fatal.
        Resumes the half-written segment of a killed run when the images to add are the same.
        Rebuilds the faiss index (engine ``faiss``). Returns what was done.
        """
        check_runtime({"batch_size": batch_size, "num_workers": num_workers, "shard_size": shard_size})
        with _locked(self.root):
            self.meta = read_index_meta(self.root)  # what other writers committed
            plan = self.plan(images)
            seg_id = 1 + max((int(s["id"]) for s in self.meta["segments"]), default=-1)
            seg_dir = self.root / segment_dir(seg_id)
            if not plan.paths:
                if seg_dir.exists():  # an abandoned half segment: its images are indexed by now
                    shutil.rmtree(seg_dir)
                if self.engine == "faiss" and not self._faiss_is_current():
                    self._commit(None)
                return AddReport(None, [], [], plan.unchanged, [])
            if self.engine == "faiss":
                self._check_faiss_size(len(self._database().paths) + len(plan.paths))
            resumed, shard_size = prepare_segment(seg_dir, plan, shard_size)
            model = self.load_model()
            store = extract_to_store(
                model, plan.paths, seg_dir, settings=self.settings, batch_size=batch_size,
                num_workers=num_workers, device=device, amp=amp, skip_bad=True, shard_size=shard_size,
                progress=progress,
            )
            if not store.is_complete():  # every image must have a descriptor or a recorded failure
                missing = store.missing_shards()
                raise DataError(
                    f"the extraction of segment {seg_id} ended with {len(missing)} of {store.num_shards} shard(s) "
                    f"unwritten; nothing was added to {self.root}. Run the same command again to resume (the "
                    "finished shards are kept)"
                )
            if store.descriptor_dim is not None:
                store.load(numpy=True, mmap=True)  # consolidate now: committed segments are never written again
            failures = store.failures()
            self._commit({
                "id": seg_id,
                "dir": segment_dir(seg_id),
                "num_images": len(plan.paths),
                "num_failed": len(failures),
                "new": len(plan.new),
                "modified": len(plan.modified),
                "created": utc_now(),
            })
            return AddReport(seg_id, plan.new, plan.modified, plan.unchanged, failures, resumed)

    def _commit(self, segment: dict[str, Any] | None) -> None:
        """Rebuild the faiss index if any, then rewrite ``index.json`` atomically."""
        meta = json.loads(json.dumps(self.meta))
        if segment is not None:
            meta["segments"].append(segment)
        meta["generation"] = int(meta["generation"]) + 1
        db = self._database(meta)
        meta["num_images"] = len(db.paths)
        search_meta = meta["search"]
        failure: ConfigError | None = None
        if search_meta["engine"] == "faiss":
            search_meta["file"], search_meta["ntotal"] = None, 0
            if db.paths:
                name = faiss_file(meta["generation"])
                try:
                    faiss_index = build_faiss(db, search_meta["factory"], search_meta.get("search_params"))
                    faiss_index.save(self.root / name)
                    search_meta["file"], search_meta["ntotal"] = name, len(db.paths)
                except ConfigError as err:  # keep the extracted segment; exact search still works
                    failure = err
        meta["updated"] = utc_now()
        write_json(self.root / INDEX_FILE, meta)
        self.meta = meta
        for p in self.root.iterdir():  # faiss files of earlier commits (or of a killed one)
            if FAISS_FILE_RE.match(p.name) and p.name != search_meta.get("file"):
                p.unlink(missing_ok=True)
        if failure is not None:
            raise ConfigError(
                f"{failure}. The images were added to {self.root}, but it has no faiss index now: search it "
                "with --exact, or rebuild it with another factory (dtop index build ... --overwrite)"
            ) from failure

    def _check_faiss_size(self, n_images: int) -> None:
        """Fail before extracting when an IVF factory has more lists than the index will have images."""
        factory = self.meta["search"]["factory"]
        need = faiss_min_images(factory, int(self.meta["model"]["descriptor_dim"]))
        if n_images < need:
            raise ConfigError(
                f"the faiss index '{factory}' of {self.root} needs at least {need} images to train, but the index "
                f"would hold at most {n_images}; add more images at once, or rebuild the index with fewer IVF "
                "lists, --factory Flat or --engine torch (exact search)"
            )

    def _faiss_is_current(self) -> bool:
        search_meta = self.meta["search"]
        n = len(self._database().paths)
        if n == 0:
            return True
        file = search_meta.get("file")
        return bool(file) and (self.root / file).is_file() and int(search_meta.get("ntotal", -1)) == n

    # ---------------------------------------------------------------------------------- reading

    def _database(self, meta: dict[str, Any] | None = None) -> Searchable:
        """The searchable set of ``meta`` (default: the index as opened; cached per generation)."""
        meta = meta or self.meta
        generation = int(meta["generation"])
        if meta is self.meta and self._db is not None and self._db[0] == generation:
            return self._db[1]
        db = load_searchable(self.root, meta["segments"])
        if meta is self.meta:
            self._db = (generation, db)
        return db

    def search(
        self,
        queries: Any,
        topk: int = 10,
        *,
        exact: bool = False,
        search_params: str | None = None,
        device: str | None = None,
        post: PostProcessing | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``topk`` of query descriptors ``(n, d)``: ``(scores, indices)`` into :attr:`paths`.

        Exact (torch) search unless the index uses faiss and not ``exact``; ``search_params``
        overrides the faiss search parameters stored in the index (e.g. ``nprobe=32``). With an
        approximate faiss index, missing results have index -1. ``post``: post-processing of both
        sides at query time (the index is not changed) and re-ranking; the search is then exact.
        """
        db = self._database()
        if not db.paths:
            raise DataError(
                f"the index {self.root} holds no searchable images yet"
                + (f" ({db.num_failed} unreadable)" if db.num_failed else "")
                + f"; add some with `dtop index add --index {self.root} --images DIR`"
            )
        if post is not None and len(post):
            if search_params:
                raise ConfigError("search parameters apply to faiss indexes only; with post-processing the search "
                                  "is exact (torch)")
            with warnings.catch_warnings():  # read-only memory maps: torch.cat copies them, nothing writes to them
                warnings.simplefilter("ignore", UserWarning)
                database = torch.cat([torch.as_tensor(np.asarray(p)) for p in db.parts])  # float16 stays float16
            q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
            return post.search(q, database, topk, device=resolve_device(device) if device else None)
        if self.engine == "faiss" and not exact:
            if not self._faiss_is_current():
                raise DataError(
                    f"the faiss index of {self.root} is missing or out of date; rebuild it with "
                    f"`dtop index add --index {self.root} --images DIR` or search with --exact"
                )
            params = search_params if search_params is not None else self.meta["search"].get("search_params")
            index = FaissIndex.load(self.root / self.meta["search"]["file"], search_params=params)
            return index.search(queries, topk)
        if search_params:
            raise ConfigError("search parameters apply to faiss indexes only; this search is exact (torch)")
        return search(queries, db.parts, topk, device=resolve_device(device) if device else None)

    def query(
        self,
        images: Sequence[str | os.PathLike],
        topk: int = 10,
        *,
        exact: bool = False,
        search_params: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        device: str | None = None,
        amp: str = "auto",
        progress: bool = False,
        post: PostProcessing | None = None,
    ) -> list[SearchResult]:
        """Extract query images with the index's model and settings (whole image) and search them.

        ``post``: post-processing and re-ranking at query time (see :meth:`search`). An unreadable
        query gets a result with its ``error`` and no matches, the others are searched; only when no
        query can be read is it a :class:`DataError`.
        """
        names = [os.fsdecode(p) for p in images]
        if not names:
            raise ConfigError("give at least one query image")
        db = self._database()
        if not db.paths:
            self.search(np.zeros((1, 1), dtype=np.float32), topk)  # raises the "empty index" error
        model = self.load_model()
        desc, failures = extract_with_failures(model, names, settings=self.settings, batch_size=batch_size,
                                               num_workers=num_workers, device=device, amp=amp, progress=progress)
        failed = {f.index: f.reason for f in failures}
        readable = [i for i in range(len(names)) if i not in failed]
        if not readable:
            first = failures[0]
            more = f"; and {len(failures) - 1} more" if len(failures) > 1 else ""
            raise DataError(f"no query image could be read ({show_path(first.path)}: {first.reason}{more}); "
                            "give image files dtop can read")
        scores, indices = self.search(desc[readable].numpy(), topk, exact=exact, search_params=search_params,
                                      device=device, post=post)
        rows = dict(zip(readable, zip(scores, indices)))
        results = []
        for i, q in enumerate(names):
            if i in failed:
                results.append(SearchResult(q, [], [], error=failed[i]))
                continue
            s_row, i_row = rows[i]
            keep = i_row >= 0
            results.append(SearchResult(q, [db.paths[j] for j in i_row[keep]], [float(s) for s in s_row[keep]]))
        return results


def _new_meta(
    model: RetrievalModel, settings: ExtractSettings, source: str | None, engine: str, factory: str | None,
    search_params: str | None,
) -> dict[str, Any]:
    """``index.json`` of a new, empty index of ``model`` (the model as loaded back from the index)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtop_version": __version__,
        "created": utc_now(),
        "updated": utc_now(),
        "generation": 0,
        "model": {
            "checkpoint": MODEL_FILE,
            "source": source,
            "fingerprint": model_fingerprint(model),
            "descriptor_dim": int(model.descriptor_dim),
            "arch": getattr(model.config, "arch", None),
        },
        "settings": dataclasses.asdict(settings),
        "search": {"engine": engine, "factory": factory, "search_params": search_params, "file": None, "ntotal": 0},
        "num_images": 0,
        "segments": [],
    }


def build_image_index(
    root: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    model: RetrievalModel,
    settings: ExtractSettings | None = None,
    *,
    source: str | None = None,
    engine: str = "torch",
    factory: str | None = None,
    search_params: str | None = None,
    overwrite: bool = False,
    **add_kwargs: Any,
) -> tuple[ImageIndex, AddReport]:
    """:meth:`ImageIndex.create` then :meth:`ImageIndex.add` ``images`` (keyword options of add pass through)."""
    index = ImageIndex.create(root, model, settings, source=source, engine=engine, factory=factory,
                              search_params=search_params, overwrite=overwrite)
    return index, index.add(images, **add_kwargs)


__all__ = [
    "ImageIndex", "AddPlan", "AddReport", "SearchResult", "build_image_index", "FORMAT", "FORMAT_VERSION",
]
