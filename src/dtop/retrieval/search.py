"""Exact nearest-neighbour search by inner product (cosine similarity for L2-normalised descriptors).

:func:`search` returns the top k of every query, :func:`iter_scores` yields the score blocks and
:class:`RunningTopK` keeps the top k over them; the database is scored chunk by chunk (converted
per chunk, e.g. from float16), so memory stays bounded at any collection size (design notes in
docs/retrieval.md). Results are ``(scores, indices)`` numpy arrays ``(n_queries, k)``, best first,
equal scores by increasing database index.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dtop.errors import ConfigError, DataError
from dtop.retrieval.positions import ScoreBlocks

MAX_CHUNK = 1 << 16
MIN_CHUNK = 1024
SCORE_BUDGET = 1 << 24  # elements of one score block (64 MiB in float32)
CONVERT_BUDGET = 1 << 23  # elements of the buffer a chunk is converted into (32 MiB in float32)
PROGRESS_MIN_ROWS = 500_000  # show a progress bar by default from this collection size on


# ----------------------------------------------------------------------------------- helpers


def check_matrix(x: Any, what: str) -> np.ndarray | torch.Tensor:
    """``x`` as a 2-D floating-point numpy array or tensor (converted if it is neither), else DataError."""
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
        parts = [check_matrix(p, f"database part {i}") for i, p in enumerate(database)]
    else:
        parts = [check_matrix(database, "database")]
    dims = {int(p.shape[1]) for p in parts}
    if len(dims) > 1:
        raise DataError(f"database parts have different descriptor dimensions {sorted(dims)}")
    if sum(int(p.shape[0]) for p in parts) == 0:
        raise DataError("the database is empty: there is nothing to search")
    return parts


def _inputs(queries: Any, database: Any) -> tuple[np.ndarray | torch.Tensor, list[np.ndarray | torch.Tensor]]:
    """Checked queries and database parts of one descriptor dimension."""
    queries = check_matrix(queries, "queries")
    parts = _parts(database)
    if int(queries.shape[1]) != int(parts[0].shape[1]):
        raise DataError(
            f"queries have dimension {queries.shape[1]} but the database has {parts[0].shape[1]}; "
            "extract both with the same model"
        )
    return queries, parts


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


def chunk_rows(n_total: int, n_queries: int, chunk_size: int | None) -> int:
    """Database rows scored at once: ``chunk_size``, or by default a bounded score block."""
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
    """``(first row, chunk)`` over the database, each chunk on ``device`` in ``dtype``.

    A chunk that needs converting (another dtype, e.g. a float16 store, or another device) is
    copied into one buffer of at most ``CONVERT_BUDGET`` elements reused for every chunk (such
    chunks are smaller), so the whole matrix is never converted at once and no fresh memory is
    touched per chunk. A chunk is only valid until the next one is made.
    """
    buffer: torch.Tensor | None = None
    offset = 0
    for part in parts:
        step = rows
        if _needs_conversion(part, device, dtype):
            step = max(1, min(rows, CONVERT_BUDGET // max(1, int(part.shape[1]))))
        for start in range(0, int(part.shape[0]), step):
            piece = part[start : start + step]
            if isinstance(piece, np.ndarray):
                with warnings.catch_warnings():  # read-only memory maps: we never write to them
                    warnings.simplefilter("ignore", UserWarning)
                    piece = torch.from_numpy(np.ascontiguousarray(piece))
            if piece.dtype == dtype and piece.device == device:
                yield offset + start, piece
                continue
            if buffer is None or buffer.shape[0] < piece.shape[0]:
                buffer = torch.empty((step, int(piece.shape[1])), dtype=dtype, device=device)
            chunk = buffer[: piece.shape[0]]
            chunk.copy_(piece)
            yield offset + start, chunk
        offset += int(part.shape[0])


def _needs_conversion(part: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype) -> bool:
    if isinstance(part, np.ndarray):
        return device.type != "cpu" or part.dtype != (np.float64 if dtype == torch.float64 else np.float32)
    return part.device != device or part.dtype != dtype


def _check_finite(scores: torch.Tensor, offset: int) -> None:
    """DataError if a score block holds NaN or infinity (one pass: a sum, NaN and inf propagate)."""
    if math.isfinite(float(scores.sum())) or bool(torch.isfinite(scores).all()):
        return  # (an overflowing sum of finite scores is checked element-wise)
    raise DataError(
        f"scores of database rows {offset}..{offset + scores.shape[1] - 1} are NaN or infinite; the "
        "descriptors contain NaN/inf (check the extraction)"
    )


# ------------------------------------------------------------------------------------- torch


def iter_scores(
    queries: Any,
    database: Any,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> ScoreBlocks:
    """Yield similarity blocks ``queries @ chunk.T`` of shape ``(n_queries, c)`` over the database.

    Blocks cover the database rows in order (all parts of a list, one after the other); they are
    new float32 tensors on ``device`` (float64 if all inputs are float64), as :class:`ScoreBlocks`.
    """
    return ScoreBlocks(_score_blocks(queries, database, chunk_size, device, progress))


def _score_blocks(queries: Any, database: Any, chunk_size: int | None, device: str | torch.device | None,
                  progress: bool | None) -> Iterator[torch.Tensor]:
    queries, parts = _inputs(queries, database)
    dev = _device(device, queries, parts)
    dtype = _compute_dtype(queries, *parts)
    n_total = sum(int(p.shape[0]) for p in parts)
    rows = chunk_rows(n_total, int(queries.shape[0]), chunk_size)
    q = _to_tensor(queries, dev, dtype)
    bar = tqdm(total=n_total, unit="img", desc="scoring", disable=not _progress(progress, n_total))
    with torch.inference_mode(), bar:
        for _, chunk in _iter_chunks(parts, rows, dev, dtype):
            yield q @ chunk.T  # a new tensor each time (ScoreBlocks' promise)
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


class RunningTopK:
    """The exact top k of every row over consecutive column blocks of scores.

    Ordered by decreasing score, equal scores by increasing column (the tie rule). Once the lists
    are full, a CPU block only needs a comparison with each row's k-th score: a later image must
    score strictly higher to enter (an equal score has a larger index), and few do. On other
    devices each block's own top k is merged in.
    """

    def __init__(self, k: int) -> None:
        self.k = int(k)
        self.values: Any = None  # (n_rows, <= k): numpy on the CPU, else a tensor
        self.indices: Any = None
        self.seen = 0

    @torch.inference_mode()
    def update(self, block: torch.Tensor) -> None:
        """Take in the scores ``(n_rows, c)`` of the next ``c`` columns."""
        offset, self.seen = self.seen, self.seen + int(block.shape[1])
        if block.shape[1] == 0:
            return
        full = self.values is not None and self.values.shape[1] == self.k
        if block.device.type != "cpu" or not full:
            v, i = _block_topk(block, min(self.k, int(block.shape[1])))
            if block.device.type == "cpu":
                self._merge(v.numpy(), i.numpy() + offset, None)
            else:
                self._merge_tensors(v, i + offset)
            return
        arr = block.numpy()
        flat = np.flatnonzero(arr > self.values[:, -1:])
        if flat.size == 0:
            return
        rows, cols = np.divmod(flat, arr.shape[1])
        # candidates of each touched row, padded to one width (flatnonzero sorts them by row)
        touched, starts, counts = np.unique(rows, return_index=True, return_counts=True)
        slot = np.arange(flat.size) - np.repeat(starts, counts)
        which = np.repeat(np.arange(touched.size), counts)
        values = np.full((touched.size, int(counts.max())), -np.inf, dtype=arr.dtype)
        indices = np.full(values.shape, -1, dtype=np.int64)
        values[which, slot] = arr.reshape(-1)[flat]
        indices[which, slot] = cols + offset
        self._merge(values, indices, touched)

    def _merge(self, v: np.ndarray, i: np.ndarray, rows: np.ndarray | None) -> None:
        """Merge candidates (columns above those held, in increasing order within each row)."""
        if self.values is None:
            self.values, self.indices = v[:, : self.k], i[:, : self.k]
            return
        held_v = self.values if rows is None else self.values[rows]
        held_i = self.indices if rows is None else self.indices[rows]
        # held lists hold smaller indices and come first: a stable sort keeps the index order on ties
        all_v, all_i = np.concatenate([held_v, v], 1), np.concatenate([held_i, i], 1)
        order = np.argsort(-all_v, axis=1, kind="stable")[:, : self.k]
        best_v, best_i = np.take_along_axis(all_v, order, 1), np.take_along_axis(all_i, order, 1)
        if rows is None:
            self.values, self.indices = best_v, best_i
        else:
            self.values[rows], self.indices[rows] = best_v, best_i

    def _merge_tensors(self, v: torch.Tensor, i: torch.Tensor) -> None:
        if self.values is None:
            self.values, self.indices = v, i
            return
        merged, perm = torch.sort(torch.cat([self.values, v], 1), dim=1, descending=True, stable=True)
        self.values = merged[:, : self.k]
        self.indices = torch.cat([self.indices, i], 1).gather(1, perm)[:, : self.k]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, indices)`` as numpy arrays ``(n_rows, min(k, columns seen))``, best first."""
        if self.values is None:
            raise DataError("no scores were given: there is nothing to rank")
        if isinstance(self.values, torch.Tensor):
            return self.values.cpu().numpy(), self.indices.cpu().numpy()
        return self.values, self.indices


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
    queries, parts = _inputs(queries, database)
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
    rows = max(chunk_rows(n_total, qb, chunk_size), 1)
    out_scores = np.empty((nq, k), dtype=np.float32 if dtype == torch.float32 else np.float64)
    out_index = np.empty((nq, k), dtype=np.int64)
    n_steps = -(-nq // qb) * n_total
    bar = tqdm(total=n_steps, unit="img", desc="searching", disable=not _progress(progress, n_total))
    with torch.inference_mode(), bar:
        for q0 in range(0, nq, qb):
            q = _to_tensor(queries[q0 : q0 + qb], dev, dtype)
            best = RunningTopK(k)
            for offset, chunk in _iter_chunks(parts, rows, dev, dtype):
                s = q @ chunk.T
                _check_finite(s, offset)
                best.update(s)
                bar.update(int(chunk.shape[0]))
            out_scores[q0 : q0 + qb], out_index[q0 : q0 + qb] = best.result()
    return out_scores, out_index


def to_ranks(indices: np.ndarray | torch.Tensor) -> np.ndarray:
    """Convert search results ``(n_queries, k)`` to the reference ranks layout ``(k, n_queries)``."""
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    indices = np.asarray(indices)
    if indices.ndim != 2:
        raise DataError(f"indices must be 2-D (n_queries, k), got shape {indices.shape}")
    return np.ascontiguousarray(indices.T.astype(np.int64, copy=False))
