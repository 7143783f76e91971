"""Metrics of the revisited protocol (Radenović et al., CVPR 2018): AP, mAP and mP@k, exactly.

The numbers agree bit for bit with the reference ``compute_map`` of revisitop/cirtorch, with two
fixes: a query without positives is left out of the means (AP = P@k = NaN), and a truncated list
holding none of a query's positives gives AP = P@k = 0. Ranked lists go in through
:func:`evaluate`; similarity scores through :func:`evaluate_scores`, which needs no sort of the
collection. Equal scores rank by increasing database index (the order of
:func:`dtop.retrieval.search.search`). Details: docs/retrieval.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dtop.data.gnd import DEFAULT_KAPPAS, PROTOCOLS, GroundTruth
from dtop.errors import DataError

_SCORE_BLOCK = 1 << 16  # columns per block when a whole score matrix is given


# --------------------------------------------------------------------------------------------- AP


def compute_ap(positive_positions: Sequence[int] | np.ndarray, n_positives: int) -> float:
    """Average precision from the 0-based, junk-shifted positions of the retrieved positives.

    ``positive_positions`` must be sorted ascending (the positives in ranked order, ``r_j``);
    ``n_positives`` is the number of positives in the ground truth (retrieved or not). With the
    trapezoidal rule, AP = Σ_j (1/n_p)·(P0_j + P1_j)/2 with P0_j = j/r_j (1 when r_j = 0) and
    P1_j = (j+1)/(r_j+1). No retrieved positive gives 0; ``n_positives == 0`` gives NaN.
    """
    pos = np.asarray(positive_positions, dtype=np.int64).reshape(-1)
    if n_positives <= 0:
        if pos.size:
            raise ValueError("compute_ap: positives were retrieved but n_positives is 0")
        return math.nan
    if pos.size > n_positives:
        raise ValueError(f"compute_ap: {pos.size} retrieved positives but n_positives={n_positives}")
    if pos.size == 0:
        return 0.0
    if pos[0] < 0 or np.any(np.diff(pos) <= 0):
        raise ValueError("compute_ap: positions must be non-negative and strictly increasing")
    j = np.arange(pos.size, dtype=np.float64)
    r = pos.astype(np.float64)
    recall_step = 1.0 / n_positives
    p0 = np.ones_like(r)
    np.divide(j, r, out=p0, where=r != 0)
    p1 = (j + 1.0) / (r + 1.0)
    terms = (p0 + p1) * recall_step / 2.0
    # np.add.accumulate adds left to right, as the reference loop does: the sum is bit-identical.
    return float(np.add.accumulate(terms)[-1])


def _query_metrics(
    pos: np.ndarray, junk: np.ndarray, n_positives: int, kappas: Sequence[int]
) -> tuple[float, np.ndarray]:
    """AP and P@k of one query from sorted 0-based positions (before junk removal) of its images."""
    if n_positives == 0:
        return math.nan, np.full(len(kappas), math.nan)
    shifted = pos - np.searchsorted(junk, pos, side="left") if junk.size else pos
    ap = compute_ap(shifted, n_positives)
    prs = np.zeros(len(kappas))
    if shifted.size:
        one_based = shifted + 1
        last = int(one_based[-1])
        for t, k in enumerate(kappas):
            kq = min(last, int(k))
            prs[t] = (one_based <= kq).sum() / kq
    return ap, prs


def _aggregate(
    per_query: Iterable[tuple[float, np.ndarray]], n_kappas: int
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    aps, prs_rows = [], []
    total, pr, n_used = 0.0, np.zeros(n_kappas), 0
    for ap, prs in per_query:
        aps.append(ap)
        prs_rows.append(prs)
        if math.isnan(ap):
            continue
        total = total + ap  # same order of additions as the reference
        pr = pr + prs
        n_used += 1
    if n_used == 0:
        mean_ap, mean_pr = math.nan, np.full(n_kappas, math.nan)
    else:
        mean_ap, mean_pr = total / n_used, pr / n_used
    prs_arr = np.array(prs_rows, dtype=np.float64).reshape(len(prs_rows), n_kappas)
    return mean_ap, np.array(aps, dtype=np.float64), mean_pr, prs_arr


# ------------------------------------------------------------------------------------- protocols


def _as_protocol(gnd_protocol: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """Normalise per-query ground truth to sorted (positives, junk) int64 arrays.

    Accepts :meth:`GroundTruth.protocol` output, ``(positives, junk)`` pairs, or the reference's
    dicts with ``ok`` (and optionally ``junk``).
    """
    if isinstance(gnd_protocol, GroundTruth):
        raise TypeError("pass gnd.protocol('medium') (or use evaluate()), not the GroundTruth itself")
    out = []
    for i, q in enumerate(gnd_protocol):
        if isinstance(q, Mapping):
            if "ok" not in q:
                raise DataError(f"ground truth of query {i} is a dict without 'ok' (the positives)")
            pos, junk = q["ok"], q.get("junk", ())
        else:
            pos, junk = q
        pos_a = np.sort(np.asarray(pos, dtype=np.int64).reshape(-1))
        junk_a = np.sort(np.asarray(junk, dtype=np.int64).reshape(-1))
        out.append((pos_a, junk_a))
    return out


def _check_kappas(kappas: Sequence[int]) -> list[int]:
    ks = [int(k) for k in kappas]
    if any(k < 1 for k in ks):
        raise DataError(f"kappas must be positive integers (the k of P@k), got {list(kappas)}")
    return ks


# ----------------------------------------------------------------------------------------- ranks


def check_ranks(ranks: Any, n_queries: int) -> np.ndarray:
    """Validate a ranks array ``(n_ranked, n_queries)`` of non-negative ints; return it as numpy."""
    if isinstance(ranks, torch.Tensor):
        ranks = ranks.detach().cpu().numpy()
    ranks = np.asarray(ranks)
    if ranks.dtype.kind not in "iu":
        raise DataError(
            f"ranks must hold integer database indices, got dtype {ranks.dtype}; convert with ranks.astype(np.int64)"
        )
    if ranks.ndim != 2:
        raise DataError(f"ranks must be 2-D (n_ranked, n_queries), got shape {ranks.shape}")
    if ranks.shape[1] != n_queries:
        hint = (
            "; it looks transposed: pass ranks.T (the layout is one column per query)"
            if ranks.shape[0] == n_queries
            else ""
        )
        raise DataError(
            f"ranks has shape {ranks.shape} but the ground truth has {n_queries} queries; expected "
            f"(n_ranked, {n_queries}){hint}"
        )
    if ranks.shape[0] == 0:
        raise DataError("ranks is empty (0 ranked images per query)")
    if ranks.dtype.kind == "i" and ranks.size and int(ranks.min()) < 0:
        raise DataError(
            f"ranks holds negative index {int(ranks.min())}; indices are 0-based database positions "
            "(faiss marks missing results with -1: ask for fewer neighbours than the index holds)"
        )
    return ranks


def _positions_in_ranks(column: np.ndarray, pos: np.ndarray, junk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based positions in ``column`` of the entries that are positives / junk (like np.in1d)."""
    size = int(max(pos.max(initial=-1), junk.max(initial=-1))) + 1
    if size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    table = np.zeros(size, dtype=np.uint8)
    table[pos] |= 1
    table[junk] |= 2
    inside = np.flatnonzero(column < size)
    labels = table[column[inside]]
    return inside[(labels & 1) != 0], inside[(labels & 2) != 0]


