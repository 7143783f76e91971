"""Positions of given images in each query's full ranking, counted from scores without sorting.

The position of an image is the number of images ranked before it: those scoring higher, and
those scoring equally with a smaller index (the tie rule of :mod:`dtop.retrieval.search`). It
is counted block by block with a look-up table over each query's thresholds (the scores of its
images of interest), query rows split over worker threads. Design notes: docs/retrieval.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from dtop.errors import DataError

SCORE_BLOCK = 1 << 16  # columns per block when a whole score matrix is given
ROW_PIECE = 1 << 16  # scores of one query handled per numpy call (a few hundred KiB of buffers)
#: A piece whose share of scores at or above the query's lowest threshold is at most this is
#: compacted to those scores first (the others rank after every threshold): cheaper below ~0.4.
SPARSE_SHARE = 0.3
_INT32_SAFE = float(1 << 30)  # |cell coordinates| below this cast to int32 exactly (else clipped first)


class ScoreBlocks(Iterator[Any]):
    """Score blocks, each a new array that nobody writes to after it is yielded.

    :func:`count_positions` counts such a block in worker threads while the next one is being
    computed (e.g. the next matrix product); blocks of any other iterable are counted before the
    next is asked for, since a producer may reuse its buffer.
    """

    def __init__(self, blocks: Iterable[Any]) -> None:
        self._blocks = iter(blocks)

    def __iter__(self) -> ScoreBlocks:
        return self

    def __next__(self) -> Any:
        return next(self._blocks)


def score_blocks(scores: Any) -> Iterator[torch.Tensor]:
    """Column blocks of ``scores``: one array/tensor ``(n_queries, n)`` or an iterable of blocks."""
    if isinstance(scores, np.ndarray | torch.Tensor):
        t = torch.as_tensor(scores)
        if t.ndim != 2:
            raise DataError(f"scores must be 2-D (n_queries, n_images), got shape {tuple(t.shape)}")
        for start in range(0, t.shape[1], SCORE_BLOCK):
            yield t[:, start : start + SCORE_BLOCK]
        return
    for block in scores:
        yield torch.as_tensor(block)


class _Buffers:
    """Scratch arrays of one worker for pieces of at most ``ROW_PIECE`` scores."""

    def __init__(self, dtype: np.dtype) -> None:
        self.y = np.empty(ROW_PIECE, dtype=dtype)
        self.cells = np.empty(ROW_PIECE, dtype=np.int32)
        self.bins = np.empty(ROW_PIECE, dtype=np.intp)
        self.mask = np.empty(ROW_PIECE, dtype=bool)
        self.sub = np.empty(ROW_PIECE, dtype=dtype)
        self.hot: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []  # (query, scores, index, cells)


class QueryCounter:
    """The thresholds, cell map and look-up table of one query, and its histogram of bins.

    The thresholds (scores of the images of interest) are sorted by rank key ``(score, -index)``;
    every image falls in the bin ``b`` = number of thresholds it ranks before, and the position
    of threshold ``j`` is the count of the bins above ``j``. A monotone map
    ``cell(s) = trunc(clip(s * a - c, 0, G + 2))`` gives ``b`` by table look-up whenever no
    threshold lies in the image's cell (``cell(t) < cell(s)`` implies ``t < s``); images in a
    cell holding a threshold (a few per mille) are compared exactly, index included. Thresholds
    and scores go through the very same numpy operations in the same dtype, so rounding cannot
    break the argument.
    """

    def __init__(self, index: np.ndarray, values: np.ndarray, hist: np.ndarray) -> None:
        # index: sorted unique image indices; values: their scores, in the counting dtype;
        # hist: this query's row (m + 2 counters) of the counter's histogram
        order = np.lexsort((-index, values))
        self.order = order
        self.size = m = int(index.size)
        self.thresholds = values[order]
        self.threshold_index = index[order]
        self.grid = grid = int(min(1 << 16, max(1024, 32 * m)))
        dtype = values.dtype.type
        a, lo = 1.0, 0.0
        if m:
            lo, hi = float(self.thresholds[0]), float(self.thresholds[-1])
            a = grid / (hi - lo) if hi > lo else 1.0
            if not math.isfinite(a) or a > 1e30:
                a = 1.0
        self.scale, self.shift = dtype(a), dtype(lo * a - 1.0)  # cells 0 and G + 2: below / above
        cells = self.cells(self.thresholds, np.empty(m, dtype=values.dtype), np.empty(m, dtype=np.int32))
        per_cell = np.bincount(cells, minlength=grid + 3)
        self.upto = per_cell.cumsum()  # thresholds in cells <= c
        self.below = self.upto - per_cell  # thresholds in cells < c
        self.hot = m + 1  # the bin of images whose cell holds thresholds: compared exactly
        self.lut = np.where(per_cell > 0, self.hot, self.below).astype(np.intp)
        self.steps = max(1, int(per_cell.max(initial=0)).bit_length())
        self.hist = hist[: m + 2]
        # scores below the lowest threshold rank after every threshold: bin 0, no look-up needed
        self.floor = self.thresholds[0] if m else np.inf
        # scores whose cell coordinate stays inside +-2^30 skip the clip (the look-up clips)
        self.safe = (float(self.shift) - _INT32_SAFE) / float(a), (float(self.shift) + _INT32_SAFE) / float(a)

    def cells(self, s: np.ndarray, y: np.ndarray, out: np.ndarray, clip: bool = True) -> np.ndarray:
        """Cell of each score of ``s`` (int32), using the buffers ``y`` and ``out``.

        In ``0..G+2`` with ``clip``; without it, scores out of range give cells out of range,
        which the look-up (``mode="clip"``) sends to the bins of cells 0 and G + 2 (only for
        scores inside ``self.safe``, whose cell coordinates cast to int32 exactly).
        """
        np.multiply(s, self.scale, out=y)
        np.subtract(y, self.shift, out=y)
        if clip:
            np.clip(y, 0.0, self.grid + 2.0, out=y)
        np.copyto(out, y, casting="unsafe")  # truncation toward zero: monotone
        return out

    def count(self, q: int, s: np.ndarray, first: int, buffers: _Buffers) -> None:
        """Count the scores ``s`` (1-D, at most ``ROW_PIECE``) of images ``first, first + 1, ...``.

        Images in a cell holding thresholds are only collected in ``buffers.hot``.
        """
        n = s.size
        lo, hi = np.minimum.reduce(s), np.maximum.reduce(s)  # NaN propagates
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise DataError(
                f"scores of images {first}..{first + n - 1} contain NaN or infinity; check the "
                "descriptors for NaN (e.g. an L2 normalisation of an all-zero vector)"
            )
        if hi < self.floor:  # all below the lowest threshold
            self.hist[0] += n
            return
        where: np.ndarray | None = None
        mask = np.greater_equal(s, self.floor, out=buffers.mask[:n])
        above = int(np.count_nonzero(mask))
        if above <= SPARSE_SHARE * n:  # few scores can rank before a threshold: count only those
            where = np.flatnonzero(mask)
            s = np.take(s, where, out=buffers.sub[:above])
            self.hist[0] += n - above
            n = above
        cells = self.cells(s, buffers.y[:n], buffers.cells[:n], clip=not (self.safe[0] < lo and hi < self.safe[1]))
        bins = buffers.bins[:n]
        np.take(self.lut, cells, out=bins, mode="clip")
        counts = np.bincount(bins, minlength=self.size + 2)
        self.hist += counts
        if counts[self.hot]:
            hot = np.flatnonzero(bins == self.hot)
            index = hot if where is None else where[hot]
            # unclipped cells out of range land in cell 0 or G + 2, which rounding can make hot
            buffers.hot.append((q, s[hot], index + first, np.clip(cells[hot], 0, self.grid + 2)))

    def positions(self) -> np.ndarray:
        """0-based positions of the images of interest, aligned with their sorted indices."""
        before = np.cumsum(self.hist[: self.size + 1][::-1])[::-1]  # images in bins >= j
        out = np.empty(self.size, dtype=np.int64)
        out[self.order] = before[1:]
        return out


class RankCounter:
    """Positions of the images of interest of every query, fed with consecutive score blocks.

    Query rows are counted in groups, one per worker thread (numpy releases the GIL); the images
    in cells holding thresholds are then compared exactly, all rows of a group at once.
    """

    def __init__(self, interest: list[np.ndarray], head: np.ndarray, threads: int = 1) -> None:
        # interest[q]: sorted unique indices < head.shape[1]; head: scores of the first images, in
        # the dtype every block is converted to
        nq = len(interest)
        self.width = width = max((ix.size for ix in interest), default=0) + 2
        self.hist = np.zeros((nq, width), dtype=np.int64)
        self.queries = [QueryCounter(ix, head[q, ix], self.hist[q]) for q, ix in enumerate(interest)]
        self.dtype = head.dtype
        # the exact comparison of all queries at once: thresholds by row, cell ranges by global cell
        self.thresholds = np.full((nq, width), np.inf, dtype=head.dtype)
        self.threshold_index = np.zeros((nq, width), dtype=np.int64)
        for q, c in enumerate(self.queries):
            self.thresholds[q, : c.size] = c.thresholds
            self.threshold_index[q, : c.size] = c.threshold_index
        self.cell_base = np.cumsum([0] + [c.grid + 3 for c in self.queries])
        self.below = np.concatenate([c.below for c in self.queries] or [np.zeros(0, np.int64)])
        self.upto = np.concatenate([c.upto for c in self.queries] or [np.zeros(0, np.int64)])
        self.steps = max((c.steps for c in self.queries), default=1)
        rows = [q for q, c in enumerate(self.queries) if c.size]
        n_groups = max(1, min(threads, len(rows)))
        self.groups = [rows[g::n_groups] for g in range(n_groups)]
        self.exact = [np.zeros((nq, width), dtype=np.int64) for _ in self.groups]  # per group: no race

    def update(self, block: np.ndarray, offset: int, pool: ThreadPoolExecutor | None = None) -> None:
        """Count one block ``(n_queries, c)`` of the scores of images ``offset, offset + 1, ...``."""
        for future in self.submit(block, offset, pool):
            future.result()

    def submit(self, block: np.ndarray, offset: int, pool: ThreadPoolExecutor | None) -> list[Future[None]]:
        """Start counting ``block`` in ``pool`` (one task per row group); without a pool, count it now."""
        if pool is None:
            for g in range(len(self.groups)):
                self._count_group(block, offset, g)
            return []
        return [pool.submit(self._count_group, block, offset, g) for g in range(len(self.groups))]

    def _count_group(self, block: np.ndarray, offset: int, group: int) -> None:
        buffers = _Buffers(self.dtype)
        width = block.shape[1]
        for q in self.groups[group]:
            counter = self.queries[q]
            for start in range(0, width, ROW_PIECE):
                counter.count(q, block[q, start : start + ROW_PIECE], offset + start, buffers)
        if buffers.hot:
            self._count_exactly(buffers.hot, self.exact[group])

    def _count_exactly(self, hot: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]], exact: np.ndarray) -> None:
        """Bins of images whose cell holds thresholds: a binary search by rank key in that cell."""
        rows = np.concatenate([np.full(v.size, q, dtype=np.int64) for q, v, _, _ in hot])
        values = np.concatenate([v for _, v, _, _ in hot])
        index = np.concatenate([i for _, _, i, _ in hot])
        cells = np.concatenate([c + self.cell_base[q] for q, _, _, c in hot])
        lo, hi = self.below[cells], self.upto[cells]
        thresholds, threshold_index = self.thresholds.reshape(-1), self.threshold_index.reshape(-1)
        base = rows * self.width
        for _ in range(self.steps):
            active = lo < hi
            mid = (lo + hi) // 2
            probe = base + np.minimum(mid, hi - 1)
            t = thresholds[probe]
            # the threshold ranks after the image: a lower score, or an equal one with a larger index
            after = (t < values) | ((t == values) & (threshold_index[probe] > index))
            lo = np.where(active & after, mid + 1, lo)
            hi = np.where(active & ~after, mid, hi)
        exact += np.bincount(base + lo, minlength=exact.size).reshape(exact.shape)

    def positions(self) -> list[np.ndarray]:
        """Per query, the 0-based positions of its images of interest (in sorted index order)."""
        for exact in self.exact:
            self.hist += exact
        for c in self.queries:
            c.hist[c.hot] = 0  # those images were counted exactly
        return [c.positions() for c in self.queries]


def default_threads(n_queries: int) -> int:
    """Worker threads of the counting: torch's intra-op thread count, at most one per query."""
    return max(1, min(torch.get_num_threads(), n_queries))


