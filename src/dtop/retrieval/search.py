"""Nearest-neighbour search by inner product (cosine similarity for L2-normalised descriptors).

- :func:`search`: exact search with torch: the database is scored chunk by chunk (a matrix
  product) and a running top-k is merged, so memory stays bounded at any collection size. The
  database may be a list of matrices (e.g. ``[database, distractors]``), numpy (memory-mapped
  ``.npy`` works) or torch, float16/bfloat16/float32/float64; chunks are converted on the fly.
- :func:`iter_scores`: the same chunked scoring, yielding the score blocks (for
  :func:`dtop.retrieval.metrics.evaluate_scores`).
- :class:`FaissIndex`: a faiss index (optional dependency ``faiss-cpu``/``faiss-gpu``) built from an
  index-factory string (``"Flat"`` is exact inner product, ``"IVF4096,PQ64"`` etc. approximate).
- :func:`build_index` / :func:`load_index`: one interface, ``engine="torch" | "faiss"``.

Every engine returns ``(scores, indices)``: numpy arrays ``(n_queries, k)``, float32 and int64,
best first. Exact equal scores are ordered by increasing database index (the tie rule of
:mod:`dtop.retrieval.metrics`); :func:`search` also selects the top k by that rule, so its lists
are exactly the first k of a stable sort of ``-scores``.

Peak extra memory of :func:`search` / :func:`iter_scores`: one converted database chunk
(``chunk_size * dim * 4`` bytes, none when the database is float32 numpy/torch on the device),
the score block (``n_queries * chunk_size * 4``) and a few top-k buffers; with the default chunk
size (at most 65,536 rows and at most 1/8 of the collection) this stays far below half of the
database matrix.
"""

from __future__ import annotations

import abc
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dtop.errors import ConfigError, DataError
from dtop.utils.io import atomic_path

ENGINES: tuple[str, ...] = ("torch", "faiss")
MAX_CHUNK = 1 << 16
MIN_CHUNK = 1024
SCORE_BUDGET = 1 << 24  # elements of one score block (64 MiB in float32)
PROGRESS_MIN_ROWS = 500_000  # show a progress bar by default from this collection size on

FAISS_INSTALL_HINT = (
    "faiss is not installed; install it with `pip install faiss-cpu` (or `pip install 'dtop[faiss]'`; "
    "`faiss-gpu` for GPUs), or use engine='torch' (exact search, no extra dependency)"
)


# ----------------------------------------------------------------------------------- helpers


def _check_matrix(x: Any, what: str) -> np.ndarray | torch.Tensor:
    if not isinstance(x, np.ndarray | torch.Tensor):
        try:
            x = np.asarray(x)
        except Exception as err:
            raise DataError(f"{what} must be a 2-D numpy array or torch tensor, got {type(x).__name__}") from err
    if x.ndim != 2:
        raise DataError(f"{what} must be 2-D (n, dim), got shape {tuple(x.shape)}")
    floating = x.is_floating_point() if isinstance(x, torch.Tensor) else x.dtype.kind == "f"
    if not floating:
        raise DataError(f"{what} must hold floating-point descriptors, got dtype {x.dtype}")
    return x


def _parts(database: Any) -> list[np.ndarray | torch.Tensor]:
    if isinstance(database, list | tuple) and database and isinstance(database[0], np.ndarray | torch.Tensor):
        parts = [_check_matrix(p, f"database part {i}") for i, p in enumerate(database)]
    else:
        parts = [_check_matrix(database, "database")]
    dims = {int(p.shape[1]) for p in parts}
    if len(dims) > 1:
        raise DataError(f"database parts have different descriptor dimensions {sorted(dims)}")
    if sum(int(p.shape[0]) for p in parts) == 0:
        raise DataError("the database is empty: there is nothing to search")
    return parts