def compute_map(
    ranks: Any, gnd_protocol: Any, kappas: Sequence[int] = ()
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """mAP and mP@k of ranked lists, with the reference semantics and the fixes of the module docstring.

    ``ranks``: int array ``(n_ranked, n_queries)``, best first. ``gnd_protocol``: per query
    ``(positives, junk)`` (e.g. ``gnd.protocol("medium")``) or reference dicts with ``ok``/``junk``.
    Returns ``(map, aps, pr, prs)`` as the reference does: the mean AP, per-query APs (NaN for a
    query without positives), mean P@k per kappa and per-query P@k ``(n_queries, len(kappas))``.
    """
    protocol = _as_protocol(gnd_protocol)
    ks = _check_kappas(kappas)
    ranks = check_ranks(ranks, len(protocol))

    def per_query() -> Iterable[tuple[float, np.ndarray]]:
        for i, (pos, junk) in enumerate(protocol):
            if pos.size == 0:
                yield _query_metrics(pos, junk, 0, ks)
                continue
            p, j = _positions_in_ranks(ranks[:, i], pos, junk)
            yield _query_metrics(p, j, int(pos.size), ks)

    return _aggregate(per_query(), len(ks))


# ---------------------------------------------------------------------------------------- scores


def _score_blocks(scores: Any) -> Iterable[torch.Tensor]:
    if isinstance(scores, np.ndarray | torch.Tensor):
        t = torch.as_tensor(scores)
        if t.ndim != 2:
            raise DataError(f"scores must be 2-D (n_queries, n_images), got shape {tuple(t.shape)}")
        for start in range(0, t.shape[1], _SCORE_BLOCK):
            yield t[:, start : start + _SCORE_BLOCK]
        return
    for block in scores:
        yield torch.as_tensor(block)


def _ties_before(head: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per image of interest, the head images with an equal score and a smaller index (ranked first).

    All such images lie in the head (indices below the image of interest), so they are counted
    there: the position in a stable descending sort of the head minus the number of head images
    scoring strictly higher.
    """
    nq, n_head = head.shape
    ranking = torch.sort(head, dim=1, descending=True, stable=True).indices
    rank_of = torch.empty_like(ranking)
    rank_of.scatter_(1, ranking, torch.arange(n_head).expand(nq, n_head).contiguous())
    ascending = torch.sort(head, dim=1).values
    greater = n_head - torch.searchsorted(ascending, values.contiguous(), right=True)
    return rank_of.gather(1, idx) - greater


class _RankCounter:
    """Counts, block by block, how many images score strictly higher than each image of interest.

    Per query, the scores of its images of interest are sorted thresholds ``t_0 <= ... < t_m``;
    every image adds one to the bin ``b = #{t < score}``, and the number of images scoring higher
    than ``t_j`` is the count of the bins above ``j``. Finding ``b`` by binary search costs ~35 ns an
    image; instead a monotone map ``cell(s) = trunc(clamp(s * a - c, -1, G + 1))`` into ``G + 3``
    cells gives ``b`` by table look-up whenever no threshold lies in the image's cell (monotonicity
    makes this exact: ``cell(t) < cell(s)`` implies ``t < s``); images in a cell holding a threshold
    (a few percent) are binary-searched. Thresholds and scores go through the very same operations
    in the same dtype, so rounding cannot break the argument.
    """

    def __init__(self, interest: list[np.ndarray], head: torch.Tensor) -> None:
        # interest[q]: sorted unique indices < head.shape[1]; head: scores (float32 or float64) of the
        # first images, in the dtype every block is converted to.
        nq = len(interest)
        self.dtype = head.dtype
        self.n_queries = nq
        self.sizes = [len(x) for x in interest]
        m = max(self.sizes, default=0)
        self.width = m
        self.trash = nq * (m + 1)
        if m == 0:
            return
        idx = torch.zeros((nq, m), dtype=torch.int64)
        valid = torch.zeros((nq, m), dtype=torch.bool)
        for q, ix in enumerate(interest):
            idx[q, : len(ix)] = torch.from_numpy(ix)
            valid[q, : len(ix)] = True
        values = head.gather(1, idx)
        ties_before = _ties_before(head, idx, values)
        # sort thresholds per query (padding +inf goes last)
        values = torch.where(valid, values, torch.full_like(values, math.inf))
        thr, order = torch.sort(values, dim=1, stable=True)
        self.order = order
        self.ties_before = ties_before.gather(1, order)
        self._build_lookup(thr.numpy(), valid.gather(1, order).numpy())

    def _build_lookup(self, thr_np: np.ndarray, valid: np.ndarray) -> None:
        """The cell map and look-up table of the sorted thresholds ``(n_queries, width)``.

        numpy from here on: in-place ufuncs on reused buffers are several times faster than
        allocating torch temporaries for every block.
        """
        nq, m = self.n_queries, self.width
        grid = int(min(1 << 16, max(1024, 32 * m)))
        self.grid = grid
        n_cells = grid + 3
        np_dtype = np.float64 if self.dtype == torch.float64 else np.float32
        scale = np.ones((nq, 1), dtype=np_dtype)
        shift = np.zeros((nq, 1), dtype=np_dtype)
        for q, size in enumerate(self.sizes):
            if size == 0:
                continue
            lo, hi = float(thr_np[q, 0]), float(thr_np[q, size - 1])
            a = grid / (hi - lo) if hi > lo else 1.0
            if not math.isfinite(a) or a > 1e30:
                a = 1.0
            scale[q] = a
            shift[q] = lo * a
        self.scale, self.shift = scale, shift
        # +1 so that cells start at 0, and each query gets its own range of the look-up table
        self.cell_offsets = (np.arange(nq, dtype=np.int32) * n_cells + 1).reshape(nq, 1)
        cells = self._cells(thr_np, np.empty(thr_np.shape, np_dtype), np.empty(thr_np.shape, np.int32))
        per_cell = np.bincount(cells[valid], minlength=nq * n_cells).reshape(nq, n_cells)
        upto = per_cell.cumsum(1)  # thresholds in cells <= c
        below = upto - per_cell  # thresholds in cells < c
        bin_offsets = (np.arange(nq, dtype=np.int64) * (m + 1)).reshape(nq, 1)
        lut = np.where(per_cell > 0, self.trash, below + bin_offsets)
        self.lut = lut.astype(np.int32).ravel()  # global bin of an image in that cell, or trash
        self.below = below.ravel()
        self.upto = upto.ravel()
        self.steps = max(1, int(per_cell.max()).bit_length())
        self.thresholds_np = np.ascontiguousarray(thr_np).ravel()
        self.hist_np = np.zeros(self.trash + 1, dtype=np.int64)
        self._buffers: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def _cells(self, x: np.ndarray, y: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Monotone global cell index of scores ``x`` ``(n_queries, c)``, using buffers y and out."""
        np.multiply(x, self.scale, out=y)
        np.subtract(y, self.shift, out=y)
        np.clip(y, -1.0, self.grid + 1.0, out=y)
        np.copyto(out, y, casting="unsafe")  # truncation toward zero: monotone
        np.add(out, self.cell_offsets, out=out)
        return out

    def update(self, block: np.ndarray) -> None:
        """Count one block of scores ``(n_queries, c)`` (numpy, the counter's dtype)."""
        if self.width == 0:
            return
        nq, width = block.shape
        size = nq * width
        if self._buffers is None or self._buffers[0].size < size:
            self._buffers = (
                np.empty(size, dtype=block.dtype),
                np.empty(size, dtype=np.int32),
                np.empty(size, dtype=np.int32),
            )
        y = self._buffers[0][:size].reshape(nq, width)
        cells = self._cells(block, y, self._buffers[1][:size].reshape(nq, width)).ravel()
        bins = self._buffers[2][:size]
        np.take(self.lut, cells, out=bins)
        self.hist_np += np.bincount(bins, minlength=self.hist_np.size)
        hot = np.flatnonzero(bins == self.trash)
        if hot.size == 0:
            return
        # exact bins of images whose cell holds thresholds: vectorised binary search restricted to
        # the thresholds of that cell (a contiguous range of the query's sorted thresholds)
        values = block.ravel()[hot]
        cell = cells[hot]  # global cell index: query * n_cells + cell
        rows = hot // width
        lo = self.below[cell]
        hi = self.upto[cell]
        base = rows * self.width
        for _ in range(self.steps):
            active = lo < hi
            mid = (lo + hi) // 2
            probe = np.clip(np.minimum(mid, hi - 1), 0, None)
            less = self.thresholds_np[base + probe] < values
            lo = np.where(active & less, mid + 1, lo)
            hi = np.where(active & ~less, mid, hi)
        self.hist_np += np.bincount(rows * (self.width + 1) + lo, minlength=self.hist_np.size)

    def positions(self) -> list[np.ndarray]:
        """0-based positions in the full ranking, aligned with ``interest[q]``."""
        if self.width == 0:
            return [np.empty(0, dtype=np.int64) for _ in range(self.n_queries)]
        hist = self.hist_np[: self.trash].reshape(self.n_queries, self.width + 1)
        # an image counted in bin b scores higher than thresholds 0..b-1
        greater = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]
        pos_sorted = greater + self.ties_before.numpy()
        order = self.order.numpy()
        out = []
        for q, size in enumerate(self.sizes):
            res = np.empty(size, dtype=np.int64)
            res[order[q, :size]] = pos_sorted[q, :size]
            out.append(res)
        return out