def count_positions(
    scores: Any, interest: Sequence[Any], threads: int | None = None, keep: Sequence[Any] | None = None
) -> tuple[list[np.ndarray], int, list[np.ndarray]]:
    """Positions of ``interest[q]`` (sorted, unique) in each query's ranking, the images seen, and
    the scores of the images ``keep[q]`` (sorted, unique; in the counting dtype; empty without ``keep``).

    A :class:`ScoreBlocks` source is counted one block behind its production (overlapped).
    """
    sets = [np.unique(np.asarray(x, dtype=np.int64).reshape(-1)) for x in interest]
    kept_sets = [np.unique(np.asarray(x, dtype=np.int64).reshape(-1)) for x in keep] if keep is not None else []
    if any(s.size and s[0] < 0 for s in sets + kept_sets):
        raise DataError("positions_from_scores: negative image index of interest")
    nq = len(sets)
    if keep is not None and len(kept_sets) != nq:
        raise DataError(f"keep has {len(kept_sets)} rows but interest has {nq}; one per query")
    head_size = max((int(s[-1]) + 1 for s in sets + kept_sets if s.size), default=0)
    workers = default_threads(nq) if threads is None else max(1, int(threads))
    overlap = isinstance(scores, ScoreBlocks)
    pending: list[np.ndarray] = []
    inflight: list[Future[None]] = []
    seen = 0
    counter: RankCounter | None = None
    kept: list[np.ndarray] = []
    dtype: torch.dtype | None = None
    with ThreadPoolExecutor(workers) if workers > 1 or overlap else nullcontext() as pool:
        try:
            for block in score_blocks(scores):
                if block.ndim != 2 or block.shape[0] != nq:
                    raise DataError(f"a block of scores has shape {tuple(block.shape)}; expected ({nq}, "
                                    "n_images): one row per query")
                if dtype is None:  # float64 and integer scores are compared in float64, the rest in float32
                    wide = block.dtype == torch.float64 or not block.is_floating_point()
                    dtype = torch.float64 if wide else torch.float32
                arr = block.detach().to(device="cpu", dtype=dtype).numpy()
                if counter is None:
                    pending.append(arr)
                    if seen + arr.shape[1] >= head_size:
                        head = np.concatenate(pending, axis=1)[:, :head_size] if len(pending) > 1 else arr
                        counter = RankCounter(sets, head, workers)
                        kept = [head[q, ix] for q, ix in enumerate(kept_sets)]
                        start = 0
                        for b in pending:
                            counter.update(b, start, pool)
                            start += b.shape[1]
                        pending = []
                else:
                    _wait(inflight)
                    inflight = counter.submit(arr, seen, pool)
                    if not overlap:
                        _wait(inflight)
                seen += arr.shape[1]
            _wait(inflight)
        finally:
            for future in inflight:
                future.cancel()
    if counter is None:
        raise DataError(
            f"the scores cover {seen} images but the ground truth refers to image index {head_size - 1}; "
            "the database images must come first, in ground-truth (imlist) order"
        )
    return counter.positions(), seen, kept


def _wait(futures: list[Future[None]]) -> None:
    """Wait for ``futures`` (emptied), raising the first error among them."""
    while futures:
        futures.pop(0).result()


def positions_from_scores(
    scores: Any, interest: Sequence[Sequence[int] | np.ndarray], threads: int | None = None
) -> list[np.ndarray]:
    """0-based positions that given images take in each query's full ranking, without sorting.

    ``scores``: similarities ``(n_queries, n_images)`` as one numpy/torch array or an iterable of
    column blocks ``(n_queries, c_i)`` covering consecutive images from index 0. ``interest[q]``:
    the database indices whose positions are wanted for query ``q``. Returns, per query, an int64
    array aligned with ``sorted(set(interest[q]))``. Equal scores rank by increasing index; the
    scores must be finite. ``threads``: worker threads (default: torch's thread count).
    """
    return count_positions(scores, interest, threads)[0]

