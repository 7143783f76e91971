"""The files of a descriptor store: names, shard files, done-markers and recorded failures.

:class:`dtop.retrieval.store.DescriptorStore` is built on these; the layout and why the
done-markers are the source of truth: docs/retrieval.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtop.errors import ConfigError, DataError
from dtop.utils.io import atomic_path, write_json
from dtop.utils.locks import utc_now
from dtop.utils.paths import decode_line, encode_line

FORMAT = "dtop-descriptors"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGES = "images.txt"
LOCK = ".manifest.lock"
CONSOLIDATED = ("descriptors.npy", "valid.npy", "consolidated.json")
DTYPES = {"float16": torch.float16, "float32": torch.float32}
DEFAULT_SHARD_SIZE = 10000
#: Manifest keys fixed when the store is created (the others are derived from the markers).
STATIC_KEYS = (
    "format", "format_version", "created", "model", "settings", "dtype", "num_images", "images_file",
    "images_sha256", "shard_size", "num_shards",
)
_SHARD_META_KEY = "dtop"  # the one metadata key of a shard file (several keys are written in random order)
MARKER_RE = re.compile(r"^shard-(\d+)\.done\.json$")
OWN_FILE_RE = re.compile(
    r"^(shard-\d+\.(safetensors|done\.json|failures\.json)|\.(shard-\d+|manifest|images|descriptors|valid|"
    r"consolidated)\..*\.tmp)$"
)


@dataclasses.dataclass(frozen=True)
class Failure:
    """An image whose descriptor could not be extracted."""

    index: int
    path: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"index", "path", "reason"}``."""
        return dataclasses.asdict(self)


#: What the store accepts as a failure: a :class:`Failure`, ``(index, reason)``,
#: ``(index, path, reason)`` or a mapping with ``index``, ``reason`` and optionally ``path``.
FailureLike = Failure | tuple[Any, ...] | Mapping[str, Any]


def as_failure(item: FailureLike) -> Failure:
    """``item`` as a :class:`Failure` (the path may be empty: the store fills it from its image list)."""
    if isinstance(item, Failure):
        return item
    if isinstance(item, Mapping):
        return Failure(int(item["index"]), str(item.get("path") or ""), str(item["reason"]))
    t = tuple(item)
    if len(t) == 2:
        return Failure(int(t[0]), "", str(t[1]))
    if len(t) == 3:
        return Failure(int(t[0]), str(t[1]), str(t[2]))
    raise DataError(f"a failure is (index, reason) or (index, path, reason), got {t!r}")


def canonical(obj: Any, what: str) -> Any:
    """JSON round trip (tuples become lists, keys strings) so that comparisons are exact."""
    try:
        return json.loads(json.dumps(obj, sort_keys=True))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"descriptor store {what} must be JSON-serialisable: {err}") from err


def dict_differences(name: str, stored: Any, requested: Any) -> list[str]:
    """``name.key: store has …, requested …`` for every key on which two (canonical) values differ."""
    if stored == requested:
        return []
    if isinstance(stored, dict) and isinstance(requested, dict):
        keys = sorted(set(stored) | set(requested))
        return [
            f"{name}.{k}: store has {stored.get(k, '<unset>')!r}, requested {requested.get(k, '<unset>')!r}"
            for k in keys
            if stored.get(k, "<unset>") != requested.get(k, "<unset>")
        ]
    return [f"{name}: store has {stored!r}, requested {requested!r}"]