def positions_from_scores(scores: Any, interest: Sequence[Sequence[int] | np.ndarray]) -> list[np.ndarray]:
    """0-based positions that given images take in each query's full ranking, without sorting.

    ``scores``: similarities ``(n_queries, n_images)`` as one numpy/torch array or an iterable of
    column blocks ``(n_queries, c_i)`` covering consecutive images from index 0. ``interest[q]``:
    the database indices whose positions are wanted for query ``q``. Returns, per query, an int64
    array aligned with ``sorted(set(interest[q]))``. Ties are ranked by increasing index (module
    docstring); the scores must be finite.
    """
    return _positions_from_scores(scores, interest)[0]


def _positions_from_scores(scores: Any, interest: Sequence[Any]) -> tuple[list[np.ndarray], int]:
    sets = [np.unique(np.asarray(x, dtype=np.int64).reshape(-1)) for x in interest]
    if any(s.size and s[0] < 0 for s in sets):
        raise DataError("positions_from_scores: negative image index of interest")
    nq = len(sets)
    head_size = max((int(s[-1]) + 1 for s in sets if s.size), default=0)
    pending: list[np.ndarray] = []
    seen = 0
    counter: _RankCounter | None = None
    dtype: torch.dtype | None = None
    for block in _score_blocks(scores):
        if block.ndim != 2 or block.shape[0] != nq:
            raise DataError(
                f"a block of scores has shape {tuple(block.shape)}; expected ({nq}, n_images): one row per query"
            )
        if dtype is None:  # float64 and integer scores are compared in float64, the rest in float32
            wide = block.dtype == torch.float64 or not block.is_floating_point()
            dtype = torch.float64 if wide else torch.float32
        arr = np.ascontiguousarray(block.detach().to(device="cpu", dtype=dtype).numpy())
        if arr.size and not (math.isfinite(arr.min()) and math.isfinite(arr.max())):  # NaN propagates
            raise DataError(
                f"scores of images {seen}..{seen + arr.shape[1] - 1} contain NaN or infinity; check "
                "the descriptors for NaN (e.g. an L2 normalisation of an all-zero vector)"
            )
        seen += arr.shape[1]
        if counter is None:
            pending.append(arr)
            if seen >= head_size:
                head = torch.from_numpy(np.concatenate(pending, axis=1)[:, :head_size])
                counter = _RankCounter(sets, head)
                for b in pending:
                    counter.update(b)
                pending = []
        else:
            counter.update(arr)
    if counter is None:
        raise DataError(
            f"the scores cover {seen} images but the ground truth refers to image index {head_size - 1}; "
            "the database images must come first, in ground-truth (imlist) order"
        )
    return counter.positions(), seen


