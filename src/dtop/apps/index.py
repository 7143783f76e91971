"""An on-disk image index of a user's own photos: build it, add new images, search it.

Layout of an index folder::

    index.json                the index: format, model, extraction settings, search engine, segments
    model.safetensors         the model (a dtop checkpoint): the index needs nothing else to be queried
    segments/000/             one descriptor store (:mod:`dtop.retrieval.store`) per segment, plus
    segments/000/files.json   the segment's images with their size and mtime (ns) when listed
    segments/001/ …
    faiss-0003.index          optional faiss index over all searchable images (engine ``faiss``)
    .lock                     held (``flock``) by the one process that builds or adds

**Identity of an image** is its resolved absolute path (symbolic links resolved). ``add`` lists
the images it is given and extracts only those that are *new* (path never indexed) or *modified*
(path indexed, but its size or modification time differs from the ones recorded): they go into a
new segment. For a path in several segments the latest segment wins: the descriptor of the old
version of a modified file is no longer searched. Images removed from disk stay in the index (a
contact sheet shows them as unreadable); build a new index to drop them.

**Unreadable images** never stop ``build`` or ``add``: they are recorded as failures of their
segment, reported, and left out of the search. They count as indexed, so the next ``add`` does
not retry them while the file is unchanged; fix the file (which changes its mtime) and ``add``
again.

**Atomic updates.** A segment is extracted completely (shard by shard, resumable, see
:func:`dtop.engine.extract.extract_to_store`) and consolidated, then the faiss index (if any) is
rebuilt into a new file, and only then is ``index.json`` rewritten (temp file + rename) to list
the segment. A killed ``add`` therefore leaves the previous index intact and searchable; the
half-written segment is not listed, and the next ``add`` with the same images resumes its store
(finished shards are kept) or, if the images to add are no longer the same, replaces it. Listed
segments are never written again.

**Model.** The index stores its own copy of the model (:func:`dtop.models.save_checkpoint`) and
extracts with the model loaded back from that file, also when built from a config name, so
queries years later use exactly the same weights; ``index.json`` records its fingerprint.
Queries are extracted with the index's settings (multi-scale, whole image).

**Search** is exact by default (:func:`dtop.retrieval.search.search`, chunked matrix product over
the memory-mapped segments). With engine ``faiss`` an index-factory string (``"IVF256,Flat"``,
``"HNSW32"``…) is trained and built over all searchable images at every commit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

from dtop.engine.extract import ExtractSettings, extract, extract_to_store, model_fingerprint, resolve_device
from dtop.errors import ConfigError, DataError
from dtop.models.base import RetrievalModel
from dtop.retrieval.search import FaissIndex, search
from dtop.retrieval.store import DescriptorStore, Failure
from dtop.utils.io import read_versioned_json, write_json, write_text

FORMAT = "dtop-image-index"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
MODEL_FILE = "model.safetensors"
SEGMENTS_DIR = "segments"
FILES_FILE = "files.json"
LOCK_FILE = ".lock"
ENGINES: tuple[str, ...] = ("torch", "faiss")
_FAISS_RE = re.compile(r"^faiss-\d+\.index$")
_REQUIRED = ("format", "format_version", "model", "settings", "search", "segments", "generation")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _resolve(path: str | os.PathLike) -> str:
    return str(Path(path).expanduser().resolve())


def _stat(path: str) -> tuple[int, int]:
    """``(size, mtime_ns)`` of a file, ``(-1, -1)`` if it cannot be accessed."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return int(st.st_size), int(st.st_mtime_ns)


