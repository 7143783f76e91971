"""Learned whitening of global descriptors: PCA-whitening and supervised ``Lw``, saved as safetensors.

``x -> normalise(P (x - m))``; :func:`fit_pca_whitening` learns it from descriptors,
:func:`fit_learned_whitening` from matching pairs (the math is in docs/retrieval.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import torch
import torch.nn.functional as F

from dtop.errors import CheckpointError, ConfigError, DataError
from dtop.utils.io import atomic_path, read_versioned_json

WHITENING_FORMAT = "dtop-whitening"
WHITENING_FORMAT_VERSION = 1
#: The single safetensors metadata key (one key keeps the file byte-deterministic: safetensors
#: writes several metadata keys in a random order).
WHITENING_METADATA_KEY = "dtop_whitening"
WHITENING_TYPES = ("pca", "lw")
#: Metadata keys that :meth:`Whitening.metadata` derives (not part of :attr:`Whitening.info`).
_DERIVED_KEYS = ("format", "format_version", "input_dim", "output_dim")

APPLY_CHUNK = 65536  # rows per block when whitening
_STATS_CHUNK = 16384  # rows per float64 block when accumulating whitening statistics


def result_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of processed descriptors: float32, but a 16-bit store stays 16-bit (half the memory)."""
    return x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32


def check_descriptor_tensor(x: torch.Tensor, name: str) -> None:
    """Raise :class:`DataError` unless ``x`` is a 2-d tensor ``(n, d)`` of descriptors."""
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"{name} must be a 2-d tensor (n, d) of descriptors, got {shape}")


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
        """Whiten ``x`` (n, d) in row blocks: subtract the mean, project, L2-normalise.

        Computed in float32 block by block; the result is float32, or 16-bit like a 16-bit ``x``.
        """
        check_descriptor_tensor(x, "descriptors")
        if x.shape[1] != self.input_dim:
            raise DataError(
                f"whitening was fitted on {self.input_dim}-d descriptors but got {x.shape[1]}-d ones: "
                "fit it on descriptors of the same model"
            )
        mean = self.mean.to(x.device, torch.float32)
        proj_t = self.projection.to(x.device, torch.float32).T
        out = torch.empty(x.shape[0], self.output_dim, dtype=result_dtype(x), device=x.device)
        for r0 in range(0, x.shape[0], chunk_size):
            y = (x[r0:r0 + chunk_size].to(torch.float32) - mean) @ proj_t
            out[r0:r0 + y.shape[0]] = F.normalize(y, dim=1) if normalize else y
        return out

    def truncated(self, dim: int) -> Whitening:
        """The whitening onto its first ``dim`` output axes (both kinds order them by decreasing variance)."""
        if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= self.output_dim:
            raise ConfigError(f"whitening dim must be an integer in 1..{self.output_dim} (the axes of this "
                              f"{self.kind} whitening), got {dim!r}")
        if dim == self.output_dim:
            return self
        return Whitening(self.mean, self.projection[:dim], self.kind, dict(self.info))

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
        """Rebuild from :meth:`to_state` output (a checkpoint's whitening extra, or a whitening file's).

        The metadata's format keys are checked where it is read (:func:`load_whitening`, the
        checkpoint reader), not here.
        """
        missing = [k for k in ("mean", "projection") if k not in tensors]
        if missing:
            raise CheckpointError(f"whitening state lacks tensor(s) {missing}; it needs 'mean' and 'projection'")
        info = {k: v for k, v in (metadata or {}).items() if k not in _DERIVED_KEYS}
        kind = info.pop("type", "pca")
        return cls(
            mean=tensors["mean"].to(torch.float32), projection=tensors["projection"].to(torch.float32),
            kind=kind, info=info,
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
            "dtop.retrieval.whitening.save_whitening"
        )
    try:
        meta = read_versioned_json(
            path, text=header[WHITENING_METADATA_KEY], fmt=WHITENING_FORMAT, version=WHITENING_FORMAT_VERSION,
            required=(), kind="whitening", damaged="fit and save the whitening again",
            outdated="Fit and save it again with this dtop.",
        )
    except DataError as err:
        raise CheckpointError(str(err)) from err
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
    check_descriptor_tensor(descriptors, "descriptors")
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
    check_descriptor_tensor(descriptors, "descriptors")
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
