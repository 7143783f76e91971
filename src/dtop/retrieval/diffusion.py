"""Diffusion re-ranking (Iscen et al., CVPR 2017) of global descriptors on a reciprocal k-NN graph.

Offline, :func:`build_knn_graph` links every database vector to its reciprocal nearest neighbours
(weights ``max(s, 0)^gamma``), an ``(n, k)`` table; online, :func:`diffusion_rerank` solves
``(I - alpha S) f = y`` by conjugate gradient on the graph restricted to each query's top results
and reorders them by ``f``. The algorithm, its parameters and its cost: docs/retrieval.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from dtop.errors import CheckpointError, ConfigError, DataError
from dtop.retrieval.rerank import check_lists, check_param, reorder_top
from dtop.retrieval.search import check_matrix, search
from dtop.utils.io import atomic_path, read_versioned_json

log = logging.getLogger(__name__)

GRAPH_FORMAT = "dtop-knn-graph"
GRAPH_FORMAT_VERSION = 1
GRAPH_METADATA_KEY = "dtop_knn_graph"  # one key keeps the safetensors file byte-deterministic
GraphEngine = Literal["auto", "faiss", "torch"]

_ROW_CHUNK = 16384  # database rows searched (faiss) / hashed at once
_PAIR_BUDGET = 1 << 22  # (row, neighbour, neighbour's neighbour) triples compared at once: ~40 MiB
_PROGRESS_MIN_QUERIES = 200


# ------------------------------------------------------------------------------------------ graph


@dataclass(repr=False)
class KnnGraph:
    """The reciprocal k-NN graph of a database: row ``i`` lists its neighbours (``-1``: no edge).

    ``neighbors`` (n, k) int32 and ``weights`` (n, k) float32 (0 where there is no edge) are
    symmetric: ``j`` is in row ``i`` with weight ``w`` iff ``i`` is in row ``j`` with weight ``w``.
    ``info`` records how it was built (``dim``, ``digest`` of the database, ``engine``).
    """

    neighbors: torch.Tensor
    weights: torch.Tensor
    k: int
    gamma: float
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.neighbors.ndim != 2 or self.neighbors.shape != self.weights.shape:
            raise CheckpointError(
                f"inconsistent k-NN graph: neighbors {tuple(self.neighbors.shape)}, weights "
                f"{tuple(self.weights.shape)} (expected two (n, k) tables)"
            )

    @property
    def n(self) -> int:
        """Number of database vectors (nodes)."""
        return int(self.neighbors.shape[0])

    @property
    def num_edges(self) -> int:
        """Number of undirected edges."""
        return int((self.neighbors >= 0).sum()) // 2

    def subgraph(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Edges among ``nodes`` (distinct database indices) as local ``(rows, cols, weights)``.

        Both directions of every edge, ordered by row, then by column (the order of a CSR matrix).
        """
        n = nodes.numel()
        pos = torch.full((self.n,), n, dtype=torch.int64)  # n: not in the subgraph (sorts last)
        pos[nodes] = torch.arange(n)
        nb = self.neighbors[nodes].to(torch.int64)
        local = torch.where(nb >= 0, pos[nb.clamp_min(0)], n)
        cols, order = torch.sort(local, dim=1)
        keep = cols < n
        rows = torch.arange(n).unsqueeze(1).expand_as(keep)[keep]
        return rows, cols[keep], self.weights[nodes].gather(1, order)[keep].to(torch.float64)

    def metadata(self) -> dict[str, Any]:
        """JSON-friendly description (format, size, parameters, how it was built)."""
        return {"format": GRAPH_FORMAT, "format_version": GRAPH_FORMAT_VERSION, "n": self.n, "k": self.k,
                "gamma": self.gamma, "edges": self.num_edges, **self.info}

    def __repr__(self) -> str:
        return f"KnnGraph(n={self.n}, k={self.k}, gamma={self.gamma}, edges={self.num_edges})"