def _own_entry(name: str) -> bool:
    """Whether a name in an index folder is one dtop writes there."""
    return (
        name in (INDEX_FILE, MODEL_FILE, SEGMENTS_DIR, LOCK_FILE)
        or bool(_FAISS_RE.match(name))
        or (name.startswith(".") and name.endswith(".tmp"))
    )


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold the index's write lock (non-blocking: a second writer gets a clear error)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(root / LOCK_FILE, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(
                f"another dtop process is building or adding to the index {root} (it holds {root / LOCK_FILE}); "
                "wait for it to finish, then run the command again"
            ) from None
        except OSError:  # file systems without flock: go on unlocked
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _checkpoint_fingerprint(model: RetrievalModel, scratch: Path) -> str:
    """Fingerprint of ``model`` as it would be after a round trip through a checkpoint file.

    (An index always extracts with the model loaded back from its checkpoint; the round trip
    normalises the configuration, e.g. the key order of nested mappings.)
    """
    from dtop.models import load_model, save_checkpoint

    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fingerprint-", suffix=".tmp", dir=scratch) as tmp:
        path = Path(tmp) / MODEL_FILE
        save_checkpoint(model, path)
        return model_fingerprint(load_model(path))


@dataclasses.dataclass
class AddReport:
    """What :meth:`ImageIndex.add` did."""

    #: Id of the segment written, None when nothing was new.
    segment: int | None
    #: Images never indexed before (resolved paths).
    new: list[str]
    #: Images indexed before whose size or modification time changed (re-extracted).
    modified: list[str]
    #: Images already indexed and unchanged (skipped).
    unchanged: int
    #: Images of the segment that could not be read (skipped, not searchable).
    failures: list[Failure]
    #: Whether a half-written segment of a killed run was resumed.
    resumed: bool = False

    @property
    def extracted(self) -> int:
        """Images of the segment that now have a descriptor."""
        return len(self.new) + len(self.modified) - len(self.failures)