def _protocol_positions(
    gnd: GroundTruth, name: str, interest: list[np.ndarray], positions: list[np.ndarray], n_ranked: int | None
) -> list[tuple[np.ndarray, np.ndarray, int]]:
    out = []
    for q, (pos, junk) in enumerate(gnd.protocol(name)):
        lookup = interest[q]

        def where(idx: np.ndarray, q: int = q, lookup: np.ndarray = lookup) -> np.ndarray:
            p = positions[q][np.searchsorted(lookup, idx)]
            if n_ranked is not None:
                p = p[p < n_ranked]
            return np.sort(p)

        out.append((where(pos), where(junk), int(pos.size)))
    return out


# ------------------------------------------------------------------------------------- evaluate


def _result(metrics: tuple[float, np.ndarray, np.ndarray, np.ndarray], kappas: Sequence[int]) -> dict[str, Any]:
    mean_ap, aps, pr, _ = metrics
    return {
        "map": float(mean_ap),
        "mp": {str(k): float(v) for k, v in zip(kappas, pr)},
        "aps": [None if math.isnan(a) else float(a) for a in aps],
    }


def evaluate(ranks: Any, gnd: GroundTruth, kappas: Sequence[int] = DEFAULT_KAPPAS) -> dict[str, Any]:
    """Evaluate ranked lists ``(n_ranked, n_queries)`` under the easy, medium and hard protocols.

    Returns ``{"easy"|"medium"|"hard": {"map": float, "mp": {"1": float, ...}, "aps": [...]}}``,
    fractions in [0, 1]; per-query APs are None (and mAP NaN if no query has positives) where a
    query has no positive under that protocol.
    """
    ks = _check_kappas(kappas)
    ranks = check_ranks(ranks, gnd.n_queries)
    return {name: _result(compute_map(ranks, gnd.protocol(name), ks), ks) for name in PROTOCOLS}


