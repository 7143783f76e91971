"""Query-side post-processing of L2-normalised global descriptors: αQE, αDBA and the pipeline.

:class:`PostProcessing` runs whitening (:mod:`dtop.retrieval.whitening`), αDBA and αQE in the fixed
order ``whiten → dba → qe``, then after the search at most one re-ranking step (diffusion or
SuperGlobal, :mod:`dtop.retrieval.rerank`), built from ``--post`` step strings such as ``"qe:k=5,alpha=3"``.
Definitions, order and memory bounds: docs/retrieval.md.

Over 500 lines on purpose: the step classes (whitening, αDBA, αQE, diffusion, SuperGlobal) must
sit beside the pipeline that parses ``--post``, because the re-ranking modules are imported by it
and cannot import it back.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Self

import numpy as np
import torch
import torch.nn.functional as F

from dtop.errors import ConfigError
from dtop.retrieval.diffusion import KnnGraph, check_diffusion_params, diffusion_rerank, knn_graph_for
from dtop.retrieval.rerank import reranked_search
from dtop.retrieval.search import search
from dtop.retrieval.superglobal import check_superglobal_params, superglobal_rerank
from dtop.retrieval.whitening import (
    Whitening,
    check_descriptor_tensor,
    fit_learned_whitening,
    fit_pca_whitening,
    load_whitening,
    result_dtype,
    save_whitening,
)

QUERY_CHUNK = 1024  # query (or database) rows whose neighbours are summed at once

#: The fixed order in which :class:`PostProcessing` runs its steps (a re-ranking step comes last).
STEP_ORDER: tuple[str, ...] = ("whiten", "dba", "qe", "diffusion", "superglobal")


# ------------------------------------------------------------------------------------ k-NN search


def _knn(
    queries: torch.Tensor, database: torch.Tensor, k: int, chunk_size: int | None, device: str | torch.device | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by :func:`dtop.retrieval.search.search` (chunked, tie rule of the metrics)."""
    scores, indices = search(
        queries, database, k, chunk_size=chunk_size, device=device, query_chunk_size=QUERY_CHUNK
    )
    return torch.from_numpy(scores).to(torch.float32), torch.from_numpy(indices)


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
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """αQE: ``normalise(q + Σ max(s,0)^α x)`` over the ``k - 1`` nearest database vectors of q.

    ``k`` counts the query itself (weight ``1^α = 1``), so ``k = 1`` returns the queries
    (re-normalised). Returns float32 ``(n_queries, d)``.
    """
    _check_k_alpha(k, alpha, "alpha_query_expansion")
    check_descriptor_tensor(queries, "queries")
    check_descriptor_tensor(database, "database")
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
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """αDBA: every x becomes ``normalise(Σ max(s,0)^α x_j)`` over its ``k`` nearest database vectors.

    The neighbours are searched in the original database (x itself is its own first neighbour)
    by chunked exact search (``chunk_size`` database rows per block, None: automatic). Returns
    ``(n, d)`` in float32, or 16-bit like a 16-bit database (computed in float32 block by block).
    """
    _check_k_alpha(k, alpha, "alpha_database_augmentation")
    check_descriptor_tensor(database, "database")
    out = torch.empty(database.shape, dtype=result_dtype(database), device=database.device)
    if database.shape[0] == 0:
        return out
    scores, indices = _knn(database, database, k, chunk_size, device)
    for r0 in range(0, database.shape[0], QUERY_CHUNK):
        sl = slice(r0, r0 + QUERY_CHUNK)
        out[sl] = _weighted_sum(None, scores[sl].to(out.device), indices[sl], database, alpha)
    return out


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

    @property
    def transductive(self) -> bool:
        """Whether the step learned from the processed database itself (the test images)."""
        return False

    def fit(self, database: torch.Tensor) -> Self:
        """Learn the step's state from ``database`` descriptors (no-op for stateless steps)."""
        return self

    def check(self) -> None:
        """Raise :class:`ConfigError` if the step cannot run as configured (before any work)."""

    def fit_database(self, database: torch.Tensor) -> Self:
        """Learn an unfitted step's state from the processed database (what :class:`PostProcessing` does)."""
        return self.fit(database)

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
    """Whitening step: a saved/given :class:`Whitening`, or PCA fitted by :meth:`fit`.

    ``path``: a whitening file (``dtop whiten``). ``fit="database"``: PCA-whitening fitted on the
    database being processed, which is transductive (it uses the test images) and recorded as such.
    Without either, the whitening must come from :meth:`fit` or the caller (e.g. the checkpoint's
    extra); :meth:`check` says so. ``dim`` keeps the first ``dim`` output axes (PCA fit, or a
    loaded whitening truncated).
    """

    name = "whiten"
    params = ("dim", "shrinkage", "eps", "path", "fit")
    FIT_CHOICES: ClassVar[tuple[str, ...]] = ("database",)

    def __init__(
        self,
        dim: int | None = None,
        shrinkage: float = 0.0,
        eps: float = 1e-6,
        path: str | None = None,
        fit: str | None = None,
        whitening: Whitening | None = None,
    ) -> None:
        if fit is not None and fit not in self.FIT_CHOICES:
            raise ConfigError(f"whiten: fit={fit!r} is not a choice; fit=database fits PCA on the evaluated "
                              "database (transductive), or leave fit out and give path=FILE")
        if fit is not None and (path or whitening is not None):
            raise ConfigError("whiten: give either path=FILE (a learned whitening) or fit=database, not both")
        self.dim, self.shrinkage, self.eps, self.path, self.fit_on = dim, shrinkage, eps, path, fit
        self._transductive = False
        self.whitening: Whitening | None = None
        self.set_whitening(whitening if whitening is not None else (load_whitening(path) if path else None))

    def set_whitening(self, whitening: Whitening | None) -> None:
        """Use ``whitening`` (truncated to ``dim`` output axes when ``dim`` is set)."""
        if whitening is not None and self.dim is not None:
            whitening = whitening.truncated(self.dim)
        self.whitening, self._transductive = whitening, False

    @property
    def fitted(self) -> bool:
        """Whether a whitening is present (fitted, given or loaded)."""
        return self.whitening is not None

    @property
    def transductive(self) -> bool:
        """Whether the whitening was fitted on the processed database (``fit=database``)."""
        return self._transductive

    def fit(self, database: torch.Tensor, fitted_on: str = "") -> Self:
        """Fit PCA-whitening on ``database`` descriptors, e.g. of a training set (replacing any previous one)."""
        self.whitening = fit_pca_whitening(
            database, dim=self.dim, shrinkage=self.shrinkage, eps=self.eps, fitted_on=fitted_on
        )
        self._transductive = False
        return self

    def check(self) -> None:
        """Raise :class:`ConfigError` when there is no whitening and no leave to fit one on the database."""
        if self.whitening is None and self.fit_on != "database":
            raise ConfigError(
                "the whiten step has no whitening: give whiten:path=FILE (learn one with `dtop whiten`), "
                "use a checkpoint that carries one (`dtop whiten --into-checkpoint`), or write "
                "whiten:fit=database to fit PCA on the evaluated database (transductive: it uses the test "
                "images, so results are not comparable with published ones)"
            )

    def fit_database(self, database: torch.Tensor) -> Self:
        """Fit PCA on the processed database itself (only with ``fit=database``; marked transductive)."""
        self.check()
        self.fit(database, fitted_on="database")
        self._transductive = True
        return self

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.whitening is None:
            self.check()
            raise ConfigError("the whiten step is not fitted: call fit(descriptors) or fit_database(database)")
        return self.whitening.apply(x)

    def apply_database(self, database: torch.Tensor) -> torch.Tensor:
        """Whiten the database."""
        return self._apply(database)

    def apply_queries(self, queries: torch.Tensor, database: torch.Tensor) -> torch.Tensor:
        """Whiten the queries."""
        return self._apply(queries)

    def describe(self) -> dict[str, Any]:
        """Parameters, whether it is transductive, and the whitening's metadata."""
        out: dict[str, Any] = {"name": self.name, "dim": self.dim, "shrinkage": self.shrinkage, "eps": self.eps,
                               "path": self.path, "fit": self.fit_on}
        if self._transductive:
            out["transductive"] = True
        if self.whitening is not None:
            out["whitening"] = self.whitening.metadata()
        return out

    def __repr__(self) -> str:
        args = [f"dim={self.dim}"]
        if self.shrinkage:
            args.append(f"shrinkage={self.shrinkage}")
        if self.path:
            args.append(f"path={self.path!r}")
        if self.fit_on:
            args.append(f"fit={self.fit_on!r}")
        args.append(repr(self.whitening) if self.whitening is not None else "not fitted")
        return f"Whiten({', '.join(args)})"