@dataclasses.dataclass
class SearchResult:
    """Ranked results of one query: ``paths[i]`` has similarity ``scores[i]``, best first."""

    query: str
    paths: list[str]
    scores: list[float]

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"query", "results": [{"rank", "score", "path"}, …]}``."""
        return {
            "query": self.query,
            "results": [
                {"rank": i + 1, "score": float(s), "path": p} for i, (p, s) in enumerate(zip(self.paths, self.scores))
            ],
        }


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
class _Database:
    parts: list[np.ndarray]
    paths: list[str]
    num_failed: int
    num_superseded: int


class ImageIndex:
    """An image index folder; make one with :meth:`create` (or :func:`build_image_index`), or :meth:`open` it."""

    def __init__(self, root: Path, meta: dict[str, Any]) -> None:
        self.root = root
        self.meta = meta
        self._model: RetrievalModel | None = None
        self._db: tuple[int, _Database] | None = None
        #: Whether :meth:`create` found this index already there (same model and settings) and reopened it.
        self.reopened = False

    # ---------------------------------------------------------------------------- construction

    @classmethod
    def open(cls, root: str | os.PathLike) -> Self:
        """Open an existing index (clear errors for a missing folder or one that is not an index)."""
        root = Path(root)
        return cls(root, cls._read_meta(root))

    @staticmethod
    def _read_meta(root: Path) -> dict[str, Any]:
        build_hint = f"build one with `dtop index build --images DIR --model MODEL --out {root}`"
        if not root.exists():
            raise DataError(f"index folder not found: {root}; check the path, or {build_hint}")
        if not root.is_dir():
            raise DataError(f"{root} is a file, not an index folder; give the folder made by `dtop index build`")
        path = root / INDEX_FILE
        if not path.is_file():
            what = " (it is a descriptor store made by `dtop extract`)" if (root / "manifest.json").is_file() else ""
            raise DataError(f"{root} is not a dtop image index: it has no {INDEX_FILE}{what}; {build_hint}")
        return read_versioned_json(
            path, fmt=FORMAT, version=FORMAT_VERSION, required=_REQUIRED, kind="image index",
            damaged="the index is damaged, rebuild it", foreign=f"; {build_hint}",
            outdated="Rebuild it with `dtop index build ... --overwrite`.",
        )

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
        engine, factory = _check_engine(engine, factory)
        if engine == "faiss":  # fail now on a bad factory string or a missing faiss
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
        if root.exists():
            if not root.is_dir():
                raise DataError(f"{root} is a file; give a new or empty folder as the index (--out)")
            foreign = sorted(p.name for p in root.iterdir() if not _own_entry(p.name))
            if foreign:
                raise DataError(
                    f"{root} is not empty and not a dtop index (it holds {', '.join(foreign[:3])}"
                    + (" …" if len(foreign) > 3 else "") + "); give a new or empty folder as the index (--out)"
                )
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root):
            cls._remove_own_files(root)
            from dtop.models import load_model, save_checkpoint

            save_checkpoint(
                model, root / MODEL_FILE,
                extras=getattr(model, "checkpoint_extras", None) or None,
                extras_metadata=getattr(model, "checkpoint_extras_metadata", None) or None,
            )
            loaded = load_model(root / MODEL_FILE)
            meta = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "dtop_version": _dtop_version(),
                "created": _now(),
                "updated": _now(),
                "generation": 0,
                "model": {
                    "checkpoint": MODEL_FILE,
                    "source": source,
                    "fingerprint": model_fingerprint(loaded),
                    "descriptor_dim": int(loaded.descriptor_dim),
                    "arch": getattr(loaded.config, "arch", None),
                },
                "settings": dataclasses.asdict(settings),
                "search": {"engine": engine, "factory": factory, "search_params": search_params, "file": None,
                           "ntotal": 0},
                "num_images": 0,
                "segments": [],
            }
            write_json(root / INDEX_FILE, meta)
        index = cls(root, meta)
        index._model = loaded
        return index

    @staticmethod
    def _remove_own_files(root: Path) -> None:
        (root / INDEX_FILE).unlink(missing_ok=True)  # first: no half-removed index looks valid
        for p in root.iterdir():
            if p.name in (INDEX_FILE, LOCK_FILE) or not _own_entry(p.name):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)

    def _differences(self, model: RetrievalModel, settings: ExtractSettings, engine: str, factory: str | None
                     ) -> list[str]:
        diffs = []
        stored = self.meta["settings"]
        for key, value in json.loads(json.dumps(dataclasses.asdict(settings))).items():
            if stored.get(key) != value:
                diffs.append(f"{key}: index has {stored.get(key)!r}, requested {value!r}")
        search_meta = self.meta["search"]
        if search_meta.get("engine") != engine or search_meta.get("factory") != factory:
            diffs.append(
                f"search engine: index has {search_meta.get('engine')} {search_meta.get('factory') or ''}".rstrip()
                + f", requested {engine} {factory or ''}".rstrip()
            )
        fingerprint = _checkpoint_fingerprint(model, self.root)
        if fingerprint != self.model_fingerprint:
            diffs.append(f"model: index has fingerprint {self.model_fingerprint}, requested {fingerprint}")
        return diffs

    # ------------------------------------------------------------------------------ properties

    @property
    def settings(self) -> ExtractSettings:
        """The extraction settings of the index (used for its images and for queries)."""
        return ExtractSettings(**self.meta["settings"])

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

    def _segment_dir(self, seg_id: int) -> Path:
        return self.root / SEGMENTS_DIR / f"{seg_id:03d}"

    def _known_files(self) -> dict[str, tuple[int, int]]:
        known: dict[str, tuple[int, int]] = {}
        for seg in self.meta["segments"]:
            path = self.root / seg["dir"] / FILES_FILE
            try:
                doc = json.loads(path.read_text())
                rows = zip(doc["paths"], doc["size"], doc["mtime_ns"], strict=True)
                known.update({p: (int(s), int(m)) for p, s, m in rows})
            except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise DataError(f"{path} is missing or damaged ({err}); the index is damaged, rebuild it") from err
        return known

    def plan(self, images: Sequence[str | os.PathLike]) -> AddPlan:
        """Which of ``images`` are new, modified or unchanged (by resolved path, size and mtime)."""
        known = self._known_files()
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

    def add(
        self,
        images: Sequence[str | os.PathLike],
        *,
        batch_size: int = 8,
        num_workers: int = 2,
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
        with _locked(self.root):
            self.meta = self._read_meta(self.root)  # what other writers committed
            plan = self.plan(images)
            seg_id = 1 + max((int(s["id"]) for s in self.meta["segments"]), default=-1)
            seg_dir = self._segment_dir(seg_id)
            if not plan.paths:
                if seg_dir.exists():  # an abandoned half segment: its images are indexed by now
                    shutil.rmtree(seg_dir)
                if self.engine == "faiss" and not self._faiss_is_current():
                    self._commit(None)
                return AddReport(None, [], [], plan.unchanged, [])
            if self.engine == "faiss":
                self._check_faiss_size(len(self._database().paths) + len(plan.paths))
            resumed, shard_size = self._prepare_segment(seg_dir, plan, shard_size)
            model = self.load_model()
            store = extract_to_store(
                model, plan.paths, seg_dir, settings=self.settings, batch_size=batch_size,
                num_workers=num_workers, device=device, amp=amp, skip_bad=True, shard_size=shard_size,
                progress=progress,
            )
            if store.descriptor_dim is not None:
                store.load(numpy=True, mmap=True)  # consolidate now: committed segments are never written again
            failures = store.failures()
            self._commit({
                "id": seg_id,
                "dir": f"{SEGMENTS_DIR}/{seg_id:03d}",
                "num_images": len(plan.paths),
                "num_failed": len(failures),
                "new": len(plan.new),
                "modified": len(plan.modified),
                "created": _now(),
            })
            return AddReport(seg_id, plan.new, plan.modified, plan.unchanged, failures, resumed)

    def _prepare_segment(self, seg_dir: Path, plan: AddPlan, shard_size: int) -> tuple[bool, int]:
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
                return True, shard_size
            shutil.rmtree(seg_dir)  # not listed in index.json: a killed run for other images
        seg_dir.mkdir(parents=True)
        write_text(files, json.dumps(doc, separators=(",", ":")) + "\n")
        return False, shard_size

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
                name = f"faiss-{meta['generation']:04d}.index"
                try:
                    faiss_index = _build_faiss(db, search_meta["factory"], search_meta.get("search_params"))
                    faiss_index.save(self.root / name)
                    search_meta["file"], search_meta["ntotal"] = name, len(db.paths)
                except ConfigError as err:  # keep the extracted segment; exact search still works
                    failure = err
        meta["updated"] = _now()
        write_json(self.root / INDEX_FILE, meta)
        self.meta = meta
        for p in self.root.iterdir():  # faiss files of earlier commits (or of a killed one)
            if _FAISS_RE.match(p.name) and p.name != search_meta.get("file"):
                p.unlink(missing_ok=True)
        if failure is not None:
            raise ConfigError(
                f"{failure}. The images were added to {self.root}, but it has no faiss index now: search it "
                "with --exact, or rebuild it with another factory (dtop index build ... --overwrite)"
            ) from failure

    def _check_faiss_size(self, n_images: int) -> None:
        """Fail before extracting when an IVF factory has more lists than the index will have images."""
        factory = self.meta["search"]["factory"]
        need = _faiss_min_images(factory, int(self.meta["model"]["descriptor_dim"]))
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

    def _database(self, meta: dict[str, Any] | None = None) -> _Database:
        """The searchable descriptors (memory-mapped where possible) and their paths."""
        meta = meta or self.meta
        generation = int(meta["generation"])
        if meta is self.meta and self._db is not None and self._db[0] == generation:
            return self._db[1]
        segs = []
        for seg in meta["segments"]:
            seg_dir = self.root / seg["dir"]
            try:
                store = DescriptorStore.open(seg_dir)
                paths = store.images
                if store.descriptor_dim is None:  # every image of the segment failed
                    desc, valid = None, np.zeros(len(paths), dtype=bool)
                else:
                    desc, valid = store.load(numpy=True, mmap=True)
            except DataError as err:
                raise DataError(f"segment {seg['id']} of the index {self.root} is damaged: {err}") from err
            segs.append((paths, desc, np.asarray(valid, dtype=bool)))
        seen: set[str] = set()
        keeps = []
        superseded = 0
        for paths, _, _ in reversed(segs):  # the latest segment holding a path wins
            latest = np.fromiter((p not in seen for p in paths), dtype=bool, count=len(paths))
            superseded += int((~latest).sum())
            seen.update(paths)
            keeps.append(latest)
        keeps.reverse()
        db = _Database([], [], 0, superseded)
        for (paths, desc, valid), latest in zip(segs, keeps):
            db.num_failed += int((latest & ~valid).sum())
            keep = latest & valid
            if desc is None or not keep.any():
                continue
            db.parts.append(desc if keep.all() else np.asarray(desc[keep]))
            db.paths.extend(p for p, k in zip(paths, keep.tolist()) if k)
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
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``topk`` of query descriptors ``(n, d)``: ``(scores, indices)`` into :attr:`paths`.

        Exact (torch) search unless the index uses faiss and not ``exact``; ``search_params``
        overrides the faiss search parameters stored in the index (e.g. ``nprobe=32``). With an
        approximate faiss index, missing results have index -1.
        """
        db = self._database()
        if not db.paths:
            raise DataError(
                f"the index {self.root} holds no searchable images yet"
                + (f" ({db.num_failed} unreadable)" if db.num_failed else "")
                + f"; add some with `dtop index add --index {self.root} --images DIR`"
            )
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
    ) -> list[SearchResult]:
        """Extract query images with the index's model and settings (whole image) and search them."""
        images = [str(p) for p in images]
        if not images:
            raise ConfigError("give at least one query image")
        for p in images:
            if not Path(p).is_file():
                raise DataError(f"query image not found: {p}; check the path")
        db = self._database()
        if not db.paths:
            self.search(np.zeros((1, 1), dtype=np.float32), topk)  # raises the "empty index" error
        model = self.load_model()
        try:
            desc = extract(model, images, settings=self.settings, batch_size=batch_size, num_workers=num_workers,
                           device=device, amp=amp, progress=progress)
        except DataError as err:
            raise DataError(f"query image(s) unreadable: {err}. Give image files dtop can read") from err
        scores, indices = self.search(desc.numpy(), topk, exact=exact, search_params=search_params, device=device)
        results = []
        for q, s_row, i_row in zip(images, scores, indices):
            keep = i_row >= 0
            results.append(SearchResult(q, [db.paths[i] for i in i_row[keep]], [float(s) for s in s_row[keep]]))
        return results