def evaluate_scores(
    scores: Any, gnd: GroundTruth, kappas: Sequence[int] = DEFAULT_KAPPAS, n_ranked: int | None = None
) -> dict[str, Any]:
    """Like :func:`evaluate`, from similarity scores instead of ranked lists (no sort needed).

    ``scores``: ``(n_queries, n_images)`` array or iterable of consecutive column blocks (see
    :func:`positions_from_scores`); images ``0..len(imlist)-1`` are the database in ``imlist``
    order, further columns are distractors. ``n_ranked`` truncates each ranked list to its first
    ``n_ranked`` images (default: the full ranking). Gives exactly what :func:`evaluate` gives on
    ``np.argsort(-scores, axis=1, kind="stable").T[:n_ranked]``.
    """
    ks = _check_kappas(kappas)
    if n_ranked is not None and n_ranked < 1:
        raise DataError(f"n_ranked must be at least 1, got {n_ranked}")
    interest = [np.array(sorted(q["easy"] + q["hard"] + q["junk"]), dtype=np.int64) for q in gnd.gnd]
    positions, n_images = _positions_from_scores(scores, interest)
    if n_images < gnd.n_database:
        raise DataError(
            f"the scores cover {n_images} images but the database of {gnd.name or 'the benchmark'} has "
            f"{gnd.n_database}; score every database image (in imlist order), then the distractors"
        )
    results = {}
    for name in PROTOCOLS:
        found = _protocol_positions(gnd, name, interest, positions, n_ranked)
        per_query = (_query_metrics(p, j, n, ks) for p, j, n in found)
        results[name] = _result(_aggregate(per_query, len(ks)), ks)
    return results


def format_results(results: Mapping[str, Any], title: str | None = None) -> str:
    """Human-readable table of :func:`evaluate` output: mAP and mP@k in % with two decimals."""
    names = [n for n in PROTOCOLS if n in results]
    kappas = list(results[names[0]]["mp"]) if names else []
    header = f"{'protocol':<10}{'mAP':>8}" + "".join(f"{'mP@' + k:>8}" for k in kappas)
    lines = [title] if title else []
    lines += [header, "-" * len(header)]

    def pct(v: float | None) -> str:
        return "     n/a" if v is None or math.isnan(v) else f"{100.0 * v:8.2f}"

    for n in names:
        r = results[n]
        lines.append(f"{n.capitalize():<10}{pct(r['map'])}" + "".join(pct(r["mp"][k]) for k in kappas))
    for n in names:
        missing = sum(a is None for a in results[n]["aps"])
        if missing:
            n_all = len(results[n]["aps"])
            lines.append(f"({n}: {missing} of {n_all} queries have no positive, left out of the means)")
    return "\n".join(lines)