class DatabaseAugmentation(PostStep):
    """αDBA step (database side only); see :func:`alpha_database_augmentation`."""

    name = "dba"
    params = ("k", "alpha")

    def __init__(
        self, k: int = 10, alpha: float = 3.0, chunk_size: int | None = None,
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
        self, k: int = 10, alpha: float = 3.0, chunk_size: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        _check_k_alpha(k, alpha, "qe")
        self.k, self.alpha, self.chunk_size, self.device = k, float(alpha), chunk_size, device

    def apply_queries(self, queries: torch.Tensor, database: torch.Tensor) -> torch.Tensor:
        """Expand every query with its k - 1 nearest database vectors."""
        return alpha_query_expansion(queries, database, self.k, self.alpha, self.chunk_size, self.device)

    def __repr__(self) -> str:
        return f"QueryExpansion(k={self.k}, alpha={self.alpha})"


class RerankStep(PostStep):
    """A re-ranking step: after the search, reorders the first :attr:`depth` results of each query."""

    @property
    def depth(self) -> int:
        """How many results of each query it reorders (the search must return at least that many)."""
        raise NotImplementedError

    def rerank(
        self, queries: torch.Tensor, database: torch.Tensor, scores: np.ndarray, indices: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Re-ranked ``(scores, indices)`` lists of the processed ``queries`` in the processed ``database``."""
        raise NotImplementedError


class Diffusion(RerankStep):
    """Diffusion on the reciprocal k-NN graph of the database; see :mod:`dtop.retrieval.diffusion`."""

    name = "diffusion"
    params = ("k", "kq", "gamma", "alpha", "trunc", "iterations", "tol", "cache", "ivf", "nprobe")

    def __init__(
        self, k: int = 50, kq: int = 10, gamma: float = 3.0, alpha: float = 0.99, trunc: int = 10000,
        iterations: int = 20, tol: float = 1e-6, cache: str | None = None, ivf: int | None = None,
        nprobe: int = 32, chunk_size: int | None = None, device: str | torch.device | None = None,
    ) -> None:
        check_diffusion_params(k, trunc, kq, gamma, alpha, tol, iterations)
        self.k, self.kq, self.gamma, self.alpha, self.trunc = k, kq, float(gamma), float(alpha), trunc
        self.iterations, self.tol, self.cache, self.ivf, self.nprobe = iterations, float(tol), cache, ivf, nprobe
        self.chunk_size, self.device = chunk_size, device
        self._graph: tuple[Any, KnnGraph] | None = None  # (database, its graph)

    @property
    def depth(self) -> int:
        """The truncation: each query's top ``trunc`` results are diffused and reordered."""
        return self.trunc

    def graph_for(self, database: torch.Tensor) -> KnnGraph:
        """The k-NN graph of ``database`` (built once per database object, or read from ``cache``)."""
        if self._graph is None or self._graph[0] is not database:
            graph = knn_graph_for(database, self.k, self.gamma, cache=self.cache, chunk_size=self.chunk_size,
                                  device=self.device, ivf=self.ivf, nprobe=self.nprobe)
            self._graph = (database, graph)
        return self._graph[1]

    def rerank(
        self, queries: torch.Tensor, database: torch.Tensor, scores: np.ndarray, indices: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Diffuse from each query's ``kq`` best results and reorder its top ``trunc``."""
        return diffusion_rerank(scores, indices, self.graph_for(database), trunc=self.trunc, kq=self.kq,
                                gamma=self.gamma, alpha=self.alpha, tol=self.tol, iterations=self.iterations)

    def __repr__(self) -> str:
        return f"Diffusion(k={self.k}, kq={self.kq}, trunc={self.trunc}, gamma={self.gamma}, alpha={self.alpha})"


class SuperGlobal(RerankStep):
    """SuperGlobal re-ranking of each query's top ``m``; see :mod:`dtop.retrieval.superglobal`."""

    name = "superglobal"
    params = ("m", "k", "kq", "beta")

    def __init__(
        self, m: int = 400, k: int = 9, kq: int = 10, beta: float = 0.15, chunk_size: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        check_superglobal_params(m, k, kq, beta)
        self.m, self.k, self.kq, self.beta = m, k, kq, float(beta)
        self.device = device  # chunk_size is not used: SuperGlobal reads the top results only

    @property
    def depth(self) -> int:
        """Each query's top ``m`` results are reordered."""
        return self.m

    def rerank(
        self, queries: torch.Tensor, database: torch.Tensor, scores: np.ndarray, indices: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Refine the top ``m`` by their neighbourhoods, expand the query, reorder."""
        return superglobal_rerank(queries, database, scores, indices, m=self.m, k=self.k, kq=self.kq,
                                  beta=self.beta, device=self.device)

    def __repr__(self) -> str:
        return f"SuperGlobal(m={self.m}, k={self.k}, kq={self.kq}, beta={self.beta})"


STEPS: dict[str, type[PostStep]] = {
    cls.name: cls for cls in (Whiten, DatabaseAugmentation, QueryExpansion, Diffusion, SuperGlobal)
}


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
    """A sequence of post-processing steps run in the fixed order ``whiten → dba → qe → re-ranking``.

    Typical use::

        pp = PostProcessing.from_config(["whiten", "dba:k=10", {"name": "qe", "k": 10}])
        pp.fit(train_descriptors)            # optional: whitening learned elsewhere
        queries, database = pp.process(queries, database)

    A whitening not fitted when :meth:`process`/:meth:`apply_database` runs is an error unless
    its step says ``fit=database``: then PCA is fitted on the database being processed, which is
    transductive (:attr:`transductive`, and ``transductive: true`` in :meth:`describe`).
    """

    def __init__(self, steps: Sequence[PostStep] = ()) -> None:
        names = [s.name for s in steps]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"post-processing step(s) {dupes} given more than once; each may appear once")
        rerankers = [s.name for s in steps if isinstance(s, RerankStep)]
        if len(rerankers) > 1:
            raise ConfigError(f"post-processing: choose one re-ranking step, not {' and '.join(rerankers)}")
        self.steps: list[PostStep] = sorted(steps, key=lambda s: STEP_ORDER.index(s.name))

    @classmethod
    def from_config(
        cls,
        config: Sequence[StepConfig] | StepConfig | None,
        chunk_size: int | None = None,
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

    @property
    def transductive(self) -> bool:
        """Whether a step learned from the processed database (e.g. ``whiten:fit=database``)."""
        return any(s.transductive for s in self.steps)

    def check(self) -> Self:
        """Raise :class:`ConfigError` if a step cannot run as configured (call it before extracting)."""
        for step in self.steps:
            step.check()
        return self

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
        """Run the database side of every step (unfitted steps: :meth:`PostStep.fit_database`)."""
        x = database
        for step in self.steps:
            if not step.fitted:
                step.fit_database(x)
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

    @property
    def reranker(self) -> RerankStep | None:
        """The re-ranking step, if any (it runs after the search: :meth:`rerank`)."""
        return next((s for s in self.steps if isinstance(s, RerankStep)), None)

    def rerank(
        self, queries: torch.Tensor, database: torch.Tensor, scores: np.ndarray, indices: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Re-rank search results of the processed descriptors (unchanged without a re-ranking step).

        Only the first ``reranker.depth`` results of each list move; search at least that deep.
        """
        step = self.reranker
        return (scores, indices) if step is None else step.rerank(queries, database, scores, indices)

    def search(
        self, queries: torch.Tensor, database: torch.Tensor, topk: int, **search_options: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """Process both sides, search exactly (as deep as the re-ranking needs), re-rank: the top ``topk``.

        ``search_options`` go to :func:`dtop.retrieval.search.search` (chunk_size, device, progress).
        """
        queries, database = self.process(queries, database)
        scores, indices, _ = reranked_search(queries, database, topk, self.reranker, **search_options)
        return scores[:, :topk], indices[:, :topk]

    def describe(self) -> list[dict[str, Any]]:
        """The steps in the order they run, with parameters (for result files)."""
        return [s.describe() for s in self.steps]

    def __repr__(self) -> str:
        return f"PostProcessing([{', '.join(repr(s) for s in self.steps)}])"


__all__ = [
    "PostProcessing", "PostStep", "Whiten", "DatabaseAugmentation", "QueryExpansion", "parse_step",
    "RerankStep", "Diffusion", "SuperGlobal",
    "alpha_query_expansion", "alpha_database_augmentation",
    # whitening, re-exported: the pipeline's first step
    "Whitening", "fit_pca_whitening", "fit_learned_whitening", "save_whitening", "load_whitening",
]