def database_digest(database: Any) -> str:
    """Short sha256 of a database's float32 rows (and shape): which database a graph belongs to."""
    x = check_matrix(database, "database")
    h = hashlib.sha256(f"{tuple(x.shape)}".encode())
    for r0 in range(0, int(x.shape[0]), _ROW_CHUNK):
        block = x[r0 : r0 + _ROW_CHUNK]
        block = block.detach().cpu().numpy() if isinstance(block, torch.Tensor) else block
        h.update(np.ascontiguousarray(block, dtype=np.float32).data)
    return h.hexdigest()[:16]


def _neighbour_lists(
    database: Any, k: int, engine: str, chunk_size: int | None, device: str | torch.device | None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest database vectors of every database vector (itself usually first)."""
    if engine == "torch":
        return search(database, database, k, chunk_size=chunk_size, device=device)
    from dtop.retrieval.faiss_index import _import_faiss

    if database.dtype in (np.float16, torch.float16):
        return _half_lists(database, k)
    faiss = _import_faiss()
    x = database.detach().cpu().numpy() if isinstance(database, torch.Tensor) else np.asarray(database)
    x = np.ascontiguousarray(x, dtype=np.float32)
    k = min(k, x.shape[0])
    scores = np.empty((x.shape[0], k), dtype=np.float32)
    indices = np.empty((x.shape[0], k), dtype=np.int64)
    bar = tqdm(total=x.shape[0], unit="img", desc="k-NN graph", disable=x.shape[0] < 100_000)
    with bar:
        for r0 in range(0, x.shape[0], _ROW_CHUNK):
            d, i = faiss.knn(x[r0 : r0 + _ROW_CHUNK], x, k, metric=faiss.METRIC_INNER_PRODUCT)
            order = np.lexsort((i, -d.astype(np.float64)), axis=1)  # equal scores: smaller index first
            scores[r0 : r0 + len(d)] = np.take_along_axis(d, order, 1)
            indices[r0 : r0 + len(d)] = np.take_along_axis(i, order, 1)
            bar.update(len(d))
    return scores, indices


def _half_lists(database: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN lists of a float16 database without a float32 copy of it.

    faiss's ``SQfp16`` index stores the float16 values as they are and decodes them exactly while
    scanning: the same scores as a flat index over the converted matrix, at half its memory. Rows
    go in and queries out one block at a time (converted per block).
    """
    from dtop.retrieval.faiss_index import FaissIndex

    index = FaissIndex(int(database.shape[1]), factory="SQfp16")
    index.add(database)
    return _index_lists(index, database, k)


def _approximate_lists(x: Any, k: int, ivf: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """Approximate k-NN lists from a faiss ``IVF<ivf>,Flat`` index searched with ``nprobe`` lists (-1: missing)."""
    from dtop.retrieval.faiss_index import FaissIndex

    n = int(x.shape[0])
    index = FaissIndex(int(x.shape[1]), factory=f"IVF{ivf},Flat", search_params=f"nprobe={nprobe}")
    index.train(x[:: max(1, n // (64 * ivf))])  # k-means needs ~40 points per list; a strided sample
    index.add(x)
    return _index_lists(index, x, k)


def _index_lists(index: Any, x: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of every row of ``x`` in the faiss ``index`` holding ``x``, searched a block of rows at a time."""
    n = int(x.shape[0])
    k = min(k, n)
    scores = np.empty((n, k), dtype=np.float32)
    indices = np.empty((n, k), dtype=np.int64)
    for r0 in tqdm(range(0, n, _ROW_CHUNK), desc="k-NN graph", unit="block", disable=n < 100_000):
        scores[r0 : r0 + _ROW_CHUNK], indices[r0 : r0 + _ROW_CHUNK] = index.search(x[r0 : r0 + _ROW_CHUNK], k)
    return scores, indices


def _reciprocal(scores: np.ndarray, indices: np.ndarray, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the edges ``i -> j`` with ``i`` among the neighbours of ``j`` (not ``i -> i``); weights symmetric.

    ``indices`` may hold -1 (no neighbour: an approximate search found fewer than k).
    """
    idx = torch.from_numpy(indices)
    n, k = idx.shape
    w = torch.from_numpy(scores).to(torch.float32).clamp_min(0).pow(gamma)
    neighbors = torch.full((n, k), -1, dtype=torch.int32)
    weights = torch.zeros((n, k), dtype=torch.float32)
    step = max(1, _PAIR_BUDGET // (k * k))
    for r0 in range(0, n, step):
        rows = torch.arange(r0, min(n, r0 + step))
        nb = idx[rows]  # (c, k)
        present = nb >= 0
        nb = nb.clamp_min(0)
        back = idx[nb] == rows.view(-1, 1, 1)  # (c, k, k): where row i appears in the list of j
        mutual = back.any(dim=2) & (nb != rows.view(-1, 1)) & present
        w_back = w[nb, back.to(torch.int8).argmax(dim=2)]  # the weight of j -> i
        # (a + b) / 2 == (b + a) / 2 exactly: both directions of an edge get the same weight
        sym = torch.where(mutual, (w[rows] + w_back) / 2, 0.0)
        edge = mutual & (sym > 0)
        neighbors[rows] = torch.where(edge, nb, -1).to(torch.int32)
        weights[rows] = sym.where(edge, 0.0).to(torch.float32)
    return neighbors, weights


def build_knn_graph(
    database: Any,
    k: int = 50,
    gamma: float = 3.0,
    engine: GraphEngine = "auto",
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    ivf: int | None = None,
    nprobe: int = 32,
) -> KnnGraph:
    """The reciprocal k-NN graph of ``database`` (n, d): edge ``i - j`` iff each is among the other's k NN.

    ``k`` counts the vector itself (which gets no edge); the weight is ``max(s, 0)^gamma`` of the
    cosine similarity ``s``. The neighbour search is exact: faiss (``engine="faiss"``, or
    ``"auto"`` when it is installed and ``device`` is not a GPU) or the chunked torch search
    (``chunk_size``, ``device``);
    with ``ivf`` lists it is approximate (faiss ``IVF<ivf>,Flat`` searching ``nprobe`` lists),
    much faster on large databases.
    """
    check_param(k, "k", "k-NN graph", integer=True, low=2)
    check_param(gamma, "gamma", "k-NN graph", low=0, open_low=True)
    x = check_matrix(database, "database")
    if int(x.shape[0]) == 0:
        raise DataError("the database is empty: there is no graph to build")
    used = _resolve_engine(engine, device) if ivf is None else f"faiss IVF{ivf},Flat nprobe={nprobe}"
    log.info("building the reciprocal %d-NN graph of %d descriptors (%s)", k, x.shape[0], used)
    if ivf is None:
        scores, indices = _neighbour_lists(x, k, used, chunk_size, device)
    else:
        check_param(ivf, "ivf", "k-NN graph", integer=True, low=1)
        check_param(nprobe, "nprobe", "k-NN graph", integer=True, low=1)
        scores, indices = _approximate_lists(x, k, ivf, nprobe)
    neighbors, weights = _reciprocal(scores, indices, float(gamma))
    info = {"dim": int(x.shape[1]), "digest": database_digest(x), "engine": used}
    return KnnGraph(neighbors, weights, k=int(k), gamma=float(gamma), info=info)


def _resolve_engine(engine: str, device: str | torch.device | None) -> str:
    """``auto``: torch on a GPU device, else faiss when it is installed, else torch."""
    if engine not in ("auto", "faiss", "torch"):
        raise ConfigError(f"k-NN graph: engine must be auto, faiss or torch, got {engine!r}")
    if engine != "auto":
        return engine
    if device is not None and torch.device(device).type != "cpu":
        return "torch"
    try:
        import faiss  # noqa: F401 - only asking whether it is installed
    except ImportError:
        return "torch"
    return "faiss"


def save_knn_graph(graph: KnnGraph, path: str | os.PathLike) -> Path:
    """Write ``graph`` as a safetensors file (tensors ``neighbors``, ``weights``) atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {"neighbors": graph.neighbors.contiguous(), "weights": graph.weights.contiguous()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={GRAPH_METADATA_KEY: json.dumps(graph.metadata(), sort_keys=True)})
    return path


def load_knn_graph(path: str | os.PathLike) -> KnnGraph:
    """Read a graph written by :func:`save_knn_graph` (clear errors for other files)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"k-NN graph file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    if GRAPH_METADATA_KEY not in header or set(tensors) != {"neighbors", "weights"}:
        raise CheckpointError(f"{path} is not a dtop k-NN graph; delete it and let the diffusion step rebuild it")
    try:
        meta = read_versioned_json(
            path, text=header[GRAPH_METADATA_KEY], fmt=GRAPH_FORMAT, version=GRAPH_FORMAT_VERSION,
            required=("k", "gamma"), kind="k-NN graph", damaged="delete it and build it again",
            outdated="Delete it and build it again with this dtop.",
        )
    except DataError as err:
        raise CheckpointError(str(err)) from err
    info = {key: v for key, v in meta.items() if key not in ("format", "format_version", "n", "k", "gamma", "edges")}
    return KnnGraph(tensors["neighbors"].to(torch.int32), tensors["weights"].to(torch.float32),
                    k=int(meta["k"]), gamma=float(meta["gamma"]), info=info)


def knn_graph_for(
    database: Any, k: int = 50, gamma: float = 3.0, cache: str | os.PathLike | None = None, **build: Any
) -> KnnGraph:
    """The graph of ``database``, read from the folder ``cache`` when it was built there before.

    Without it (or without ``cache``) the graph is built (:func:`build_knn_graph`, keyword options
    ``build``) and, with ``cache``, written there as ``knn-<digest>-k<k>-gamma<gamma>[-ivf<n>-nprobe<p>]
    .safetensors`` (the digest names the database, so one folder serves several).
    """
    if cache is None:
        return build_knn_graph(database, k=k, gamma=gamma, **build)
    digest = database_digest(database)
    ivf = build.get("ivf")
    approx = f"-ivf{ivf}-nprobe{build.get('nprobe', 32)}" if ivf else ""
    path = Path(cache) / f"knn-{digest}-k{k}-gamma{float(gamma):g}{approx}.safetensors"
    if path.is_file():
        graph = load_knn_graph(path)
        if (graph.n, graph.k, graph.gamma, graph.info.get("digest")) == (int(database.shape[0]), k, gamma, digest):
            log.info("using the k-NN graph %s (%s)", path, graph)
            return graph
        log.warning("%s does not hold the graph its name says; building it again", path)
    graph = build_knn_graph(database, k=k, gamma=gamma, **build)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_knn_graph(graph, path)
    log.info("wrote the k-NN graph %s (%s)", path, graph)
    return graph


# -------------------------------------------------------------------------------------- diffusion


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, tol: float = 1e-6, iterations: int = 20
) -> torch.Tensor:
    """Solve ``A x = b`` for a symmetric positive definite ``A`` given as ``matvec``; ``x0 = 0``.

    Stops when ``||b - A x|| <= tol * ||b||`` or after ``iterations`` steps (returns the last iterate).
    """
    x = torch.zeros_like(b)
    b_norm = float(torch.linalg.vector_norm(b))
    if b_norm == 0.0:
        return x
    r = b.clone()
    p = r.clone()
    rs = float(r @ r)
    for _ in range(iterations):
        if rs**0.5 <= tol * b_norm:
            break
        ap = matvec(p)
        step = rs / float(p @ ap)
        x += step * p
        r -= step * ap
        rs_next = float(r @ r)
        p = r + (rs_next / rs) * p
        rs = rs_next
    return x


def transition_matrix(graph: KnnGraph, nodes: torch.Tensor) -> torch.Tensor:
    """``S = D^-1/2 W D^-1/2`` of the subgraph induced by ``nodes``: a float64 CSR matrix.

    ``D`` holds the degrees within the subgraph; an isolated node gets an empty row.
    """
    rows, cols, w = graph.subgraph(nodes)  # in CSR order
    n = nodes.numel()
    degree = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, w)
    d = torch.where(degree > 0, degree.clamp_min(1e-300).rsqrt(), 0.0)
    crow = torch.zeros(n + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta state": the matrix-vector product is not
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, d[rows] * w * d[cols], (n, n))


def diffuse(
    graph: KnnGraph, nodes: torch.Tensor, y: torch.Tensor, alpha: float = 0.99, tol: float = 1e-6,
    iterations: int = 20,
) -> torch.Tensor:
    """Diffusion scores ``f`` (float64) of ``nodes`` from ``y``: ``(I - alpha S) f = y`` on the induced subgraph.

    ``S``: :func:`transition_matrix` (an isolated node keeps ``f = y``).
    """
    s = transition_matrix(graph, nodes)
    return conjugate_gradient(lambda p: p - alpha * (s @ p), y.to(torch.float64), tol=tol, iterations=iterations)


def check_diffusion_params(
    k: int = 50, trunc: int = 1, kq: int = 1, gamma: float = 3.0, alpha: float = 0.99, tol: float = 1e-6,
    iterations: int = 1,
) -> None:
    """Raise :class:`ConfigError` for a diffusion parameter out of its range."""
    what = "diffusion"
    check_param(k, "k", what, integer=True, low=2)
    check_param(trunc, "trunc", what, integer=True, low=1)
    check_param(kq, "kq", what, integer=True, low=1)
    check_param(gamma, "gamma", what, low=0, open_low=True)
    check_param(alpha, "alpha", what, low=0, high=1, open_high=True)
    check_param(tol, "tol", what, low=0, open_low=True)
    check_param(iterations, "iterations", what, integer=True, low=1)


def diffusion_rerank(
    scores: Any,
    indices: Any,
    graph: KnnGraph,
    trunc: int = 10000,
    kq: int = 10,
    gamma: float = 3.0,
    alpha: float = 0.99,
    tol: float = 1e-6,
    iterations: int = 20,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank the first ``trunc`` results of each query by diffusion; later results keep their place.

    ``scores``/``indices``: each query's plain search results ``(n_queries, L)``, best first, over
    the database of ``graph``. The query's ``kq`` best results start the diffusion with
    ``y = max(s, 0)^gamma``; the results become ``(f, index)`` ordered by ``f`` descending, equal
    ``f`` by increasing index (an image the diffusion does not reach has ``f = 0``).
    """
    check_diffusion_params(trunc=trunc, kq=kq, gamma=gamma, alpha=alpha, tol=tol, iterations=iterations)
    s, idx = check_lists(scores, indices, graph.n)
    n = min(trunc, s.shape[1])
    f = torch.zeros((s.shape[0], n), dtype=torch.float64)
    ids = torch.from_numpy(np.ascontiguousarray(idx[:, :n]))
    if len(ids) and torch.any(torch.sort(ids, dim=1).values.diff(dim=1) == 0):
        raise DataError("a result list names one database image twice; re-rank the lists of an exact search")
    m = min(kq, n)
    y0 = torch.from_numpy(np.ascontiguousarray(s[:, :m], dtype=np.float64)).clamp_min(0).pow(gamma)
    with _one_thread():
        for q in tqdm(range(s.shape[0]), desc="diffusion", unit="query", disable=s.shape[0] < _PROGRESS_MIN_QUERIES):
            y = torch.zeros(n, dtype=torch.float64)
            y[:m] = y0[q]
            f[q] = diffuse(graph, ids[q], y, alpha=alpha, tol=tol, iterations=iterations)
    return reorder_top(s, idx, f, n)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread: the per-query systems are small, and intra-op threads cost more than
    they give there (ten times more on a loaded two-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


__all__ = [
    "KnnGraph", "build_knn_graph", "knn_graph_for", "save_knn_graph", "load_knn_graph", "database_digest",
    "conjugate_gradient", "transition_matrix", "diffuse", "diffusion_rerank", "check_diffusion_params",
]
