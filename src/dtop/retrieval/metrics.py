"""Metrics of the revisited protocol (Radenović et al., CVPR 2018): AP, mAP and mP@k, exactly.

The numbers agree bit for bit with the reference ``compute_map`` of revisitop/cirtorch, with two
fixes: a query without positives is left out of the means (AP = P@k = NaN), and a truncated list
holding none of a query's positives gives AP = P@k = 0. Ranked lists go in through
:func:`evaluate`; similarity scores through :func:`evaluate_scores`, which needs no sort of the
collection; :func:`score_and_search` scores descriptors and keeps the top k in one pass. Equal
scores rank by increasing database index (the order of :func:`dtop.retrieval.search.search`).
Details: docs/retrieval.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dtop.data.gnd import DEFAULT_KAPPAS, PROTOCOLS, GroundTruth
from dtop.errors import DataError
from dtop.retrieval.positions import ScoreBlocks, count_positions, positions_from_scores
from dtop.retrieval.search import RunningTopK, iter_scores

__all__ = [
    "check_ranks",
    "compute_ap",
    "compute_map",
    "evaluate",
    "evaluate_scores",
    "format_results",
    "positions_from_scores",
    "score_and_search",
]

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
    _check_no_queries(n_queries)
    if ranks.dtype.kind == "i" and int(ranks.min()) < 0:
        raise DataError(
            f"ranks holds negative index {int(ranks.min())}; indices are 0-based database positions "
            "(faiss marks missing results with -1: ask for fewer neighbours than the index holds)"
        )
    if ranks.dtype.kind == "u" and ranks.dtype.itemsize == 8 and int(ranks.max()) >= 1 << 63:
        raise DataError(
            f"ranks holds index {int(ranks.max())} (>= 2^63): a negative index stored as unsigned, e.g. "
            "faiss's -1 for a missing result; store ranks as int64 and ask for fewer neighbours than "
            "the index holds"
        )
    return ranks


def _check_no_queries(n_queries: int) -> None:
    if n_queries == 0:
        raise DataError(
            "the ground truth has no queries: there is nothing to evaluate; check the gnd file "
            "(its 'qimlist' and 'gnd' lists are empty)"
        )


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


def _local_ranks(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Rank of each image among the given ones by the tie rule (higher score first, then smaller index)."""
    order = np.lexsort((index, -values))
    ranks = np.empty(index.size, dtype=np.int64)
    ranks[order] = np.arange(index.size)
    return ranks


def _protocol_positions(
    gnd: GroundTruth, name: str, counted: list[np.ndarray], positions: list[np.ndarray],
    labelled: list[np.ndarray], keys: list[np.ndarray], n_ranked: int | None,
) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Per query of protocol ``name``: the junk-shifted positions of its retrieved positives.

    ``positions[q]``: full-ranking positions of the images ``counted[q]`` (easy and hard);
    ``keys[q]``: the rank of each image of ``labelled[q]`` (easy, hard and junk) among those
    images. The number of junk images ranked before a positive comes from ``keys`` alone, so the
    junk images need no position in the full ranking.
    """
    out = []
    for q, (pos, junk) in enumerate(gnd.protocol(name)):
        raw = positions[q][np.searchsorted(counted[q], pos)]
        order = np.argsort(raw)
        raw = raw[order]
        shifted = raw
        if junk.size:
            junk_keys = np.sort(keys[q][np.searchsorted(labelled[q], junk)])
            shifted = raw - np.searchsorted(junk_keys, keys[q][np.searchsorted(labelled[q], pos[order])])
        if n_ranked is not None:
            shifted = shifted[raw < n_ranked]
        out.append((shifted, np.empty(0, np.int64), int(pos.size)))
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
    _check_no_queries(gnd.n_queries)
    # Only positives (easy or hard) are counted over the whole collection; junk images matter only
    # by how many rank before each positive, which their scores tell (docs/retrieval.md).
    counted = [np.unique(np.asarray(q["easy"] + q["hard"], dtype=np.int64)) for q in gnd.gnd]
    labelled = [np.unique(np.asarray(q["easy"] + q["hard"] + q["junk"], dtype=np.int64)) for q in gnd.gnd]
    positions, n_images, values = count_positions(scores, counted, keep=labelled)
    if n_images < gnd.n_database:
        raise DataError(
            f"the scores cover {n_images} images but the database of {gnd.name or 'the benchmark'} has "
            f"{gnd.n_database}; score every database image (in imlist order), then the distractors"
        )
    # rank of each labelled image among its query's labelled images: score descending, index ascending
    keys = [_local_ranks(v, ix) for v, ix in zip(values, labelled)]
    results = {}
    for name in PROTOCOLS:
        found = _protocol_positions(gnd, name, counted, positions, labelled, keys, n_ranked)
        per_query = (_query_metrics(p, j, n, ks) for p, j, n in found)
        results[name] = _result(_aggregate(per_query, len(ks)), ks)
    return results


def score_and_search(
    queries: Any,
    database: Any,
    gnd: GroundTruth,
    topk: int = 100,
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """:func:`evaluate_scores` of the descriptors and their top-``topk`` search, in one pass.

    Equal to ``evaluate_scores(iter_scores(queries, database), gnd)`` and
    ``search(queries, database, topk)[1]``, but the database is scored once. Returns the
    results and the indices ``(n_queries, min(topk, n_images))``, best first.
    """
    best = RunningTopK(int(topk))
    if best.k < 1:
        raise DataError(f"topk must be at least 1, got {topk}")

    def blocks() -> Iterator[torch.Tensor]:
        for block in iter_scores(queries, database, chunk_size=chunk_size, device=device, progress=progress):
            yield block
            best.update(block)

    results = evaluate_scores(ScoreBlocks(blocks()), gnd, kappas)  # each block is new: counted while the next is made
    return results, best.result()[1]


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