def _check_engine(engine: str, factory: str | None) -> tuple[str, str | None]:
    if engine not in ENGINES:
        raise ConfigError(f"unknown search engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "torch":
        if factory not in (None, "", "Flat"):
            raise ConfigError(
                f"the torch engine is exact and takes no index factory (got {factory!r}); use --engine faiss"
            )
        return engine, None
    return engine, factory or "Flat"


def _build_faiss(db: _Database, factory: str, search_params: str | None) -> FaissIndex:
    """Train (where the factory needs it) and fill a faiss index over all searchable descriptors."""
    dim = int(db.parts[0].shape[1])
    index = FaissIndex(dim, factory=factory, search_params=search_params)
    if not index.index.is_trained:
        data = np.concatenate([np.asarray(p, dtype=np.float32) for p in db.parts])
        try:
            index.train(data)
        except RuntimeError as err:
            raise ConfigError(
                f"faiss cannot train '{factory}' on the {len(db.paths)} images of the index ({str(err).strip()}); "
                "an IVF index needs at least as many images as lists (ideally 40×): use fewer lists, "
                "'Flat', or --engine torch"
            ) from err
    for part in db.parts:
        index.add(part)
    return index


def _faiss_min_images(factory: str, dim: int) -> int:
    """How many vectors ``factory`` needs to train: its number of IVF lists (1 if it is not IVF)."""
    probe = FaissIndex(dim, factory=factory)
    try:
        return int(probe.faiss.extract_index_ivf(probe.index).nlist)
    except RuntimeError:  # not an IVF index
        return 1


def _dtop_version() -> str:
    from dtop import __version__

    return __version__


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
    "ImageIndex", "AddPlan", "AddReport", "SearchResult", "build_image_index", "FORMAT", "FORMAT_VERSION", "ENGINES",
]
