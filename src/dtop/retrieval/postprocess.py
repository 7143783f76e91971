"""Post-processing of L2-normalised global descriptors under one interface (SPEC §6, §9).

Three steps, each a plain function for the math and a small class for the pipeline:

- **Whitening** (:func:`fit_pca_whitening`, :func:`fit_learned_whitening`, :class:`Whiten`):
  ``x -> normalise(P (x - m))``. *PCA-whitening* is learned from a set of descriptors (mean +
  inverse square root of the covariance along its principal axes, optionally shrunk); *learned
  whitening* (``Lw`` of cirtorch, Radenović et al. TPAMI 2018) is learned from matching pairs:
  the intra-pair difference covariance is whitened first, then the inter-class scatter is rotated
  onto its principal axes. State: tensors ``mean`` (d,) and ``projection`` (dim, d), saved as a
  safetensors file or embedded into a model checkpoint (:meth:`Whitening.to_state`).
- **αDBA** (:func:`alpha_database_augmentation`, :class:`DatabaseAugmentation`): every database
  vector is replaced by ``normalise(Σ_j s_j^α x_j)`` over its ``k`` nearest database neighbours,
  itself included (it is its own first neighbour, ``s = 1``).
- **αQE** (:func:`alpha_query_expansion`, :class:`QueryExpansion`): every query becomes
  ``normalise(q + Σ_j s_j^α x_j)`` over its ``k - 1`` nearest database vectors, i.e. ``k``
  counts the query itself, as ``k`` counts the item itself in αDBA. (Papers that count database
  vectors only, ``nQE``, use ``k = nQE + 1`` here.) ``k = 1`` is the identity for both.

Similarities are clamped at 0 before the power (``max(s, 0)^α``), so a non-integer α never meets
a negative base; ``0^0 = 1``, so ``α = 0`` is the plain average.

**Order.** :class:`PostProcessing` always runs its steps in the order ``whiten → dba → qe``
whatever the order of the config list: whitening changes the space the neighbours are searched
in, DBA changes the database, and QE expands queries against the final database (the cirtorch /
revisitop practice). Each name may appear once.

**Scale.** The k-NN searches are exact and chunked (:func:`dtop.retrieval.search.search`:
``chunk_size`` database rows per block, default automatic, 1024 query rows at a time), so the
extra memory is bounded by one score block, the ``(n, k)`` neighbour lists and the neighbours of
1024 rows being summed, whatever the database size; whitening statistics are accumulated
chunk by chunk in float64. Outputs are float32 on the input's device; ``device`` picks where the
matrix products run (e.g. ``"cuda"`` for a 1M αDBA).
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F

from dtop.errors import CheckpointError, ConfigError, DataError
from dtop.utils.io import atomic_path

WHITENING_FORMAT = "dtop-whitening"
WHITENING_FORMAT_VERSION = 1
#: The single safetensors metadata key (one key keeps the file byte-deterministic: safetensors
#: writes several metadata keys in a random order).
WHITENING_METADATA_KEY = "dtop_whitening"
WHITENING_TYPES = ("pca", "lw")

DEFAULT_CHUNK_SIZE: int | None = None  # automatic: see dtop.retrieval.search
APPLY_CHUNK = 65536  # rows per block when whitening
QUERY_CHUNK = 1024
_STATS_CHUNK = 16384  # rows per float64 block when accumulating whitening statistics

#: The fixed order in which :class:`PostProcessing` runs its steps.
STEP_ORDER: tuple[str, ...] = ("whiten", "dba", "qe")


# ------------------------------------------------------------------------------------ k-NN search


def _knn(
    queries: torch.Tensor, database: torch.Tensor, k: int, chunk_size: int | None, device: str | torch.device | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by :func:`dtop.retrieval.search.search` (chunked, tie rule of the metrics)."""
    from dtop.retrieval.search import search

    scores, indices = search(
        queries, database, k, chunk_size=chunk_size, device=device, query_chunk_size=QUERY_CHUNK
    )
    return torch.from_numpy(scores).to(torch.float32), torch.from_numpy(indices)


def _check_matrix(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"{name} must be a 2-d tensor (n, d) of descriptors, got {shape}")


