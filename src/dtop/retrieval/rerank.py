"""Re-ranking of search results: reorder the top of each ranked list, leave the rest in place.

The re-rankers (:mod:`dtop.retrieval.diffusion`, :mod:`dtop.retrieval.superglobal`) give new
scores to the first ``n`` results of each query; :func:`reorder_top` sorts those by the new score
(equal scores by increasing database index) and :func:`lift_reranked` turns a re-ranked top into
score blocks that :func:`dtop.retrieval.metrics.evaluate_scores` scores exactly. Design notes:
docs/retrieval.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import numpy as np
import torch

from dtop.data.gnd import GroundTruth
from dtop.errors import ConfigError, DataError
from dtop.retrieval.metrics import evaluate_scores
from dtop.retrieval.positions import ScoreBlocks
from dtop.retrieval.search import iter_scores, search


class Reranker(Protocol):
    """What re-ranks search results (the ``--post`` re-ranking steps)."""

    @property
    def depth(self) -> int:
        """How many results of each query it reorders."""
        ...

    def rerank(
        self, queries: torch.Tensor, database: torch.Tensor, scores: np.ndarray, indices: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Re-ranked ``(scores, indices)``."""
        ...


def check_param(
    value: Any, name: str, what: str, *, integer: bool = False, low: float | None = None,
    high: float | None = None, open_low: bool = False, open_high: bool = False,
) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a number (an int if ``integer``) in the given range."""
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    ok = ok and not isinstance(value, bool) and value == value and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value < high if open_high else value <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if open_low else '>='} {low}")
        if high is not None:
            bounds.append(f"{'<' if open_high else '<='} {high}")
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{what}: {name} must be {kind} {' and '.join(bounds)}, got {value!r}".rstrip())


def check_lists(scores: Any, indices: Any, n_database: int) -> tuple[np.ndarray, np.ndarray]:
    """Search results ``(n_queries, L)`` as float and int64 numpy arrays, checked against the database size."""
    s, i = np.asarray(scores), np.asarray(indices)
    if s.ndim != 2 or s.shape != i.shape:
        raise DataError(
            f"re-ranking needs scores and indices of one shape (n_queries, k); got {s.shape} and {i.shape}"
        )
    if i.dtype.kind not in "iu":
        raise DataError(f"indices must be integers, got dtype {i.dtype}")
    if i.size and (i.min() < 0 or i.max() >= n_database):
        raise DataError(
            f"indices must lie in 0..{n_database - 1} (the database given to the re-ranking); an approximate "
            "index may have returned -1 for missing results: search exactly before re-ranking"
        )
    return s, i.astype(np.int64, copy=False)


def order_by_score(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per row, the permutation that sorts by ``values`` descending, equal values by ``ids`` ascending."""
    by_id = torch.argsort(ids, dim=-1, stable=True)
    by_value = torch.argsort(values.gather(-1, by_id), dim=-1, descending=True, stable=True)
    return by_id.gather(-1, by_value)


def reorder_top(
    scores: np.ndarray, indices: np.ndarray, new_scores: torch.Tensor, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Lists whose first ``n`` entries are sorted by ``new_scores`` (n_queries, n); the rest unchanged.

    The first ``n`` scores become the new scores, rounded to float32 first so that the returned
    lists follow the tie rule: equal (returned) scores rank by increasing database index.
    """
    ids = torch.from_numpy(np.ascontiguousarray(indices[:, :n]))
    new = new_scores.to(torch.float32)
    perm = order_by_score(new, ids)
    out_s = scores.astype(np.float32, copy=True)
    out_i = indices.copy()
    out_s[:, :n] = new.gather(1, perm).numpy()
    out_i[:, :n] = ids.gather(1, perm).numpy()
    return out_s, out_i


def lift_reranked(
    blocks: Iterable[torch.Tensor | np.ndarray], reranked: np.ndarray, ceiling: np.ndarray
) -> Iterator[np.ndarray]:
    """Score blocks in which each query's re-ranked top ranks first, in its new order; float64 out.

    ``blocks``: the plain similarity blocks ``(n_queries, c)`` over the database, in column order
    (:func:`dtop.retrieval.search.iter_scores`); ``reranked``: the re-ranked top ``(n_queries, n)``,
    which must be the same set as the plain top ``n`` of each query; ``ceiling``: each query's
    highest plain score (the first score of its plain search). The entries of the re-ranked top get
    ``floor(ceiling) + 1 + n - position`` (above every plain score, decreasing with the position);
    every other image keeps its score, and so exactly its plain position, which re-ranking does
    not change.
    """
    top = np.asarray(reranked, dtype=np.int64)
    nq, n = top.shape
    base = np.floor(np.asarray(ceiling, dtype=np.float64)).reshape(nq, 1) + 1.0
    lifted = base + (n - np.arange(n, dtype=np.float64))[None, :]
    offset = 0
    for block in blocks:
        arr = block.detach().cpu().numpy() if isinstance(block, torch.Tensor) else np.asarray(block)
        arr = arr.astype(np.float64, copy=True)
        width = arr.shape[1]
        rows, cols = np.nonzero((top >= offset) & (top < offset + width))
        arr[rows, top[rows, cols] - offset] = lifted[rows, cols]
        offset += width
        yield arr


def reranked_search(
    queries: torch.Tensor, database: torch.Tensor, topk: int, reranker: Reranker | None, **search_options: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Search at least ``reranker.depth`` deep and re-rank: ``(scores, indices, plain best scores)``.

    The lists hold ``max(topk, depth)`` results (at most the database size); the third array is
    each query's best plain score (what :func:`lift_reranked` needs). ``search_options`` go to
    :func:`dtop.retrieval.search.search` (chunk_size, device, progress).
    """
    depth = max(topk, reranker.depth) if reranker is not None else topk
    scores, indices = search(queries, database, depth, **search_options)
    ceiling = scores[:, 0].copy()
    if reranker is not None:
        scores, indices = reranker.rerank(queries, database, scores, indices)
    return scores, indices, ceiling


def evaluate_reranked(
    queries: torch.Tensor, database: torch.Tensor, gnd: GroundTruth, reranker: Reranker, topk: int = 100
) -> tuple[dict[str, Any], np.ndarray]:
    """Revisited metrics of the re-ranked full lists, and each query's first ``topk`` results.

    Exact: the re-ranked top of each list, then every other image in its plain order
    (:func:`lift_reranked`).
    """
    _, indices, ceiling = reranked_search(queries, database, topk, reranker)
    blocks = lift_reranked(iter_scores(queries, database), indices[:, : reranker.depth], ceiling)
    return evaluate_scores(ScoreBlocks(blocks), gnd), indices[:, :topk]  # lift_reranked yields copies


__all__ = [
    "Reranker", "check_param", "check_lists", "order_by_score", "reorder_top", "lift_reranked", "reranked_search",
    "evaluate_reranked",
]