def image_names(images: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The image list as strings (any file name: not UTF-8, with line breaks); not empty."""
    names = [os.fsdecode(p) for p in images]
    if not names:
        raise DataError("cannot create a descriptor store for an empty image list")
    return names


def images_digest(images: Sequence[str]) -> str:
    """sha256 of the image list as written to ``images.txt`` (one name per line, see :func:`write_images`)."""
    h = hashlib.sha256()
    for name in images:
        h.update(encode_line(name))
        h.update(b"\n")
    return h.hexdigest()


def write_images(path: Path, names: Sequence[str]) -> None:
    """Write ``images.txt``: one name per line, losslessly (:func:`dtop.utils.paths.encode_line`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"".join(encode_line(n) + b"\n" for n in names))


def read_images(path: Path) -> list[str]:
    """The names of an ``images.txt`` (:class:`DataError` if it cannot be read)."""
    try:
        return [decode_line(line) for line in path.read_bytes().split(b"\n")[:-1]]
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is missing or unreadable ({err}); re-extract with --overwrite") from err


def new_manifest(model: dict[str, Any], settings: dict[str, Any], dtype: str, names: Sequence[str],
                 shard_size: int) -> dict[str, Any]:
    """The fixed keys of the manifest of a new store (with a random ``store_id``)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": utc_now(),
        "store_id": uuid.uuid4().hex,
        "model": model,
        "settings": settings,
        "dtype": dtype,
        "num_images": len(names),
        "images_file": IMAGES,
        "images_sha256": images_digest(names),
        "shard_size": shard_size,
        "num_shards": -(-len(names) // shard_size),
    }


def is_on_disk(root: Path, static: dict[str, Any], store_id: str | None) -> bool:
    """Whether the manifest at ``root`` is still that of the store with these fixed keys and id."""
    try:
        disk = json.loads((root / MANIFEST).read_bytes())
        return {k: disk.get(k) for k in STATIC_KEYS} == static and disk.get("store_id") == store_id
    except (OSError, ValueError, AttributeError):  # removed, unreadable, not an object
        return False


def check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Type- and range-check the fixed keys of a manifest (an edited one is refused, never half used)."""

    def refuse(key: str, what: str) -> DataError:
        return DataError(f"{path}: {key} must be {what}, got {manifest.get(key)!r} (the manifest was edited or "
                         "damaged); re-extract with --overwrite")

    for key in ("num_images", "shard_size", "num_shards"):
        value = manifest.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise refuse(key, "a positive integer")
    n, size = manifest["num_images"], manifest["shard_size"]
    if manifest["num_shards"] != math.ceil(n / size):
        raise refuse("num_shards", f"{math.ceil(n / size)} ({n} images in shards of {size})")
    if manifest.get("dtype") not in DTYPES:
        raise refuse("dtype", f"one of {sorted(DTYPES)}")
    for key in ("settings", "model"):
        if not isinstance(manifest.get(key), dict):
            raise refuse(key, "a JSON object")
    if manifest.get("images_file") != IMAGES:
        raise refuse("images_file", repr(IMAGES))
    digest = manifest.get("images_sha256")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise refuse("images_sha256", "a sha256 in hex")
    if not isinstance(manifest.get("store_id", ""), str):
        raise refuse("store_id", "a string")


def check_marker(path: Path, marker: Any, i: int, n_items: int, dtype: str) -> dict[str, Any]:
    """The done-marker of shard ``i`` (``n_items`` images) if its content is consistent, else a DataError."""
    problem = _marker_problem(marker, i, n_items, dtype)
    if problem:
        raise damaged_marker(path, i, problem)
    return dict(marker)


def damaged_marker(path: Path, i: int, problem: str) -> DataError:
    """The error for the unusable done-marker ``path`` of shard ``i``, with the repair."""
    shard = shard_path(path.parent, i).name
    return DataError(f"{path} is damaged ({problem}); delete it and {shard} and run the extraction again "
                     "(that shard is extracted again)")


def _marker_problem(marker: Any, i: int, n_items: int, dtype: str) -> str | None:
    if not isinstance(marker, dict):
        return "not a JSON object"
    count, dim, failures = marker.get("count"), marker.get("dim"), marker.get("failures")
    if marker.get("shard") != i:
        return f"shard is {marker.get('shard')!r}, not {i}"
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= n_items:
        return f"count {count!r} is not a number of images in 0..{n_items}"
    if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim < 1):
        return f"dim {dim!r} is not a positive integer"
    if (dim is None) != (count == 0):
        return "dim must be given exactly when the shard holds descriptors"
    if marker.get("dtype") != dtype:
        return f"dtype {marker.get('dtype')!r} is not the store's {dtype!r}"
    if not isinstance(marker.get("sha256"), str):
        return "sha256 is missing"
    if not isinstance(failures, list) or not all(
        isinstance(f, dict) and isinstance(f.get("index"), int) and isinstance(f.get("path"), str)
        and isinstance(f.get("reason"), str) for f in failures
    ):
        return "failures must be a list of {index, path, reason}"
    if count + len(failures) != n_items:
        return f"{count} descriptors and {len(failures)} failures do not account for the shard's {n_items} images"
    return None


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (hex)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def np_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype of a store dtype (float16 or float32)."""
    return np.dtype(np.float16) if dtype == torch.float16 else np.dtype(np.float32)


def shard_path(root: Path, i: int) -> Path:
    """The descriptors of shard ``i``."""
    return root / f"shard-{i:05d}.safetensors"


def marker_path(root: Path, i: int) -> Path:
    """The done-marker of shard ``i`` (it exists iff the shard is finished)."""
    return root / f"shard-{i:05d}.done.json"


def pending_path(root: Path, i: int) -> Path:
    """Failures recorded for shard ``i`` before it is written."""
    return root / f"shard-{i:05d}.failures.json"


def read_pending_failures(path: Path) -> dict[int, Failure]:
    """Failures of a ``shard-*.failures.json`` by image index (empty if missing or unreadable)."""
    if not path.is_file():
        return {}
    try:
        return {int(d["index"]): Failure(**d) for d in json.loads(path.read_text())["failures"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return {}


def shard_rows(
    i: int,
    descriptors: torch.Tensor | np.ndarray,
    indices: torch.Tensor | np.ndarray | Sequence[int],
    items: range,
    dim: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of shard ``i`` (images ``items``) as CPU tensors sorted by image index, checked.

    ``dim`` is the descriptor dimension of the store's other shards (None: none finished yet).
    """
    desc = torch.as_tensor(np.asarray(descriptors) if not isinstance(descriptors, torch.Tensor) else descriptors)
    idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices)
    desc, idx = desc.detach().cpu(), idx.detach().cpu().to(torch.int64).reshape(-1)
    if idx.numel() == 0 and desc.numel() == 0:  # every image of the shard failed
        desc = desc.to(torch.float32).reshape(0, desc.shape[-1] if desc.ndim == 2 else 0)
    if desc.ndim != 2 or desc.shape[0] != idx.numel():
        raise DataError(
            f"shard {i}: descriptors must be (n, d) with n = len(indices) = {idx.numel()}, got "
            f"{tuple(desc.shape)}"
        )
    if not torch.is_floating_point(desc) or not bool(torch.isfinite(desc).all()):
        raise DataError(f"shard {i}: descriptors must be finite floating-point values (got NaN/inf or ints)")
    order = torch.argsort(idx, stable=True)
    idx, desc = idx[order], desc[order]
    if idx.numel() and (int(idx[0]) < items.start or int(idx[-1]) >= items.stop):
        raise DataError(f"shard {i} holds images {items.start}..{items.stop - 1}; got indices outside that range")
    if idx.numel() > 1 and bool((idx[1:] == idx[:-1]).any()):
        raise DataError(f"shard {i}: indices contain duplicates")
    if dim is not None and desc.shape[1] != dim and idx.numel():
        raise DataError(
            f"shard {i}: descriptors are {desc.shape[1]}-d but the store's other shards are {dim}-d; "
            "a store holds one model's descriptors (use another --out)"
        )
    return desc, idx


