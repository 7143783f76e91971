"""The on-disk layout of an image index folder: file names, ``index.json`` header, search engines.

Light on purpose (no torch): the CLI builds its parsers from :data:`ENGINES`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from dtop.engine.settings import ExtractSettings
from dtop.errors import ConfigError, DataError
from dtop.utils.io import read_versioned_json

FORMAT = "dtop-image-index"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
MODEL_FILE = "model.safetensors"
SEGMENTS_DIR = "segments"
FILES_FILE = "files.json"
LOCK_FILE = ".lock"
#: Search engines of an index: ``torch`` (exact search) or ``faiss`` (an index-factory string).
ENGINES: tuple[str, ...] = ("torch", "faiss")
FAISS_FILE_RE = re.compile(r"^faiss-\d+\.index$")
REQUIRED_KEYS = ("format", "format_version", "model", "settings", "search", "segments", "generation")


def faiss_file(generation: int) -> str:
    """Name of the faiss index file written by commit ``generation``."""
    return f"faiss-{generation:04d}.index"


def segment_dir(seg_id: int) -> str:
    """Folder of segment ``seg_id``, relative to the index folder."""
    return f"{SEGMENTS_DIR}/{seg_id:03d}"


def own_entry(name: str) -> bool:
    """Whether a name in an index folder is one dtop writes there."""
    return (
        name in (INDEX_FILE, MODEL_FILE, SEGMENTS_DIR, LOCK_FILE)
        or bool(FAISS_FILE_RE.match(name))
        or (name.startswith(".") and name.endswith(".tmp"))
    )


def check_new_folder(root: Path) -> None:
    """Refuse a file, or a folder holding anything dtop did not write, as the place of a new index."""
    if not root.exists():
        return
    if not root.is_dir():
        raise DataError(f"{root} is a file; give a new or empty folder as the index (--out)")
    foreign = sorted(p.name for p in root.iterdir() if not own_entry(p.name))
    if foreign:
        raise DataError(
            f"{root} is not empty and not a dtop index (it holds {', '.join(foreign[:3])}"
            + (" …" if len(foreign) > 3 else "") + "); give a new or empty folder as the index (--out)"
        )


def remove_own_files(root: Path) -> None:
    """Remove what dtop wrote in ``root`` (``index.json`` first, so that no half-removed index looks valid)."""
    (root / INDEX_FILE).unlink(missing_ok=True)
    for p in root.iterdir():
        if p.name in (INDEX_FILE, LOCK_FILE) or not own_entry(p.name):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def check_engine(engine: str, factory: str | None) -> tuple[str, str | None]:
    """``(engine, factory)`` checked: torch takes no factory (None), faiss defaults to ``Flat``."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown search engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "torch":
        if factory not in (None, "", "Flat"):
            raise ConfigError(
                f"the torch engine is exact and takes no index factory (got {factory!r}); use --engine faiss"
            )
        return engine, None
    return engine, factory or "Flat"


def read_index_meta(root: Path) -> dict[str, Any]:
    """The ``index.json`` of the index folder ``root`` (clear errors for a missing or foreign folder)."""
    build_hint = f"build one with `dtop index build --images DIR --model MODEL --out {root}`"
    if not root.exists():
        raise DataError(f"index folder not found: {root}; check the path, or {build_hint}")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not an index folder; give the folder made by `dtop index build`")
    path = root / INDEX_FILE
    if not path.is_file():
        what = " (it is a descriptor store made by `dtop extract`)" if (root / "manifest.json").is_file() else ""
        raise DataError(f"{root} is not a dtop image index: it has no {INDEX_FILE}{what}; {build_hint}")
    meta = read_versioned_json(
        path, fmt=FORMAT, version=FORMAT_VERSION, required=REQUIRED_KEYS, kind="image index",
        damaged="the index is damaged, rebuild it", foreign=f"; {build_hint}",
        outdated="Rebuild it with `dtop index build ... --overwrite`.",
    )
    problem = index_meta_problem(meta)
    if problem:
        raise DataError(f"{path}: {problem} (the file was edited or damaged); rebuild the index: run the "
                        "`dtop index build` that made it again, with --overwrite")
    return meta


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def index_meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with the types and values of an ``index.json`` (None: usable).

    Segment folders must be exactly ``segments/NNN`` of their ids, so an edited ``dir`` can never
    point outside the index.
    """
    model, search, settings = meta.get("model"), meta.get("search"), meta.get("settings")
    if not _is_int(meta.get("generation")):
        return f"generation must be a non-negative integer, got {meta.get('generation')!r}"
    if not isinstance(settings, dict):
        return f"settings must be an object, got {settings!r}"
    try:
        ExtractSettings(**settings)
    except (TypeError, ConfigError) as err:
        return f"settings are not valid extraction settings ({err})"
    if not isinstance(model, dict) or not isinstance(model.get("fingerprint"), str) or not _is_int(
            model.get("descriptor_dim"), 1):
        return "model must be an object with a fingerprint (string) and descriptor_dim (positive integer)"
    if not isinstance(search, dict) or search.get("engine") not in ENGINES:
        return f"search.engine must be one of {', '.join(ENGINES)}"
    if not isinstance(search.get("factory"), str | None) or not isinstance(search.get("search_params"), str | None):
        return "search.factory and search.search_params must be strings or null"
    file = search.get("file")
    if file is not None and not (isinstance(file, str) and FAISS_FILE_RE.match(file)):
        return f"search.file must be a faiss-NNNN.index file of the index or null, got {file!r}"
    segments = meta.get("segments")
    if not isinstance(segments, list):
        return "segments must be a list"
    ids = []
    for seg in segments:
        if not isinstance(seg, dict) or not _is_int(seg.get("id")):
            return f"each segment must be an object with a non-negative integer id, got {seg!r}"
        if seg.get("dir") != segment_dir(seg["id"]):
            return f"segment {seg['id']} must be in {segment_dir(seg['id'])!r}, got {seg.get('dir')!r}"
        if not _is_int(seg.get("num_images")) or not _is_int(seg.get("num_failed", 0)):
            return f"segment {seg['id']}: num_images and num_failed must be non-negative integers"
        ids.append(seg["id"])
    if ids != sorted(set(ids)):
        return f"segment ids must be unique and ascending, got {ids}"
    return None