def _check_k_alpha(k: int, alpha: float, what: str) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"{what}: k must be an integer >= 1 (it counts the item itself), got {k!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha < 0 or alpha != alpha:
        raise ConfigError(f"{what}: alpha must be a number >= 0, got {alpha!r}")


def _weighted_sum(
    base: torch.Tensor | None, scores: torch.Tensor, indices: torch.Tensor, database: torch.Tensor, alpha: float
) -> torch.Tensor:
    """``normalise(base + Σ_j max(s_j, 0)^α · database[i_j])`` row by row (base may be None)."""
    weights = scores.clamp_min(0).pow(alpha)
    neigh = database[indices.to(database.device).reshape(-1)].to(scores.device, torch.float32)
    neigh = neigh.reshape(indices.shape[0], indices.shape[1], -1)
    out = (weights.unsqueeze(-1) * neigh).sum(dim=1)
    if base is not None:
        out = out + base
    return F.normalize(out, dim=1)


# --------------------------------------------------------------------------------------- αQE, αDBA


def alpha_query_expansion(
    queries: torch.Tensor,
    database: torch.Tensor,
    k: int = 10,
    alpha: float = 3.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """αQE: ``normalise(q + Σ max(s,0)^α x)`` over the ``k - 1`` nearest database vectors of q.

    ``k`` counts the query itself (weight ``1^α = 1``), so ``k = 1`` returns the queries
    (re-normalised). Returns float32 ``(n_queries, d)``.
    """
    _check_k_alpha(k, alpha, "alpha_query_expansion")
    _check_matrix(queries, "queries")
    _check_matrix(database, "database")
    q = queries.to(torch.float32)
    if k == 1 or database.shape[0] == 0 or q.shape[0] == 0:
        return F.normalize(q, dim=1)
    scores, indices = _knn(q, database, k - 1, chunk_size, device)
    out = torch.empty_like(q)
    for q0 in range(0, q.shape[0], QUERY_CHUNK):
        sl = slice(q0, q0 + QUERY_CHUNK)
        out[sl] = _weighted_sum(q[sl], scores[sl].to(q.device), indices[sl], database, alpha)
    return out


def alpha_database_augmentation(
    database: torch.Tensor,
    k: int = 10,
    alpha: float = 3.0,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """αDBA: every x becomes ``normalise(Σ max(s,0)^α x_j)`` over its ``k`` nearest database vectors.

    The neighbours are searched in the original database (x itself is its own first neighbour)
    by chunked exact search (``chunk_size`` database rows per block, None: automatic). Returns
    float32 ``(n, d)``.
    """
    _check_k_alpha(k, alpha, "alpha_database_augmentation")
    _check_matrix(database, "database")
    out = torch.empty(database.shape, dtype=torch.float32, device=database.device)
    if database.shape[0] == 0:
        return out
    scores, indices = _knn(database, database, k, chunk_size, device)
    for r0 in range(0, database.shape[0], QUERY_CHUNK):
        sl = slice(r0, r0 + QUERY_CHUNK)
        out[sl] = _weighted_sum(None, scores[sl].to(out.device), indices[sl], database, alpha)
    return out


# -------------------------------------------------------------------------------------- whitening


@dataclass(repr=False)
class Whitening:
    """A learned whitening ``x -> normalise(projection @ (x - mean))``.

    ``kind`` is ``"pca"`` or ``"lw"``; ``info`` records how it was fitted (``fitted_on``,
    ``num_descriptors``, ``num_pairs``, ``shrinkage``, ``eps``) and travels with the state.
    """

    mean: torch.Tensor
    projection: torch.Tensor
    kind: str = "pca"
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in WHITENING_TYPES:
            raise CheckpointError(f"unknown whitening type {self.kind!r}; expected one of {WHITENING_TYPES}")
        if self.mean.ndim != 1 or self.projection.ndim != 2 or self.projection.shape[1] != self.mean.shape[0]:
            raise CheckpointError(
                f"inconsistent whitening: mean {tuple(self.mean.shape)}, projection "
                f"{tuple(self.projection.shape)} (expected (d,) and (dim, d))"
            )

    @property
    def input_dim(self) -> int:
        """Dimension of the descriptors it applies to."""
        return int(self.mean.shape[0])

    @property
    def output_dim(self) -> int:
        """Dimension of the whitened descriptors."""
        return int(self.projection.shape[0])

    def apply(
        self, x: torch.Tensor, normalize: bool = True, chunk_size: int = APPLY_CHUNK
    ) -> torch.Tensor:
        """Whiten ``x`` (n, d) in row blocks: subtract the mean, project, L2-normalise. Float32 out."""
        _check_matrix(x, "descriptors")
        if x.shape[1] != self.input_dim:
            raise DataError(
                f"whitening was fitted on {self.input_dim}-d descriptors but got {x.shape[1]}-d ones: "
                "fit it on descriptors of the same model"
            )
        mean = self.mean.to(x.device, torch.float32)
        proj_t = self.projection.to(x.device, torch.float32).T
        out = torch.empty(x.shape[0], self.output_dim, dtype=torch.float32, device=x.device)
        for r0 in range(0, x.shape[0], chunk_size):
            y = (x[r0:r0 + chunk_size].to(torch.float32) - mean) @ proj_t
            out[r0:r0 + y.shape[0]] = F.normalize(y, dim=1) if normalize else y
        return out

    def metadata(self) -> dict[str, Any]:
        """JSON-friendly description: format, type, dims and how it was fitted."""
        return {
            "format": WHITENING_FORMAT,
            "format_version": WHITENING_FORMAT_VERSION,
            "type": self.kind,
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            **self.info,
        }

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors ``mean``/``projection`` (float32, CPU) and metadata, e.g. for a checkpoint's extras."""
        tensors = {
            "mean": self.mean.detach().to("cpu", torch.float32).contiguous().clone(),
            "projection": self.projection.detach().to("cpu", torch.float32).contiguous().clone(),
        }
        return tensors, self.metadata()

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None) -> Self:
        """Rebuild from :meth:`to_state` output (e.g. a checkpoint's whitening extra)."""
        missing = [k for k in ("mean", "projection") if k not in tensors]
        if missing:
            raise CheckpointError(f"whitening state lacks tensor(s) {missing}; it needs 'mean' and 'projection'")
        meta = dict(metadata or {})
        fmt = meta.pop("format", WHITENING_FORMAT)
        version = meta.pop("format_version", WHITENING_FORMAT_VERSION)
        if fmt != WHITENING_FORMAT or int(version) != WHITENING_FORMAT_VERSION:
            raise CheckpointError(
                f"whitening state has format {fmt!r} version {version}; this dtop reads "
                f"{WHITENING_FORMAT!r} version {WHITENING_FORMAT_VERSION}"
            )
        kind = meta.pop("type", "pca")
        meta.pop("input_dim", None)
        meta.pop("output_dim", None)
        return cls(
            mean=tensors["mean"].to(torch.float32), projection=tensors["projection"].to(torch.float32),
            kind=kind, info=meta,
        )

    def __repr__(self) -> str:
        how = f", fitted on {self.info['num_descriptors']} descriptors" if "num_descriptors" in self.info else ""
        src = f" ({self.info['fitted_on']})" if self.info.get("fitted_on") else ""
        return f"Whitening({self.kind}, {self.input_dim} -> {self.output_dim}{how}{src})"


def save_whitening(whitening: Whitening, path: str | os.PathLike) -> Path:
    """Write ``whitening`` as a safetensors file (tensors ``mean``, ``projection``) atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors, meta = whitening.to_state()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={WHITENING_METADATA_KEY: json.dumps(meta, sort_keys=True)})
    return path


def load_whitening(path: str | os.PathLike) -> Whitening:
    """Read a whitening written by :func:`save_whitening` (clear errors for other files)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"whitening file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    if WHITENING_METADATA_KEY not in header:
        raise CheckpointError(
            f"{path} is a safetensors file without dtop whitening metadata; write it with "
            "dtop.retrieval.postprocess.save_whitening"
        )
    try:
        meta = json.loads(header[WHITENING_METADATA_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} has corrupt whitening metadata: {err}") from err
    return Whitening.from_state(tensors, meta)


def _row_blocks(x: torch.Tensor, chunk: int = _STATS_CHUNK) -> Iterator[torch.Tensor]:
    for r0 in range(0, x.shape[0], chunk):
        yield x[r0:r0 + chunk].to("cpu", torch.float64)


def _mean(x: torch.Tensor) -> torch.Tensor:
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for block in _row_blocks(x):
        total += block.sum(dim=0)
    return total / x.shape[0]


def _scatter(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``Σ (x - mean)(x - mean)^T / n`` in float64, block by block."""
    cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for block in _row_blocks(x):
        c = block - mean
        cov += c.T @ c
    cov /= x.shape[0]
    return (cov + cov.T) / 2


def _eigh_desc(sym: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition, decreasing eigenvalues, each eigenvector's largest entry positive."""
    vals, vecs = torch.linalg.eigh(sym)
    vals, vecs = vals.flip(0), vecs.flip(1)
    pivot = vecs.abs().argmax(dim=0)
    signs = torch.sign(vecs[pivot, torch.arange(vecs.shape[1])])
    signs[signs == 0] = 1
    return vals, vecs * signs


def _check_dim(dim: int | None, rank: int, d: int, what: str) -> int:
    if dim is None:
        return rank
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ConfigError(f"{what}: dim must be a positive integer or None, got {dim!r}")
    if dim > rank:
        raise ConfigError(
            f"{what}: dim={dim} exceeds the {rank} dimensions the data can support "
            f"(descriptors are {d}-d); use dim <= {rank} or fit on more descriptors"
        )
    return dim


def fit_pca_whitening(
    descriptors: torch.Tensor,
    dim: int | None = None,
    shrinkage: float = 0.0,
    eps: float = 1e-6,
    fitted_on: str = "",
) -> Whitening:
    """Learn PCA-whitening from ``descriptors`` (n, d): ``P = diag(λ'^{-1/2}) V^T``, top ``dim`` axes.

    With covariance eigenpairs (λ, V) (divided by n), ``λ' = (1 - shrinkage)·λ + shrinkage·mean(λ)
    + eps·max(λ)``: ``shrinkage`` in [0, 1] pulls the spectrum towards isotropy (less noise
    amplification in weak directions), ``eps`` is a relative floor. With both 0 the whitened
    descriptors have exactly identity covariance. ``dim`` defaults to ``min(d, n - 1)``.
    """
    _check_matrix(descriptors, "descriptors")
    n, d = descriptors.shape
    if n < 2:
        raise DataError(f"fit_pca_whitening needs at least 2 descriptors, got {n}")
    if not 0.0 <= shrinkage <= 1.0:
        raise ConfigError(f"fit_pca_whitening: shrinkage must be in [0, 1], got {shrinkage}")
    if eps < 0:
        raise ConfigError(f"fit_pca_whitening: eps must be >= 0, got {eps}")
    dim = _check_dim(dim, min(d, n - 1), d, "fit_pca_whitening")
    mean = _mean(descriptors)
    vals, vecs = _eigh_desc(_scatter(descriptors, mean))
    vals = vals.clamp_min(0)
    vals = (1 - shrinkage) * vals + shrinkage * vals.mean() + eps * vals[0]
    if bool((vals[:dim] <= 0).any()):
        raise DataError(
            f"fit_pca_whitening: the descriptors span fewer than dim={dim} dimensions; lower dim or set eps > 0"
        )
    projection = vecs[:, :dim].T / vals[:dim].sqrt().unsqueeze(1)
    info = {"fitted_on": fitted_on, "num_descriptors": n, "shrinkage": float(shrinkage), "eps": float(eps)}
    return Whitening(mean.to(torch.float32), projection.to(torch.float32), "pca", info)


def fit_learned_whitening(
    descriptors: torch.Tensor,
    query_indices: Sequence[int] | torch.Tensor,
    positive_indices: Sequence[int] | torch.Tensor,
    dim: int | None = None,
    eps: float = 1e-6,
    fitted_on: str = "",
) -> Whitening:
    """Learn supervised whitening (cirtorch ``Lw``) from matching pairs ``(query_i, positive_i)``.

    ``m`` = mean of the query descriptors; ``S`` = covariance of the pair differences (+ ``eps``
    times its mean eigenvalue on the diagonal); ``P1 = chol(S)^{-1}`` whitens the differences;
    then the whitened, centred descriptors are rotated onto their principal axes and the top
    ``dim`` are kept: ``P = V^T P1``. Pair differences then have identity covariance.
    """
    _check_matrix(descriptors, "descriptors")
    n, d = descriptors.shape
    q = torch.as_tensor(query_indices, dtype=torch.int64).reshape(-1)
    p = torch.as_tensor(positive_indices, dtype=torch.int64).reshape(-1)
    if q.numel() != p.numel() or q.numel() == 0:
        raise DataError(
            f"fit_learned_whitening needs as many query as positive indices (at least one pair), "
            f"got {q.numel()} and {p.numel()}"
        )
    if int(torch.cat([q, p]).min()) < 0 or int(torch.cat([q, p]).max()) >= n:
        raise DataError(f"fit_learned_whitening: pair indices must be in [0, {n})")
    if eps < 0:
        raise ConfigError(f"fit_learned_whitening: eps must be >= 0, got {eps}")
    dim = _check_dim(dim, d, d, "fit_learned_whitening")
    mean = _mean(descriptors[q])
    diff_cov = torch.zeros(d, d, dtype=torch.float64)
    for r0 in range(0, q.numel(), _STATS_CHUNK):
        df = descriptors[q[r0:r0 + _STATS_CHUNK]].double() - descriptors[p[r0:r0 + _STATS_CHUNK]].double()
        diff_cov += df.T @ df
    diff_cov = (diff_cov + diff_cov.T) / (2 * q.numel())
    diff_cov += eps * diff_cov.diagonal().mean() * torch.eye(d, dtype=torch.float64)
    chol, info = torch.linalg.cholesky_ex(diff_cov)
    if int(info) != 0:
        raise DataError(
            "fit_learned_whitening: the pair differences span fewer than all dimensions "
            "(covariance not positive definite); use more pairs or eps > 0"
        )
    p1 = torch.linalg.solve_triangular(chol, torch.eye(d, dtype=torch.float64), upper=False)
    scatter = p1 @ _scatter(descriptors, mean) @ p1.T
    _, vecs = _eigh_desc((scatter + scatter.T) / 2)
    projection = vecs[:, :dim].T @ p1
    info = {"fitted_on": fitted_on, "num_descriptors": n, "num_pairs": int(q.numel()), "eps": float(eps)}
    return Whitening(mean.to(torch.float32), projection.to(torch.float32), "lw", info)


# ------------------------------------------------------------------------------------------ steps


class PostStep:
    """One post-processing step: ``fit`` on database descriptors, then apply to both sides.

    ``apply_queries`` receives the database as processed by the whole pipeline (only αQE uses it).
    """

    name: ClassVar[str] = ""
    params: ClassVar[tuple[str, ...]] = ()

    @property
    def fitted(self) -> bool:
        """Whether the step has what it needs to be applied (only whitening learns anything)."""
        return True

    def fit(self, database: torch.Tensor) -> Self:
        """Learn the step's state from ``database`` descriptors (no-op for stateless steps)."""
        return self

    def apply_database(self, database: torch.Tensor) -> torch.Tensor:
        """Transform database descriptors (identity by default)."""
        return database

    def apply_queries(self, queries: torch.Tensor, database: torch.Tensor) -> torch.Tensor:
        """Transform query descriptors given the processed database (identity by default)."""
        return queries

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description of the step and its parameters (for result files)."""
        return {"name": self.name, **{p: getattr(self, p) for p in self.params}}


class Whiten(PostStep):
    """Whitening step: PCA-whitening fitted by :meth:`fit`, or a given/saved :class:`Whitening`."""

    name = "whiten"
    params = ("dim", "shrinkage", "eps", "path")

    def __init__(
        self,
        dim: int | None = None,
        shrinkage: float = 0.0,
        eps: float = 1e-6,
        path: str | None = None,
        whitening: Whitening | None = None,
    ) -> None:
        self.dim, self.shrinkage, self.eps, self.path = dim, shrinkage, eps, path
        self.whitening = whitening if whitening is not None else (load_whitening(path) if path else None)

    @property
    def fitted(self) -> bool:
        """Whether a whitening is present (fitted, given or loaded)."""
        return self.whitening is not None

    def fit(self, database: torch.Tensor, fitted_on: str = "database") -> Self:
        """Fit PCA-whitening on ``database`` (replacing any previous one)."""
        self.whitening = fit_pca_whitening(
            database, dim=self.dim, shrinkage=self.shrinkage, eps=self.eps, fitted_on=fitted_on
        )
        return self

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.whitening is None:
            raise ConfigError("the whiten step is not fitted: call fit(descriptors) or give path=<whitening file>")
        return self.whitening.apply(x)

    def apply_database(self, database: torch.Tensor) -> torch.Tensor:
        """Whiten the database."""
        return self._apply(database)

    def apply_queries(self, queries: torch.Tensor, database: torch.Tensor) -> torch.Tensor:
        """Whiten the queries."""
        return self._apply(queries)

    def describe(self) -> dict[str, Any]:
        """Parameters plus the fitted whitening's metadata."""
        out = super().describe()
        if self.whitening is not None:
            out["whitening"] = self.whitening.metadata()
        return out

    def __repr__(self) -> str:
        args = [f"dim={self.dim}"]
        if self.shrinkage:
            args.append(f"shrinkage={self.shrinkage}")
        if self.path:
            args.append(f"path={self.path!r}")
        args.append(repr(self.whitening) if self.whitening is not None else "not fitted")
        return f"Whiten({', '.join(args)})"


class DatabaseAugmentation(PostStep):
    """αDBA step (database side only); see :func:`alpha_database_augmentation`."""

    name = "dba"
    params = ("k", "alpha")

    def __init__(
        self, k: int = 10, alpha: float = 3.0, chunk_size: int | None = DEFAULT_CHUNK_SIZE,
        device: str | torch.device | None = None,
    ) -> None:
        _check_k_alpha(k, alpha, "dba")
        self.k, self.alpha, self.chunk_size, self.device = k, float(alpha), chunk_size, device

    def apply_database(self, database: torch.Tensor) -> torch.Tensor:
        """Augment every database vector with its k nearest neighbours."""
        return alpha_database_augmentation(database, self.k, self.alpha, self.chunk_size, self.device)

    def __repr__(self) -> str:
        return f"DatabaseAugmentation(k={self.k}, alpha={self.alpha})"


class QueryExpansion(PostStep):
    """αQE step (query side only); see :func:`alpha_query_expansion`."""

    name = "qe"
    params = ("k", "alpha")

    def __init__(
        self, k: int = 10, alpha: float = 3.0, chunk_size: int | None = DEFAULT_CHUNK_SIZE,
        device: str | torch.device | None = None,
    ) -> None:
        _check_k_alpha(k, alpha, "qe")
        self.k, self.alpha, self.chunk_size, self.device = k, float(alpha), chunk_size, device

    def apply_queries(self, queries: torch.Tensor, database: torch.Tensor) -> torch.Tensor:
        """Expand every query with its k - 1 nearest database vectors."""
        return alpha_query_expansion(queries, database, self.k, self.alpha, self.chunk_size, self.device)

    def __repr__(self) -> str:
        return f"QueryExpansion(k={self.k}, alpha={self.alpha})"


STEPS: dict[str, type[PostStep]] = {cls.name: cls for cls in (Whiten, DatabaseAugmentation, QueryExpansion)}


# --------------------------------------------------------------------------------------- pipeline


StepConfig = str | Mapping[str, Any]


def parse_step(config: StepConfig) -> tuple[str, dict[str, Any]]:
    """``"qe"``, ``"qe:k=5,alpha=3"`` or ``{"name": "qe", "k": 5}`` → ``("qe", {"k": 5})``."""
    import yaml

    if isinstance(config, str):
        name, _, rest = config.strip().partition(":")
        params: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise ConfigError(f"post-processing step {config!r}: expected key=value, got {item!r}")
            params[key.strip()] = yaml.safe_load(value.strip())
    elif isinstance(config, Mapping):
        params = dict(config)
        name = params.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"post-processing step {dict(config)!r} needs a 'name' ({', '.join(STEP_ORDER)})")
    else:
        raise ConfigError(f"a post-processing step is a name or a mapping, got {config!r}")
    name = name.strip().lower()
    if name not in STEPS:
        close = difflib.get_close_matches(name, list(STEPS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown post-processing step {name!r}{hint} Valid steps: {', '.join(STEP_ORDER)}")
    unknown = [k for k in params if k not in STEPS[name].params]
    if unknown:
        raise ConfigError(
            f"post-processing step {name!r} has no parameter {unknown[0]!r}; valid: {', '.join(STEPS[name].params)}"
        )
    return name, params


class PostProcessing:
    """A sequence of post-processing steps run in the fixed order ``whiten → dba → qe``.

    Typical use::

        pp = PostProcessing.from_config(["whiten", "dba:k=10", {"name": "qe", "k": 10}])
        pp.fit(train_descriptors)            # optional: whitening learned elsewhere
        queries, database = pp.process(queries, database)

    Steps not fitted when :meth:`process`/:meth:`apply_database` runs are fitted on the database
    being processed (transductive; recorded in :meth:`describe` as ``fitted_on: "database"``).
    """

    def __init__(self, steps: Sequence[PostStep] = ()) -> None:
        names = [s.name for s in steps]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"post-processing step(s) {dupes} given more than once; each may appear once")
        self.steps: list[PostStep] = sorted(steps, key=lambda s: STEP_ORDER.index(s.name))

    @classmethod
    def from_config(
        cls,
        config: Sequence[StepConfig] | StepConfig | None,
        chunk_size: int | None = DEFAULT_CHUNK_SIZE,
        device: str | torch.device | None = None,
    ) -> PostProcessing:
        """Build from a config list of step names / ``"name:key=value,..."`` / mappings (None: empty)."""
        if config is None:
            return cls([])
        if isinstance(config, str | Mapping):
            config = [config]
        steps: list[PostStep] = []
        for item in config:
            name, params = parse_step(item)
            extra: dict[str, Any] = {} if name == "whiten" else {"chunk_size": chunk_size, "device": device}
            try:
                steps.append(STEPS[name](**params, **extra))
            except TypeError as err:
                raise ConfigError(f"post-processing step {name!r}: {err}") from err
        return cls(steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[PostStep]:
        return iter(self.steps)

    def __getitem__(self, name: str) -> PostStep:
        """The step called ``name``."""
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    @property
    def fitted(self) -> bool:
        """Whether every step can be applied without fitting."""
        return all(s.fitted for s in self.steps)

    def fit(self, descriptors: torch.Tensor, fitted_on: str = "") -> Self:
        """Fit the learnable steps (whitening) on ``descriptors``, e.g. those of a training set.

        Later steps are fitted on the output of earlier ones (a whitening sees raw descriptors).
        """
        x = descriptors
        for i, step in enumerate(self.steps):
            if isinstance(step, Whiten):
                step.fit(x, fitted_on=fitted_on)
            else:
                step.fit(x)
            if any(isinstance(later, Whiten) for later in self.steps[i + 1:]):
                x = step.apply_database(x)  # only learnable steps need the transformed input
        return self

    def apply_database(self, database: torch.Tensor) -> torch.Tensor:
        """Run the database side of every step (fitting unfitted steps on the database)."""
        x = database
        for step in self.steps:
            if not step.fitted:
                step.fit(x)
            x = step.apply_database(x)
        return x

    def apply_queries(self, queries: torch.Tensor, database: torch.Tensor) -> torch.Tensor:
        """Run the query side of every step; ``database`` is the output of :meth:`apply_database`."""
        x = queries
        for step in self.steps:
            x = step.apply_queries(x, database)
        return x

    def process(self, queries: torch.Tensor, database: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-process both sides: returns ``(queries, database)``; no steps → the inputs unchanged."""
        database = self.apply_database(database)
        return self.apply_queries(queries, database), database

    def describe(self) -> list[dict[str, Any]]:
        """The steps in the order they run, with parameters (for result files)."""
        return [s.describe() for s in self.steps]

    def __repr__(self) -> str:
        return f"PostProcessing([{', '.join(repr(s) for s in self.steps)}])"
