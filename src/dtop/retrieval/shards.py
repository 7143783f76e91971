"""The files of a descriptor store: names, shard files, done-markers and recorded failures.

:class:`dtop.retrieval.store.DescriptorStore` is built on these; the layout and why the
done-markers are the source of truth: docs/retrieval.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtop.errors import ConfigError, DataError
from dtop.utils.io import atomic_path

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


def images_digest(images: Sequence[str]) -> str:
    """sha256 of the image list as written to ``images.txt`` (one path per line)."""
    h = hashlib.sha256()
    for name in images:
        h.update(name.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


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


def read_shard_file(path: Path, marker: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(descriptors, indices)`` of a shard file (``marker`` is named in the repair hint)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return f.get_tensor("descriptors"), f.get_tensor("indices")
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise DataError(f"{path} is missing or damaged ({err}); delete it and {marker.name} and resume") from err
