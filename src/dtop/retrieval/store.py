"""The descriptor store: one directory of sharded descriptors that describes itself.

Shard ``i`` holds images ``[i·shard_size, (i+1)·shard_size)`` of the image list; several writers
(``torchrun`` ranks) may fill different shards at once, and a killed writer's work resumes shard by
shard. File layout, the writers' protocol and crash safety: docs/retrieval.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from dtop.errors import ConfigError, DataError
from dtop.retrieval.shards import (
    DEFAULT_SHARD_SIZE,
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    IMAGES,
    LOCK,
    MANIFEST,
    MARKER_RE,
    OWN_FILE_RE,
    STATIC_KEYS,
    Failure,
    FailureLike,
    as_failure,
    canonical,
    check_manifest,
    check_marker,
    consolidated_files,
    damaged_marker,
    dict_differences,
    file_sha256,
    image_names,
    images_digest,
    is_on_disk,
    marker_path,
    new_manifest,
    np_dtype,
    pending_path,
    read_images,
    read_pending_failures,
    read_shard_file,
    remove_store_files,
    shard_path,
    shard_rows,
    write_images,
    write_shard_file,
)
from dtop.utils.io import read_versioned_json, write_json
from dtop.utils.locks import file_lock, utc_now


class DescriptorStore:
    """A directory of descriptor shards with a manifest; build it with :meth:`create` or :meth:`open`."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self._static = {k: manifest[k] for k in STATIC_KEYS}
        #: Tells this store from another one created later at the same place (None in stores of older dtop).
        self._store_id: str | None = manifest.get("store_id")
        self._images: list[str] | None = None
        self._markers: dict[int, tuple[int, dict[str, Any]]] = {}

    # ------------------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        root: str | os.PathLike,
        images: Sequence[str | os.PathLike],
        settings: Mapping[str, Any],
        model_info: Mapping[str, Any],
        shard_size: int = DEFAULT_SHARD_SIZE,
        overwrite: bool = False,
    ) -> Self:
        """Create a store for ``images``, or reopen the matching one already at ``root`` (resume).

        ``settings`` holds everything that changes descriptor values (scales, image size,
        ``dtype`` = ``"float16"`` | ``"float32"``, default float32); ``model_info`` identifies the
        model (e.g. ``{"hash": …, "config": {…}}``). Both are compared in full when reopening: a
        store of another model, other settings, image list or shard size raises :class:`DataError`
        unless ``overwrite`` (which deletes the store's own files, nothing else). With several
        writers, let one process create (and overwrite) and the others :meth:`open` after a barrier.
        """
        root = Path(root)
        names = image_names(images)
        if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
            raise ConfigError(f"shard_size must be a positive integer, got {shard_size!r}")
        settings_c = canonical(dict(settings), "settings")
        model_c = canonical(dict(model_info), "model_info")
        dtype = settings_c.get("dtype", "float32")
        if dtype not in DTYPES:
            raise ConfigError(f"descriptor store dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as err:
            raise DataError(f"{root} is a file; give a folder for the descriptor store (--out)") from err
        # Check and create under the lock: of two writers creating one store, the second finds the
        # first one's manifest (and reopens it, or is told that it holds other settings).
        with file_lock(root / LOCK):
            if (root / MANIFEST).is_file():
                if not overwrite:
                    return cls._reopen(root, settings_c, model_c, names, shard_size)
                remove_store_files(root)
            elif any(OWN_FILE_RE.match(p.name) and p.name.startswith("shard-") for p in root.iterdir()):
                raise DataError(
                    f"{root} holds descriptor shards but no {MANIFEST} (a damaged store); "
                    "use --overwrite to replace it or another output directory (--out)"
                )
            write_images(root / IMAGES, names)
            store = cls(root, new_manifest(model_c, settings_c, dtype, names, shard_size))
            store._images = names
            write_json(root / MANIFEST, store.manifest())
        return store

    @classmethod
    def _reopen(cls, root: Path, settings: dict[str, Any], model_info: dict[str, Any], names: list[str],
                shard_size: int) -> Self:
        """The store at ``root`` if it was created for the same model, settings, images and shard size."""
        store = cls.open(root)
        diffs = store.differences(settings, model_info, images=names, shard_size=shard_size)
        if diffs:
            raise DataError(
                f"{root} already holds descriptors of a different model or settings ("
                + "; ".join(diffs[:6])
                + "). Use another output directory (--out) or --overwrite to replace them."
            )
        return store

    @classmethod
    def open(cls, root: str | os.PathLike) -> Self:
        """Open an existing store (clear errors for a missing or foreign directory)."""
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise DataError(
                f"{root} is not a descriptor store (no {MANIFEST}); extract descriptors into it first"
            )
        manifest = read_versioned_json(
            path, fmt=FORMAT, version=FORMAT_VERSION, required=STATIC_KEYS, kind="descriptor store manifest",
            damaged="re-extract with --overwrite", outdated="Re-extract with --overwrite.",
        )
        check_manifest(path, manifest)
        return cls(root, manifest)

    # -------------------------------------------------------------------------------- properties

    @property
    def settings(self) -> dict[str, Any]:
        """Extraction settings the store was created with."""
        return self._static["settings"]

    @property
    def model_info(self) -> dict[str, Any]:
        """Identity of the model that produced the descriptors."""
        return self._static["model"]

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the descriptors."""
        return DTYPES[self._static["dtype"]]

    @property
    def dtype_name(self) -> str:
        """Storage dtype of the descriptors by name (``float16`` or ``float32``)."""
        return str(self._static["dtype"])

    @property
    def num_images(self) -> int:
        """Number of images in the list."""
        return int(self._static["num_images"])

    @property
    def shard_size(self) -> int:
        """Images per shard (the last one may hold fewer)."""
        return int(self._static["shard_size"])

    @property
    def num_shards(self) -> int:
        """Number of shards."""
        return int(self._static["num_shards"])

    @property
    def images(self) -> list[str]:
        """The image list (read from ``images.txt`` once and checked against the manifest's hash)."""
        if self._images is None:
            path = self.root / IMAGES
            names = read_images(path)
            if len(names) != self.num_images or images_digest(names) != self._static["images_sha256"]:
                raise DataError(f"{path} does not match {MANIFEST} (edited or damaged); re-extract with --overwrite")
            self._images = names
        return self._images

    @property
    def descriptor_dim(self) -> int | None:
        """Descriptor dimension (None until a shard is finished)."""
        markers = self._read_markers()
        return next((int(m["dim"]) for m in markers.values() if m.get("dim") is not None), None)

    def differences(
        self,
        settings: Mapping[str, Any],
        model_info: Mapping[str, Any],
        images: Sequence[str | os.PathLike] | None = None,
        shard_size: int | None = None,
    ) -> list[str]:
        """What differs between this store and the requested model/settings (empty: reusable)."""
        diffs = dict_differences("model", self.model_info, canonical(dict(model_info), "model_info"))
        diffs += dict_differences("settings", self.settings, canonical(dict(settings), "settings"))
        if images is not None:
            names = [os.fsdecode(p) for p in images]
            if len(names) != self.num_images or images_digest(names) != self._static["images_sha256"]:
                diffs.append(f"image list: store has {self.num_images} images, requested {len(names)} (or other names)")
        if shard_size is not None and shard_size != self.shard_size:
            diffs.append(f"shard_size: store has {self.shard_size}, requested {shard_size}")
        return diffs

    # ------------------------------------------------------------------------------------ shards

    def shard_items(self, i: int) -> range:
        """Image indices that belong to shard ``i``."""
        self._check_shard(i)
        return range(i * self.shard_size, min((i + 1) * self.shard_size, self.num_images))

    def shard_of(self, index: int) -> int:
        """The shard that image ``index`` belongs to."""
        if not 0 <= index < self.num_images:
            raise DataError(f"image index {index} is out of range [0, {self.num_images})")
        return index // self.shard_size

    def _check_shard(self, i: int) -> None:
        if not isinstance(i, int | np.integer) or not 0 <= i < self.num_shards:
            raise DataError(f"shard {i!r} does not exist: the store has shards 0..{self.num_shards - 1}")

    def _read_markers(self) -> dict[int, dict[str, Any]]:
        """Done-markers on disk (cached per file modification time)."""
        found: dict[int, dict[str, Any]] = {}
        try:
            entries = list(self.root.iterdir())
        except FileNotFoundError as err:
            raise DataError(f"descriptor store {self.root} has disappeared (deleted or moved)") from err
        for p in entries:
            m = MARKER_RE.match(p.name)
            if not m or int(m.group(1)) >= self.num_shards:
                continue
            i = int(m.group(1))
            try:
                stamp = p.stat().st_mtime_ns
                cached = self._markers.get(i)
                if cached is None or cached[0] != stamp:
                    marker = check_marker(p, json.loads(p.read_bytes()), i, len(self.shard_items(i)), self.dtype_name)
                    self._markers[i] = (stamp, marker)
            except FileNotFoundError:
                continue  # vanished between listing and reading (overwrite)
            except (OSError, ValueError) as err:  # unreadable, not JSON
                raise damaged_marker(p, i, f"not readable JSON: {err}") from err
            found[i] = self._markers[i][1]
        return found

    def finished_shards(self) -> list[int]:
        """Shards whose done-marker exists, ascending (derived from disk at each call)."""
        return sorted(self._read_markers())

    def missing_shards(self) -> list[int]:
        """Shards still to be written, ascending."""
        done = set(self._read_markers())
        return [i for i in range(self.num_shards) if i not in done]

    def assigned_shards(self, rank: int = 0, world_size: int = 1, missing_only: bool = True) -> list[int]:
        """The shards writer ``rank`` of ``world_size`` should write: ``i % world_size == rank``."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"invalid rank {rank} of world size {world_size}")
        shards = self.missing_shards() if missing_only else range(self.num_shards)
        return [i for i in shards if i % world_size == rank]

    def is_complete(self) -> bool:
        """Whether every shard is finished."""
        return not self.missing_shards()

    # ------------------------------------------------------------------------------------ writing

    def _normalise_failures(self, failures: Iterable[FailureLike]) -> list[Failure]:
        """``failures`` as :class:`Failure` objects of images of the list, empty paths filled in."""
        out = []
        for item in failures:
            f = as_failure(item)
            if not 0 <= f.index < self.num_images:
                raise DataError(f"failure for image index {f.index}, outside [0, {self.num_images})")
            if not f.path:
                f = dataclasses.replace(f, path=self.images[f.index])
            out.append(f)
        return out

    def record_failures(self, failures: Iterable[FailureLike]) -> None:
        """Record images that could not be processed, before their shard is written.

        Items are :class:`Failure`, ``(index, reason)``, ``(index, path, reason)`` or mappings;
        an empty path is filled from the image list. They are kept per shard and move into the
        shard's done-marker when :meth:`write_shard` runs (a later success for the image wins).
        """
        by_shard: dict[int, list[Failure]] = {}
        for f in self._normalise_failures(failures):
            by_shard.setdefault(self.shard_of(f.index), []).append(f)
        finished = set(self._read_markers())
        for i, items in sorted(by_shard.items()):
            if i in finished:
                raise DataError(
                    f"shard {i} is already finished; failures of its images must be passed before or "
                    "to write_shard"
                )
            merged = read_pending_failures(pending_path(self.root, i))
            merged.update({f.index: f for f in items})
            write_json(pending_path(self.root, i), {"failures": [merged[k].to_dict() for k in sorted(merged)]})

    def write_shard(
        self,
        i: int,
        descriptors: torch.Tensor | np.ndarray,
        indices: torch.Tensor | np.ndarray | Sequence[int],
        failures: Iterable[FailureLike] = (),
    ) -> Path:
        """Write shard ``i`` atomically, then its done-marker, then refresh the manifest.

        ``descriptors[j]`` belongs to image ``indices[j]``; rows are stored sorted by index, cast to
        the store's dtype. Every image of :meth:`shard_items` must be either in ``indices`` or a
        failure (given here or recorded earlier with :meth:`record_failures`).
        """
        self._check_shard(i)
        desc, idx = shard_rows(i, descriptors, indices, self.shard_items(i), self.descriptor_dim)
        fails = self._shard_failures(i, idx, failures)
        path = shard_path(self.root, i)
        digest, size = write_shard_file(path, i, desc.to(self.dtype), idx)
        marker = {
            "shard": int(i),
            "file": path.name,
            "count": int(idx.numel()),
            "dim": int(desc.shape[1]) if idx.numel() else None,
            "dtype": self._static["dtype"],
            "sha256": digest,
            "bytes": size,
            "failures": [f.to_dict() for f in fails],
            "finished_at": utc_now(),
            "writer": {"host": socket.gethostname(), "pid": os.getpid(), "rank": os.environ.get("RANK")},
        }
        with file_lock(self.root / LOCK):  # the marker commits the shard: only into this very store
            self._check_still_there()
            write_json(marker_path(self.root, i), marker)
            pending_path(self.root, i).unlink(missing_ok=True)
            write_json(self.root / MANIFEST, self.manifest())
        return path

    def _shard_failures(self, i: int, idx: torch.Tensor, failures: Iterable[FailureLike]) -> list[Failure]:
        """Failures of shard ``i`` (recorded and given) for the images without a row; all images accounted for."""
        items = self.shard_items(i)
        pending = read_pending_failures(pending_path(self.root, i))
        pending.update({f.index: f for f in self._normalise_failures(failures)})
        present = set(idx.tolist())
        fails = [pending[k] for k in sorted(pending) if k not in present]
        if any(not items.start <= f.index < items.stop for f in fails):
            raise DataError(f"shard {i}: a failure names an image outside {items.start}..{items.stop - 1}")
        unaccounted = sorted(set(items) - present - {f.index for f in fails})
        if unaccounted:
            raise DataError(
                f"shard {i}: {len(unaccounted)} image(s) have neither a descriptor nor a recorded failure "
                f"(e.g. {unaccounted[:5]}); pass their failures to write_shard or record_failures"
            )
        return fails

    def failures(self) -> list[Failure]:
        """All recorded failures (finished shards' and pending ones), by image index."""
        out = {}
        markers = self._read_markers()
        for i in range(self.num_shards):
            if i in markers:
                out.update({d["index"]: Failure(**d) for d in markers[i].get("failures", [])})
            else:
                out.update(read_pending_failures(pending_path(self.root, i)))
        return [out[k] for k in sorted(out)]

    def manifest(self) -> dict[str, Any]:
        """The manifest as derived from disk now (what :meth:`refresh_manifest` writes)."""
        markers = self._read_markers()
        finished = sorted(markers)
        fails = self.failures()
        return {
            **self._static,
            **({"store_id": self._store_id} if self._store_id is not None else {}),
            "updated": utc_now(),
            "descriptor_dim": self.descriptor_dim,
            "num_finished": len(finished),
            "finished_shards": finished,
            "complete": len(finished) == self.num_shards,
            "num_failures": len(fails),
            "failures": [f.to_dict() for f in fails],
            "note": "finished_shards and failures are a snapshot of the shard-*.done.json markers, "
            "which are authoritative",
        }

    def refresh_manifest(self) -> None:
        """Rewrite ``manifest.json`` from the markers on disk (atomically, under the lock)."""
        with file_lock(self.root / LOCK):  # without flock the manifest may lag, never corrupt
            self._check_still_there()
            write_json(self.root / MANIFEST, self.manifest())

    def _check_still_there(self) -> None:
        """Raise if the manifest on disk is no longer this store's (removed, or replaced with --overwrite)."""
        if not is_on_disk(self.root, self._static, self._store_id):
            raise DataError(
                f"the descriptor store {self.root} was removed or replaced by another process (--overwrite) while "
                "this one was writing to it; nothing more was written. Run the command again (one writer per --out)"
            )

    def finalize(self) -> None:
        """Refresh the manifest and remove temp files left by killed writers.

        Call it from one process once all writers are done (temp files of a live writer would go).
        """
        for p in self.root.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp") and OWN_FILE_RE.match(p.name):
                p.unlink(missing_ok=True)
        self.refresh_manifest()

    # ------------------------------------------------------------------------------------ reading

    def read_shard(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(descriptors, indices)`` of finished shard ``i`` as numpy arrays."""
        self._check_shard(i)
        marker = self._read_markers().get(i)
        if marker is None:
            raise DataError(f"shard {i} of {self.root} is not finished; run the extraction again to resume")
        return read_shard_file(shard_path(self.root, i), marker_path(self.root, i), marker["sha256"], marker["count"])

    def load(
        self, numpy: bool = False, mmap: bool = False, require_complete: bool = True
    ) -> tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]:
        """All descriptors in image order and a validity mask: ``(descriptors (N, d), valid (N,))``.

        Rows of failed (or, with ``require_complete=False``, unfinished) images are zero and
        ``valid`` is False there. ``numpy`` returns numpy arrays instead of tensors. ``mmap``
        builds once (and reuses while the shards are unchanged) a consolidated ``descriptors.npy``
        + ``valid.npy`` in the store and memory-maps it: read-only arrays with ``numpy``,
        copy-on-write tensors otherwise; it needs a complete store.
        """
        missing = self.missing_shards()
        if missing and (require_complete or mmap):
            raise DataError(
                f"{self.root} is incomplete: {len(missing)} of {self.num_shards} shards missing "
                f"(e.g. {missing[:5]}); run the extraction again to resume"
            )
        dim = self.descriptor_dim
        if dim is None:
            raise DataError(f"{self.root} holds no descriptors yet (every finished image failed or none finished)")
        if mmap:
            desc_path, valid_path = self._consolidated(dim)
            if numpy:
                return np.load(desc_path, mmap_mode="r"), np.load(valid_path, mmap_mode="r")
            return (
                torch.from_numpy(np.load(desc_path, mmap_mode="c")),
                torch.from_numpy(np.load(valid_path, mmap_mode="c")),
            )
        out = np.zeros((self.num_images, dim), dtype=np_dtype(self.dtype))
        valid = np.zeros(self.num_images, dtype=bool)
        self._fill(out, valid, dim)
        if numpy:
            return out, valid
        return torch.from_numpy(out), torch.from_numpy(valid)

    def _fill(self, out: np.ndarray, valid: np.ndarray, dim: int) -> None:
        for i in self.finished_shards():
            desc, idx = self.read_shard(i)
            if desc.shape[0] and desc.shape[1] != dim:
                raise DataError(f"shard {i} holds {desc.shape[1]}-d descriptors, the others {dim}-d; re-extract")
            out[idx] = desc
            valid[idx] = True

    def _consolidated(self, dim: int) -> tuple[Path, Path]:
        shards = {str(i): m["sha256"] for i, m in sorted(self._read_markers().items())}
        return consolidated_files(self.root, shards, (self.num_images, dim), np_dtype(self.dtype),
                                  lambda out, valid: self._fill(out, valid, dim))

    def verify(self) -> list[str]:
        """Re-hash every finished shard against its marker; returns the problems found (empty: OK)."""
        problems = []
        for i, marker in sorted(self._read_markers().items()):
            path = shard_path(self.root, i)
            if not path.is_file():
                problems.append(f"shard {i}: {path.name} is missing")
            elif file_sha256(path) != marker.get("sha256"):
                problems.append(f"shard {i}: {path.name} does not match the sha256 in its marker")
        return problems

    def __repr__(self) -> str:
        markers = self._read_markers()
        n_fail = sum(len(m.get("failures", [])) for m in markers.values())
        model = self.model_info.get("hash") or self.model_info.get("name") or "?"
        model = str(model)[:12]
        return (
            f"DescriptorStore({str(self.root)!r}, images={self.num_images}, "
            f"shards={len(markers)}/{self.num_shards} finished, dim={self.descriptor_dim}, "
            f"dtype={self._static['dtype']}, model={model}, failures={n_fail})"
        )


__all__ = ["DescriptorStore", "Failure"]