def write_shard_file(path: Path, i: int, descriptors: torch.Tensor, indices: torch.Tensor) -> tuple[str, int]:
    """Write shard ``i`` atomically, byte-deterministic; returns its ``(sha256, size in bytes)``."""
    from safetensors.torch import save_file

    tensors = {"descriptors": descriptors.contiguous(), "indices": indices.contiguous()}
    meta = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "shard": int(i)}, sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_SHARD_META_KEY: meta})
        return file_sha256(tmp), tmp.stat().st_size


#: Shard files whose sha256 this process has checked: (path, sha256, size, mtime_ns).
_VERIFIED: set[tuple[str, str, int, int]] = set()


def read_shard_file(path: Path, marker: Path, sha256: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``(descriptors, indices)`` of a shard file, checked against its marker's ``sha256`` and ``count``.

    The hash is checked the first time this process reads the file (again if its size or mtime
    changes); ``marker`` is named in the repair hint.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load

    repair = f"delete it and {marker.name} and run the extraction again (that shard is extracted again)"
    try:
        st = path.stat()
        key = (str(path), sha256, st.st_size, st.st_mtime_ns)
        if key in _VERIFIED:
            with safe_open(str(path), framework="numpy") as f:
                desc, idx = f.get_tensor("descriptors"), f.get_tensor("indices")
        else:
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != sha256:
                raise DataError(f"{path} does not match the sha256 in {marker.name}: it was damaged (bit rot) or "
                                f"changed; {repair}")
            tensors = load(data)
            desc, idx = tensors["descriptors"], tensors["indices"]
            _VERIFIED.add(key)
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise DataError(f"{path} is missing or damaged ({err}); {repair}") from err
    if desc.ndim != 2 or idx.shape != (desc.shape[0],) or desc.shape[0] != count:
        raise DataError(f"{path} holds {desc.shape[0]} rows, its marker {marker.name} says {count}; {repair}")
    return desc, idx


def consolidated_files(root: Path, shards: dict[str, str], shape: tuple[int, int], dtype: np.dtype,
                       fill: Callable[[np.ndarray, np.ndarray], None]) -> tuple[Path, Path]:
    """The consolidated ``descriptors.npy`` and ``valid.npy`` of a store, built with ``fill`` unless current.

    They are reused while the shards (``{shard: sha256}``) are those they were built from, each
    hash-checked when it was read, and the files have the sizes recorded then (a truncated copy is
    rebuilt).
    """
    desc_path, valid_path, key_path = (root / n for n in CONSOLIDATED)
    try:
        stored = json.loads(key_path.read_text())
        if stored == {"shards": shards, "sizes": [desc_path.stat().st_size, valid_path.stat().st_size]}:
            return desc_path, valid_path
    except (OSError, ValueError):
        pass
    key_path.unlink(missing_ok=True)
    with atomic_path(desc_path) as tmp_d, atomic_path(valid_path) as tmp_v:
        out = np.lib.format.open_memmap(tmp_d, mode="w+", dtype=dtype, shape=shape)
        valid = np.lib.format.open_memmap(tmp_v, mode="w+", dtype=bool, shape=(shape[0],))
        valid[:] = False
        fill(out, valid)
        out.flush()
        valid.flush()
        del out, valid
    write_json(key_path, {"shards": shards, "sizes": [desc_path.stat().st_size, valid_path.stat().st_size]})
    return desc_path, valid_path


def remove_store_files(root: Path) -> None:
    """Remove the store's own files (``manifest.json`` first, so that no half-removed store looks valid).

    The lock file stays: the caller holds it, and another process waiting for it must find the same file.
    """
    (root / MANIFEST).unlink(missing_ok=True)
    for p in root.iterdir():
        if p.name in (IMAGES, *CONSOLIDATED) or OWN_FILE_RE.match(p.name):
            p.unlink(missing_ok=True)
