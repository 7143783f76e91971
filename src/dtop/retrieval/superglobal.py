"""SuperGlobal re-ranking (Shao et al., ICCV 2023) of each query's top results with global descriptors.

Each of the top ``m`` results is refined by its own neighbourhood among them, the query is
expanded by max-pooling its best refined results, and the top is reordered by the mean of the two
similarities. Only the re-ranking step; the paper's GeM+/regional pooling needs the CNN and is out
of scope. Details: docs/retrieval.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dtop.errors import DataError
from dtop.retrieval.rerank import check_lists, check_param, order_by_score, reorder_top
from dtop.retrieval.search import check_matrix

QUERY_BLOCK = 8  # queries re-ranked at once: (8, m, m) Gram blocks and (8, m, d) descriptors


def refine_candidates(x: torch.Tensor, ids: torch.Tensor, k: int, beta: float) -> torch.Tensor:
    """Each candidate refined by its ``k`` nearest other candidates: ``(x_i + Σ w_j x_j) / (1 + Σ w_j)``.

    ``x``: candidates ``(b, m, d)`` with database indices ``ids`` ``(b, m)``; ``w_j = beta *
    max(s_ij, 0)``; neighbours by similarity, equal similarities by increasing database index.
    """
    b, m, _ = x.shape
    k = min(k, m - 1)
    if k <= 0 or beta == 0:
        return x.clone()
    gram = x @ x.transpose(1, 2)
    # the candidate itself always weighs 1; its neighbours are the others
    others = gram.masked_fill(torch.eye(m, dtype=torch.bool, device=x.device), float("-inf"))
    nearest = order_by_score(others, ids.unsqueeze(1).expand(b, m, m))[..., :k]
    weights = torch.zeros_like(gram).scatter_(2, nearest, beta * others.gather(2, nearest).clamp_min(0))
    return (x + weights @ x) / (1 + weights.sum(dim=2, keepdim=True))


def superglobal_scores(q: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, k: int, kq: int, beta: float
                       ) -> torch.Tensor:
    """SuperGlobal scores ``(b, m)`` of candidates ``x`` ``(b, m, d)`` (database indices ``ids``) for queries ``q``.

    ``s1 = q · x'_i`` with the refined candidates ``x'``; the expanded query ``q'`` is the
    element-wise maximum of the ``kq`` refined candidates of highest ``s1``; ``(s1 + q' · x'_i) / 2``.
    """
    refined = refine_candidates(x, ids, k, beta)
    s1 = torch.einsum("bd,bmd->bm", q, refined)
    best = order_by_score(s1, ids)[:, : min(kq, x.shape[1])]
    expanded = refined.gather(1, best.unsqueeze(2).expand(-1, -1, x.shape[2])).amax(dim=1)
    s2 = torch.einsum("bd,bmd->bm", expanded, refined)
    return (s1 + s2) / 2


def check_superglobal_params(m: int, k: int, kq: int, beta: float) -> None:
    """Raise :class:`ConfigError` for a SuperGlobal parameter out of its range."""
    check_param(m, "m", "superglobal", integer=True, low=1)
    check_param(k, "k", "superglobal", integer=True, low=0)
    check_param(kq, "kq", "superglobal", integer=True, low=1)
    check_param(beta, "beta", "superglobal", low=0)


def superglobal_rerank(
    queries: Any,
    database: Any,
    scores: Any,
    indices: Any,
    m: int = 400,
    k: int = 9,
    kq: int = 10,
    beta: float = 0.15,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank the first ``m`` results of each query by SuperGlobal; later results keep their place.

    ``queries`` (n_queries, d) and ``database`` (n, d): the descriptors that were searched;
    ``scores``/``indices``: the search results ``(n_queries, L)``. Returns the lists with their
    first ``min(m, L)`` entries reordered by the SuperGlobal score (equal scores by increasing
    index) and carrying it as their score. ``device``: where the scores are computed (default CPU).
    """
    check_superglobal_params(m, k, kq, beta)
    qs, db = check_matrix(queries, "queries"), check_matrix(database, "database")
    if int(qs.shape[1]) != int(db.shape[1]):
        raise DataError(f"queries have dimension {qs.shape[1]} but the database has {db.shape[1]}")
    s, idx = check_lists(scores, indices, int(db.shape[0]))
    if s.shape[0] != int(qs.shape[0]):
        raise DataError(f"{qs.shape[0]} queries but {s.shape[0]} result lists; give one list per query")
    n = min(m, s.shape[1])
    out = torch.zeros((s.shape[0], n), dtype=torch.float64)
    ids = torch.from_numpy(np.ascontiguousarray(idx[:, :n]))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    with torch.inference_mode():
        for q0 in range(0, s.shape[0], QUERY_BLOCK):
            block = ids[q0 : q0 + QUERY_BLOCK]
            x = _rows(db, block.reshape(-1)).reshape(block.shape[0], n, -1).to(dev)
            q = _rows(qs, torch.arange(q0, q0 + block.shape[0])).to(dev)
            sg = superglobal_scores(q, x, block.to(dev), k, kq, float(beta))
            out[q0 : q0 + block.shape[0]] = sg.to("cpu", torch.float64)
    return reorder_top(s, idx, out, n)


def _rows(x: np.ndarray | torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of a numpy array or tensor as a float32 CPU tensor."""
    if isinstance(x, torch.Tensor):
        return x[rows.to(x.device)].to("cpu", torch.float32)
    return torch.from_numpy(np.asarray(x[rows.numpy()], dtype=np.float32))


__all__ = ["superglobal_rerank", "superglobal_scores", "refine_candidates", "check_superglobal_params"]
