"""Training losses: (sub-center) ArcFace on class labels and the cirtorch contrastive loss.

The math lives in plain functions, the modules hold parameters and settings; :func:`build_loss`
builds one by name. Definitions, variants and numerics: docs/engine.md.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from dtop.errors import ConfigError, DataError

LossName = Literal["arcface", "subcenter-arcface", "contrastive"]
DEFAULT_SUBCENTERS = 3  # Sub-center ArcFace paper's choice, used by build_loss("subcenter-arcface")
SIN_EPS = 1e-12  # floor of 1 - cos² under the square root


# ------------------------------------------------------------------------------------- checks


def _check_arcface_args(margin: float, scale: float, subcenters: int) -> None:
    if not (0.0 <= float(margin) < math.pi / 2):
        raise ConfigError(f"the ArcFace margin must be in [0, π/2) radians (typically 0.1-0.5), got {margin}")
    if not float(scale) > 0:
        raise ConfigError(f"the ArcFace scale must be positive (typically 30-64), got {scale}")
    if int(subcenters) != subcenters or int(subcenters) < 1:
        raise ConfigError(f"subcenters must be a positive integer, got {subcenters}")


def _check_labels(labels: torch.Tensor, batch: int, num_classes: int) -> torch.Tensor:
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise DataError(f"labels must have shape ({batch},) to match the embeddings, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DataError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if batch:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(
                f"labels must be class indices in [0, {num_classes - 1}], got values in [{lo}, {hi}]; "
                "the loss was built for fewer classes than the training set has"
            )
    return labels.long()


# -------------------------------------------------------------------------------------- ArcFace


def cosine_logits(
    embeddings: torch.Tensor, weight: torch.Tensor, subcenters: int = 1, active: torch.Tensor | None = None
) -> torch.Tensor:
    """Cosines ``(B, C)`` between L2-normalised embeddings ``(B, d)`` and class centres ``(C·K, d)``.

    With ``subcenters = K > 1`` the cosine of a class is the maximum over its K sub-centres (rows
    ``j·K … j·K + K − 1`` of ``weight``); ``active`` (C·K bool) leaves the others out of the maximum
    (after cleaning: each class's dominant sub-centre only). Computed in float32 with autocast
    disabled; clamped to [-1, 1].
    """
    if embeddings.dim() != 2 or weight.dim() != 2 or embeddings.shape[1] != weight.shape[1]:
        raise DataError(
            f"embeddings (B, d) and class weights (C·K, d) must agree in d; got {tuple(embeddings.shape)} "
            f"and {tuple(weight.shape)}"
        )
    k = int(subcenters)
    if weight.shape[0] % k:
        raise DataError(f"the class weights have {weight.shape[0]} rows, not a multiple of subcenters={k}")
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        x = F.normalize(embeddings.float(), dim=1)
        w = F.normalize(weight.float(), dim=1)
        cos = x @ w.T
        if k > 1:
            cos = cos.view(cos.shape[0], -1, k)
            if active is not None:  # below any cosine: an inactive sub-centre is never the maximum
                cos = cos.masked_fill(~active.view(1, -1, k).to(cos.device), -2.0)
            cos = cos.amax(dim=2)
        return cos.clamp(-1.0, 1.0)


def arcface_margin(cos: torch.Tensor, margin: float) -> torch.Tensor:
    """``cos(θ + m)`` from ``cos θ`` (threshold variant: ``cos θ − m·sin m`` where θ + m ≥ π)."""
    m = float(margin)
    sin = (1.0 - cos * cos).clamp(min=SIN_EPS).sqrt()
    phi = cos * math.cos(m) - sin * math.sin(m)
    threshold = math.cos(math.pi - m)
    return torch.where(cos > threshold, phi, cos - m * math.sin(m))


def arcface_logits(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    margin: float,
    scale: float,
    subcenters: int = 1,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """ArcFace logits ``(B, C)``, float32: ``s·cos θ_j``, and ``s·cos(θ_y + m)`` at each label ``y``.

    ``embeddings`` (B, d) and ``weight`` (C·K, d) need not be normalised (they are normalised here).
    ``labels`` (B,) are class indices in [0, C); ``None`` gives the plain scaled cosines (no margin,
    e.g. for accuracy). ``subcenters`` K > 1: sub-center ArcFace (max over each class's K rows, the
    ``active`` ones if given). See docs/engine.md for the θ + m > π rule and numerics.
    """
    _check_arcface_args(margin, scale, subcenters)
    cos = cosine_logits(embeddings, weight, subcenters, active)
    if labels is None:
        return cos * float(scale)
    labels = _check_labels(labels.to(cos.device), cos.shape[0], cos.shape[1])
    with torch.autocast(device_type=cos.device.type, enabled=False):
        target = cos.gather(1, labels[:, None])
        logits = cos.scatter(1, labels[:, None], arcface_margin(target, margin))
        return logits * float(scale)


class ArcFaceLoss(nn.Module):
    """(Sub-center) ArcFace: cross-entropy of :func:`arcface_logits`, mean over the batch.

    Holds the class-centre weights ``(num_classes · subcenters, embedding_dim)`` (Xavier-uniform
    init). ``forward(embeddings (B, d), labels (B,))`` → scalar float32 loss; safe under bf16/fp16
    autocast (logits in float32).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        margin: float = 0.3,
        scale: float = 30.0,
        subcenters: int = 1,
    ) -> None:
        super().__init__()
        _check_arcface_args(margin, scale, subcenters)
        if int(embedding_dim) < 1 or int(num_classes) < 1:
            raise ConfigError(
                f"ArcFace needs embedding_dim ≥ 1 and num_classes ≥ 1, got {embedding_dim} and {num_classes}"
            )
        self.embedding_dim = int(embedding_dim)
        self.num_classes = int(num_classes)
        self.margin = float(margin)
        self.scale = float(scale)
        self.subcenters = int(subcenters)
        self.weight = nn.Parameter(torch.empty(self.num_classes * self.subcenters, self.embedding_dim))
        # (C·K,) bool after :meth:`keep_subcenters`; not in the state dict (the trainer's state holds
        # the cleaning and sets it again on resume)
        self.active: torch.Tensor | None
        self.register_buffer("active", None, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform initialisation of the class centres."""
        nn.init.xavier_uniform_(self.weight)

    def keep_subcenters(self, keep: torch.Tensor | None) -> None:
        """Use only sub-centre ``keep[j]`` of each class ``j`` from now on (``None``: all of them again).

        Sub-center ArcFace's cleaning keeps each class's dominant sub-centre; the others get no
        logit and no gradient (the weight keeps its shape, so optimiser states stay valid).
        """
        if keep is None:
            self.active = None
            return
        keep = torch.as_tensor(keep, dtype=torch.int64).reshape(-1)
        if keep.numel() != self.num_classes or bool((keep < 0).any() | (keep >= self.subcenters).any()):
            raise DataError(f"keep_subcenters needs one sub-centre in 0..{self.subcenters - 1} for each of the "
                            f"{self.num_classes} classes, got {keep.numel()} values")
        active = F.one_hot(keep, self.subcenters).bool().reshape(-1)
        self.active = active.to(self.weight.device)

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Margin logits ``(B, C)`` (plain scaled cosines when ``labels`` is None)."""
        return arcface_logits(embeddings, self.weight, labels, self.margin, self.scale, self.subcenters, self.active)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # noqa: D102
        logits = self.logits(embeddings, labels)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return F.cross_entropy(logits, labels.to(logits.device).long())

    def extra_repr(self) -> str:  # noqa: D102
        kept = " (dominant only)" if self.active is not None else ""
        return (
            f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, subcenters={self.subcenters}{kept}, "
            f"margin={self.margin}, scale={self.scale}, variant=threshold"
        )


# ---------------------------------------------------------------------------------- contrastive


def contrastive_loss(
    anchors: torch.Tensor,
    others: torch.Tensor,
    targets: torch.Tensor,
    margin: float = 0.7,
    eps: float = 1e-6,
    reduction: str = "sum",
) -> torch.Tensor:
    """cirtorch contrastive loss of pairs ``(anchors[i], others[i])``, both (N, d).

    ``targets`` (N,): 1 for a positive pair (loss ``0.5·d²``), 0 for a negative pair (loss
    ``0.5·max(0, margin − d)²``); ``d = ||â − ô + eps||`` of the L2-normalised vectors. ``reduction``
    ``"sum"`` (cirtorch), ``"mean"`` or ``"none"``. Computed in float32 (autocast disabled).
    """
    if reduction not in ("sum", "mean", "none"):
        raise ConfigError(f"reduction must be sum, mean or none, got {reduction!r}")
    if anchors.dim() != 2 or anchors.shape != others.shape:
        raise DataError(f"anchors and others must both be (N, d); got {tuple(anchors.shape)} and {tuple(others.shape)}")
    if targets.shape != (anchors.shape[0],):
        raise DataError(f"targets must have shape ({anchors.shape[0]},), got {tuple(targets.shape)}")
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        a = F.normalize(anchors.float(), dim=1)
        o = F.normalize(others.float(), dim=1)
        y = targets.to(device=a.device, dtype=torch.float32)
        d = (a - o + eps).pow(2).sum(dim=1).sqrt()
        loss = 0.5 * y * d.pow(2) + 0.5 * (1.0 - y) * (float(margin) - d).clamp(min=0).pow(2)
        if reduction == "sum":
            return loss.sum()
        if reduction == "mean":
            return loss.mean()
        return loss


def tuple_pairs(descriptors: torch.Tensor, tuple_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs of a batch of tuples: ``(anchors, others, targets)`` for :func:`contrastive_loss`.

    ``descriptors`` (T·S, d) hold T tuples of S = ``tuple_size`` images one after the other, each
    ``(q, p, n1 … n_{S−2})``. Returns the T·(S−1) pairs ``(q, p)`` (target 1), ``(q, n_i)`` (target 0),
    tuple by tuple.
    """
    s = int(tuple_size)
    if s < 2 or descriptors.dim() != 2 or descriptors.shape[0] % s:
        raise DataError(
            f"descriptors {tuple(descriptors.shape)} do not hold whole tuples of size {tuple_size} (query, "
            "positive, negatives)"
        )
    x = descriptors.view(-1, s, descriptors.shape[1])
    anchors = x[:, :1].expand(-1, s - 1, -1).reshape(-1, descriptors.shape[1])
    others = x[:, 1:].reshape(-1, descriptors.shape[1])
    targets = torch.zeros(x.shape[0], s - 1, device=descriptors.device)
    targets[:, 0] = 1.0
    return anchors, others, targets.view(-1)


class ContrastiveLoss(nn.Module):
    """The cirtorch contrastive loss (:func:`contrastive_loss`) as a module.

    ``forward(anchors, others, targets)`` on explicit pairs; :meth:`tuple_loss` on a batch of tuples.
    """

    def __init__(self, margin: float = 0.7, eps: float = 1e-6, reduction: str = "sum") -> None:
        super().__init__()
        if not float(margin) > 0:
            raise ConfigError(f"the contrastive margin must be positive (cirtorch default 0.7), got {margin}")
        if reduction not in ("sum", "mean", "none"):
            raise ConfigError(f"reduction must be sum, mean or none, got {reduction!r}")
        self.margin = float(margin)
        self.eps = float(eps)
        self.reduction = reduction

    def forward(self, anchors: torch.Tensor, others: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return contrastive_loss(anchors, others, targets, self.margin, self.eps, self.reduction)

    def tuple_loss(self, descriptors: torch.Tensor, tuple_size: int) -> torch.Tensor:
        """Loss of a batch of tuples laid out as in :func:`tuple_pairs`."""
        return self(*tuple_pairs(descriptors, tuple_size))

    def extra_repr(self) -> str:  # noqa: D102
        return f"margin={self.margin}, eps={self.eps}, reduction={self.reduction}"


# -------------------------------------------------------------------------------------- factory


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build a loss by name: ``arcface`` | ``subcenter-arcface`` | ``contrastive``.

    - ``arcface``: :class:`ArcFaceLoss` (``embedding_dim``, ``num_classes`` required; ``margin`` 0.3,
      ``scale`` 30; ``subcenters`` must be 1 if given).
    - ``subcenter-arcface``: :class:`ArcFaceLoss` with ``subcenters`` (default 3).
    - ``contrastive``: :class:`ContrastiveLoss` (``margin`` 0.7, ``eps``, ``reduction``);
      ``embedding_dim``/``num_classes``/``scale``/``subcenters`` are accepted and ignored so that one
      call site can build any loss.
    """
    if name not in get_args(LossName):
        raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(get_args(LossName))}")
    if name == "contrastive":
        allowed = {"margin", "eps", "reduction"}
        ignored = {"embedding_dim", "num_classes", "scale", "subcenters"}
        _reject_unknown(name, kwargs, allowed | ignored)
        return ContrastiveLoss(**{k: v for k, v in kwargs.items() if k in allowed})
    _reject_unknown(name, kwargs, {"embedding_dim", "num_classes", "margin", "scale", "subcenters"})
    missing = [k for k in ("embedding_dim", "num_classes") if k not in kwargs]
    if missing:
        raise ConfigError(f"loss {name!r} needs {' and '.join(missing)}")
    if name == "arcface":
        if kwargs.get("subcenters", 1) != 1:
            raise ConfigError(
                f"loss 'arcface' has one centre per class (got subcenters={kwargs['subcenters']}); "
                "use 'subcenter-arcface' for several"
            )
        kwargs["subcenters"] = 1
    else:
        kwargs.setdefault("subcenters", DEFAULT_SUBCENTERS)
    return ArcFaceLoss(**kwargs)


def _reject_unknown(name: str, kwargs: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError(
            f"loss {name!r} takes no option(s) {', '.join(unknown)}; it takes {', '.join(sorted(allowed))}"
        )
