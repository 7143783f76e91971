"""A faiss index for inner-product search (optional dependency ``faiss-cpu``).

:class:`FaissIndex` wraps an index built from a faiss index-factory string (``"Flat"`` is exact,
``"IVF4096,PQ64"``, ``"HNSW32"`` approximate) and returns results like
:func:`dtop.retrieval.search.search`: ``(scores, indices)``, best first, equal scores by
increasing index.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtop.errors import ConfigError, DataError
from dtop.retrieval.search import CONVERT_BUDGET, check_matrix
from dtop.utils.io import atomic_path

#: Training vectors at most: faiss samples its training sets anyway (k-means: 256 points per
#: centroid, IVF lists and PQ codebooks alike; PCA: 1000 per input dimension), so a larger set is
#: only converted to float32 and then dropped.
TRAIN_PER_CENTROID = 256
TRAIN_PER_DIM = 1000

FAISS_INSTALL_HINT = (
    "faiss is not installed; install it with `pip install faiss-cpu` (or `pip install 'dtop[faiss]'`), "
    "or use engine='torch' (exact search, no extra dependency)"
)


def _import_faiss() -> Any:
    try:
        import faiss  # optional dependency, imported on demand
    except ImportError as err:
        raise ConfigError(FAISS_INSTALL_HINT) from err
    return faiss


class FaissIndex:
    """A faiss index for inner-product search, built from an index-factory string.

    ``"Flat"`` is exact; anything else (``"IVF1024,Flat"``, ``"IVF4096,PQ64"``, ``"HNSW32"``) is
    approximate and may need training (done on the first :meth:`add`, or call :meth:`train`).
    ``search_params`` are faiss ParameterSpace settings, e.g. ``"nprobe=32"``. The index runs on
    the CPU.
    """

    def __init__(
        self,
        dim: int,
        factory: str = "Flat",
        search_params: str | None = None,
        index: Any = None,
    ) -> None:
        faiss = _import_faiss()
        self.faiss = faiss
        if index is None:
            try:
                index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
            except RuntimeError as err:
                raise ConfigError(
                    f"faiss cannot build index '{factory}' for dimension {dim}: {str(err).strip()}; see "
                    "https://github.com/facebookresearch/faiss/wiki/The-index-factory ('Flat' is exact)"
                ) from err
        self.index = index
        if search_params:
            try:
                faiss.ParameterSpace().set_index_parameters(index, search_params)
            except RuntimeError as err:
                raise ConfigError(
                    f"faiss rejects search parameters '{search_params}': {str(err).strip()}"
                ) from err

    @property
    def dim(self) -> int:
        """Descriptor dimension."""
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        """Number of descriptors in the index."""
        return int(self.index.ntotal)

    def _parts(self, x: Any) -> list[np.ndarray | torch.Tensor]:
        parts = x if isinstance(x, list | tuple) else [x]
        checked = [check_matrix(p, "descriptors") for p in parts]
        for p in checked:
            if int(p.shape[1]) != self.dim:
                raise DataError(f"descriptors have dimension {p.shape[1]}, the index has {self.dim}")
        return checked

    def _blocks(self, x: Any) -> Iterator[np.ndarray]:
        """Float32 blocks of ``x`` (a matrix or a list of them), converted one block at a time."""
        for part in self._parts(x):
            step = max(1, CONVERT_BUDGET // self.dim)
            for start in range(0, int(part.shape[0]), step):
                block = part[start : start + step]
                if isinstance(block, torch.Tensor):
                    block = block.detach().cpu().float().numpy()
                yield np.ascontiguousarray(block, dtype=np.float32)

    def train_size(self) -> int:
        """How many vectors training uses at most (more would be sampled away by faiss)."""
        try:
            nlist = int(self.faiss.extract_index_ivf(self.index).nlist)
        except RuntimeError:  # not an IVF index
            nlist = 0
        return max(TRAIN_PER_DIM * self.dim, TRAIN_PER_CENTROID * nlist)

    def train(self, descriptors: Any) -> None:
        """Train the index (IVF centroids, PQ codebooks) on ``descriptors``; no-op when not needed.

        ``descriptors``: a matrix or a list of them (e.g. a float16 store's parts). At most
        :meth:`train_size` rows are used, evenly spaced, converted to float32 part by part.
        """
        if self.index.is_trained:
            return
        parts = self._parts(descriptors)
        n = sum(int(p.shape[0]) for p in parts)
        rows = np.unique(np.linspace(0, n - 1, num=min(n, self.train_size())).round().astype(np.int64))
        sample = np.empty((rows.size, self.dim), dtype=np.float32)
        start = 0
        for part in parts:
            inside = rows[(rows >= start) & (rows < start + int(part.shape[0]))]
            picked = part[torch.from_numpy(inside - start)] if isinstance(part, torch.Tensor) else part[inside - start]
            if isinstance(picked, torch.Tensor):
                picked = picked.detach().cpu().float().numpy()
            sample[np.searchsorted(rows, inside)] = picked
            start += int(part.shape[0])
        self.index.train(sample)

    def add(self, descriptors: Any) -> None:
        """Append descriptors (a matrix or a list of them); trains on them first if untrained."""
        if not self.index.is_trained:
            self.train(descriptors)
        for block in self._blocks(descriptors):
            self.index.add(block)

    def search(self, queries: Any, topk: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``topk`` search; equal scores are reordered by increasing index within each list.

        With an approximate index fewer than k results can come back; missing ones have index -1.
        """
        if self.ntotal == 0:
            raise DataError("the index is empty: add descriptors before searching")
        if int(topk) < 1:
            raise ConfigError(f"topk must be at least 1, got {topk}")
        k = min(int(topk), self.ntotal)
        q = np.concatenate(list(self._blocks(queries)))
        scores, idx = self.index.search(q, k)
        # the tie rule: among equal scores, smaller index first (-1 = missing stays last)
        key_idx = np.where(idx < 0, np.iinfo(np.int64).max, idx)
        order = np.lexsort((key_idx, -scores.astype(np.float64)), axis=1)
        return (
            np.take_along_axis(scores, order, 1).astype(np.float32, copy=False),
            np.take_along_axis(idx, order, 1).astype(np.int64, copy=False),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the index with ``faiss.write_index`` (atomically)."""
        with atomic_path(path) as tmp:
            self.faiss.write_index(self.index, str(tmp))

    @classmethod
    def load(cls, path: str | os.PathLike, search_params: str | None = None) -> FaissIndex:
        """Read an index written by :meth:`save` (or any faiss inner-product index)."""
        faiss = _import_faiss()
        path = Path(path)
        if not path.is_file():
            raise DataError(f"index file not found: {path}")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as err:
            raise DataError(f"{path}: not a readable faiss index ({str(err).strip()})") from err
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise DataError(f"{path}: the faiss index does not use inner-product similarity; rebuild it")
        return cls(index.d, search_params=search_params, index=index)