def _device(device: str | torch.device | None, queries: Any, parts: list[Any]) -> torch.device:
    if device is None:  # where the data already is: a CUDA tensor among the inputs, else the CPU
        for x in (queries, *parts):
            if isinstance(x, torch.Tensor) and x.device.type != "cpu":
                return x.device
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' was asked for but CUDA is not available; use device='cpu'")
    return dev


def _compute_dtype(*xs: Any) -> torch.dtype:
    return torch.float64 if all(x.dtype in (np.float64, torch.float64) for x in xs) else torch.float32


def _to_tensor(x: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        with warnings.catch_warnings():  # read-only memory maps: we never write to them
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(np.ascontiguousarray(x))
    return x.to(device=device, dtype=dtype)


def _chunk_rows(n_total: int, n_queries: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ConfigError(f"chunk_size must be a positive number of database rows, got {chunk_size}")
        return int(chunk_size)
    rows = min(MAX_CHUNK, max(MIN_CHUNK, n_total // 8), max(MIN_CHUNK, SCORE_BUDGET // max(1, n_queries)))
    return int(rows)


def _progress(progress: bool | None, n_total: int) -> bool:
    return n_total >= PROGRESS_MIN_ROWS if progress is None else bool(progress)


def _iter_chunks(
    parts: list[np.ndarray | torch.Tensor], rows: int, device: torch.device, dtype: torch.dtype
) -> Iterator[tuple[int, torch.Tensor]]:
    offset = 0
    for part in parts:
        for start in range(0, int(part.shape[0]), rows):
            chunk = _to_tensor(part[start : start + rows], device, dtype)
            yield offset + start, chunk
        offset += int(part.shape[0])


# ------------------------------------------------------------------------------------- torch


def iter_scores(
    queries: Any,
    database: Any,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> Iterator[torch.Tensor]:
    """Yield similarity blocks ``queries @ chunk.T`` of shape ``(n_queries, c)`` over the database.

    Blocks cover the database rows in order (all parts of a list, one after the other); they are
    float32 tensors on ``device`` (float64 if all inputs are float64).
    """
    queries = _check_matrix(queries, "queries")
    parts = _parts(database)
    if int(queries.shape[1]) != int(parts[0].shape[1]):
        raise DataError(
            f"queries have dimension {queries.shape[1]} but the database has {parts[0].shape[1]}; "
            "extract both with the same model"
        )
    dev = _device(device, queries, parts)
    dtype = _compute_dtype(queries, *parts)
    n_total = sum(int(p.shape[0]) for p in parts)
    rows = _chunk_rows(n_total, int(queries.shape[0]), chunk_size)
    q = _to_tensor(queries, dev, dtype)
    bar = tqdm(total=n_total, unit="img", desc="scoring", disable=not _progress(progress, n_total))
    with torch.inference_mode(), bar:
        for _, chunk in _iter_chunks(parts, rows, dev, dtype):
            yield q @ chunk.T
            bar.update(int(chunk.shape[0]))


def _block_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of each row by (score desc, column asc), exact also when ties straddle the k-th place.

    ``topk`` picks arbitrarily among equal scores, so it is asked for k + 1: where the smallest of
    those is unique, the k best are unambiguous; otherwise (rare) the row is stably sorted.
    """
    n = scores.shape[1]
    if k >= n:
        res = torch.sort(scores, dim=1, descending=True, stable=True)
        return res.values, res.indices
    vals, idx = torch.topk(scores, k + 1, dim=1, largest=True, sorted=False)
    lowest = vals.min(dim=1, keepdim=True).values
    crowded = ((vals == lowest).sum(dim=1) > 1).nonzero().squeeze(1)
    # order candidates by (score desc, column asc): sort by column, then stable sort by score
    idx, perm = torch.sort(idx, dim=1)
    vals = vals.gather(1, perm)
    vals, perm = torch.sort(vals, dim=1, descending=True, stable=True)
    vals, idx = vals[:, :k], idx.gather(1, perm)[:, :k]
    if crowded.numel():  # equal scores at the boundary: take the lowest columns among them
        sub = torch.sort(scores[crowded], dim=1, descending=True, stable=True)
        vals[crowded] = sub.values[:, :k]
        idx[crowded] = sub.indices[:, :k]
    return vals, idx


def search(
    queries: Any,
    database: Any,
    topk: int,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    query_chunk_size: int | None = None,
    progress: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``topk`` inner-product search; returns ``(scores, indices)`` of shape (n_queries, k).

    ``k = min(topk, n_database)``. The database (an array or a list of arrays searched as their
    concatenation) is scored in chunks of ``chunk_size`` rows (default: automatic, bounded
    memory) and queries in blocks of ``query_chunk_size``. Lists are ordered by decreasing score,
    equal scores by increasing index: exactly the first k of ``np.argsort(-s, kind="stable")``.
    """
    queries = _check_matrix(queries, "queries")
    parts = _parts(database)
    if int(queries.shape[1]) != int(parts[0].shape[1]):
        raise DataError(
            f"queries have dimension {queries.shape[1]} but the database has {parts[0].shape[1]}; "
            "extract both with the same model"
        )
    if int(topk) < 1:
        raise ConfigError(f"topk must be at least 1, got {topk}")
    n_total = sum(int(p.shape[0]) for p in parts)
    nq = int(queries.shape[0])
    k = min(int(topk), n_total)
    dev = _device(device, queries, parts)
    dtype = _compute_dtype(queries, *parts)
    qb = int(query_chunk_size) if query_chunk_size else max(1, min(nq, 4096))
    if qb < 1:
        raise ConfigError(f"query_chunk_size must be positive, got {query_chunk_size}")
    rows = max(_chunk_rows(n_total, qb, chunk_size), 1)
    out_scores = np.empty((nq, k), dtype=np.float32 if dtype == torch.float32 else np.float64)
    out_index = np.empty((nq, k), dtype=np.int64)
    n_steps = -(-nq // qb) * n_total
    bar = tqdm(total=n_steps, unit="img", desc="searching", disable=not _progress(progress, n_total))
    with torch.inference_mode(), bar:
        for q0 in range(0, nq, qb):
            q = _to_tensor(queries[q0 : q0 + qb], dev, dtype)
            best_v = torch.empty((q.shape[0], 0), device=dev, dtype=dtype)
            best_i = torch.empty((q.shape[0], 0), device=dev, dtype=torch.int64)
            for offset, chunk in _iter_chunks(parts, rows, dev, dtype):
                s = q @ chunk.T
                lo, hi = torch.aminmax(s)  # NaN propagates
                if not (math.isfinite(lo) and math.isfinite(hi)):
                    raise DataError(
                        f"scores of database rows {offset}..{offset + chunk.shape[0] - 1} are NaN or "
                        "infinite; the descriptors contain NaN/inf (check the extraction)"
                    )
                v, i = _block_topk(s, min(k, s.shape[1]))
                # running lists hold smaller indices: a stable sort keeps the index order on ties
                best_v, perm = torch.sort(torch.cat([best_v, v], 1), dim=1, descending=True, stable=True)
                best_i = torch.cat([best_i, i + offset], 1).gather(1, perm)
                best_v, best_i = best_v[:, :k], best_i[:, :k]
                bar.update(int(chunk.shape[0]))
            out_scores[q0 : q0 + qb] = best_v.cpu().numpy()
            out_index[q0 : q0 + qb] = best_i.cpu().numpy()
    return out_scores, out_index


def to_ranks(indices: np.ndarray | torch.Tensor) -> np.ndarray:
    """Convert search results ``(n_queries, k)`` to the reference ranks layout ``(k, n_queries)``."""
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    indices = np.asarray(indices)
    if indices.ndim != 2:
        raise DataError(f"indices must be 2-D (n_queries, k), got shape {indices.shape}")
    return np.ascontiguousarray(indices.T.astype(np.int64, copy=False))


# ----------------------------------------------------------------------------- index interface


class SearchIndex(abc.ABC):
    """A searchable collection of descriptors (inner-product similarity)."""

    engine: str = ""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Descriptor dimension."""

    @property
    @abc.abstractmethod
    def ntotal(self) -> int:
        """Number of descriptors in the index."""

    @abc.abstractmethod
    def add(self, descriptors: Any) -> None:
        """Append descriptors ``(n, dim)``; they get the next consecutive indices."""

    @abc.abstractmethod
    def search(self, queries: Any, topk: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``topk`` neighbours: ``(scores, indices)``, numpy ``(n_queries, k)``, best first."""

    @abc.abstractmethod
    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ``path`` atomically."""


class TorchIndex(SearchIndex):
    """Exact search with :func:`search` over the added matrices (kept by reference, not copied)."""

    engine = "torch"

    def __init__(self, dim: int, device: str | torch.device | None = None, chunk_size: int | None = None) -> None:
        if int(dim) < 1:
            raise ConfigError(f"dim must be positive, got {dim}")
        self._dim = int(dim)
        self.device = device
        self.chunk_size = chunk_size
        self.parts: list[np.ndarray | torch.Tensor] = []

    @property
    def dim(self) -> int:
        """Descriptor dimension."""
        return self._dim

    @property
    def ntotal(self) -> int:
        """Number of descriptors in the index."""
        return sum(int(p.shape[0]) for p in self.parts)

    def add(self, descriptors: Any) -> None:
        """Append descriptors ``(n, dim)``."""
        x = _check_matrix(descriptors, "descriptors")
        if int(x.shape[1]) != self._dim:
            raise DataError(f"descriptors have dimension {x.shape[1]}, the index has {self._dim}")
        self.parts.append(x)

    def search(self, queries: Any, topk: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``topk`` search (see :func:`search`)."""
        if not self.parts:
            raise DataError("the index is empty: add descriptors before searching")
        return search(queries, self.parts, topk, chunk_size=self.chunk_size, device=self.device)

    def save(self, path: str | os.PathLike) -> None:
        """Write all descriptors as one ``.npy`` matrix (float32 unless all parts are float16)."""
        if not self.parts:
            raise DataError("the index is empty: nothing to save")
        half = all(p.dtype in (np.float16, torch.float16) for p in self.parts)
        dtype = np.float16 if half else np.float32
        with atomic_path(path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(self.ntotal, self._dim))
            row = 0
            for p in self.parts:
                for start in range(0, int(p.shape[0]), MAX_CHUNK):
                    block = p[start : start + MAX_CHUNK]
                    if isinstance(block, torch.Tensor):
                        block = block.detach().cpu().float().numpy()
                    out[row : row + block.shape[0]] = block
                    row += block.shape[0]
            out.flush()
            del out

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None, mmap: bool = True) -> TorchIndex:
        """Open a ``.npy`` descriptor matrix (memory-mapped by default)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"index file not found: {path}")
        try:
            x = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except ValueError as err:
            raise DataError(f"{path}: not a .npy descriptor matrix ({err})") from err
        x = _check_matrix(x, str(path))
        index = cls(int(x.shape[1]), device=device)
        index.add(x)
        return index


def _import_faiss() -> Any:
    try:
        import faiss  # noqa: PLC0415 - optional dependency, imported on demand
    except ImportError as err:
        raise ConfigError(FAISS_INSTALL_HINT) from err
    return faiss


class FaissIndex(SearchIndex):
    """A faiss index for inner-product search, built from an index-factory string.

    ``"Flat"`` is exact; anything else (``"IVF1024,Flat"``, ``"IVF4096,PQ64"``, ``"HNSW32"``) is
    approximate and may need training (done on the first :meth:`add`, or call :meth:`train`).
    ``search_params`` are faiss ParameterSpace settings, e.g. ``"nprobe=32"``. ``device="cuda"``
    moves the index to all GPUs (needs ``faiss-gpu``).
    """

    engine = "faiss"

    def __init__(
        self,
        dim: int,
        factory: str = "Flat",
        search_params: str | None = None,
        device: str | torch.device | None = None,
        index: Any = None,
    ) -> None:
        faiss = _import_faiss()
        self.faiss = faiss
        self.factory = factory
        self.search_params = search_params
        if index is None:
            try:
                index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
            except RuntimeError as err:
                raise ConfigError(
                    f"faiss cannot build index '{factory}' for dimension {dim}: {str(err).strip()}; see "
                    "https://github.com/facebookresearch/faiss/wiki/The-index-factory ('Flat' is exact)"
                ) from err
        self.gpu = device is not None and torch.device(device).type == "cuda"
        if self.gpu:
            if not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() == 0:
                raise ConfigError("device='cuda' needs faiss-gpu and a visible GPU; use device='cpu'")
            index = faiss.index_cpu_to_all_gpus(index)
        self.index = index
        if search_params:
            self._apply_params(search_params)

    def _apply_params(self, params: str) -> None:
        space = self.faiss.GpuParameterSpace() if self.gpu else self.faiss.ParameterSpace()
        try:
            space.set_index_parameters(self.index, params)
        except RuntimeError as err:
            raise ConfigError(f"faiss rejects search parameters '{params}': {str(err).strip()}") from err

    @property
    def dim(self) -> int:
        """Descriptor dimension."""
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        """Number of descriptors in the index."""
        return int(self.index.ntotal)

    def _blocks(self, x: Any) -> Iterator[np.ndarray]:
        x = _check_matrix(x, "descriptors")
        if int(x.shape[1]) != self.dim:
            raise DataError(f"descriptors have dimension {x.shape[1]}, the index has {self.dim}")
        for start in range(0, int(x.shape[0]), MAX_CHUNK):
            block = x[start : start + MAX_CHUNK]
            if isinstance(block, torch.Tensor):
                block = block.detach().cpu().float().numpy()
            yield np.ascontiguousarray(block, dtype=np.float32)

    def train(self, descriptors: Any) -> None:
        """Train the index (IVF centroids, PQ codebooks) on ``descriptors``; no-op when not needed."""
        if self.index.is_trained:
            return
        blocks = list(self._blocks(descriptors))
        self.index.train(blocks[0] if len(blocks) == 1 else np.concatenate(blocks))

    def add(self, descriptors: Any) -> None:
        """Append descriptors; trains on them first if the index is untrained."""
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
        index = self.faiss.index_gpu_to_cpu(self.index) if self.gpu else self.index
        with atomic_path(path) as tmp:
            self.faiss.write_index(index, str(tmp))

    @classmethod
    def load(
        cls, path: str | os.PathLike, search_params: str | None = None, device: str | torch.device | None = None
    ) -> FaissIndex:
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
        return cls(index.d, factory="<loaded>", search_params=search_params, device=device, index=index)


def build_index(
    descriptors: Any,
    engine: str = "torch",
    factory: str = "Flat",
    device: str | torch.device | None = None,
    search_params: str | None = None,
) -> SearchIndex:
    """Build a search index over ``descriptors`` (n, dim) with ``engine`` ``"torch"`` or ``"faiss"``.

    ``factory`` and ``search_params`` apply to faiss only (the torch engine is always exact).
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown search engine '{engine}'; choose one of {', '.join(ENGINES)}")
    x = _check_matrix(descriptors, "descriptors")
    index: SearchIndex
    if engine == "torch":
        if factory not in ("Flat", "", None):
            raise ConfigError(f"engine 'torch' is exact and takes no index factory (got '{factory}'); use faiss")
        index = TorchIndex(int(x.shape[1]), device=device)
    else:
        index = FaissIndex(int(x.shape[1]), factory=factory, search_params=search_params, device=device)
    index.add(x)
    return index


def load_index(path: str | os.PathLike, device: str | torch.device | None = None) -> SearchIndex:
    """Open a saved index: ``.npy`` → torch engine, anything else → faiss."""
    if Path(path).suffix.lower() == ".npy":
        return TorchIndex.load(path, device=device)
    return FaissIndex.load(path, device=device)
