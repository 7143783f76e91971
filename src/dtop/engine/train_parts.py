"""The pieces a training job is built from: the loss wrapper, parameter groups, the schedule, samplers."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dtop.engine.losses import ContrastiveLoss
from dtop.engine.mining import TupleBatchSampler
from dtop.engine.train_config import TrainConfig
from dtop.errors import ConfigError
from dtop.models.base import RetrievalModel

if TYPE_CHECKING:
    from dtop.data.sampler import FixedSizeBatchSampler, GroupSizeBatchSampler
    from dtop.data.training import TrainingSet

    BatchSampler = GroupSizeBatchSampler | FixedSizeBatchSampler | TupleBatchSampler



class TrainModule(nn.Module):
    """Model + loss in one module, so DDP synchronises the loss's class weights too.

    With ``tuple_size`` the batch is tuples ``(q, p, n1 … nk)`` laid out one after the other and the
    loss is the contrastive tuple loss (labels unused).
    """

    def __init__(self, model: RetrievalModel, loss: nn.Module, tuple_size: int | None = None):
        super().__init__()
        self.model = model
        self.loss = loss
        self.tuple_size = tuple_size

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        descriptors = self.model(images)
        if self.tuple_size is None:
            return self.loss(descriptors, labels)
        if not isinstance(self.loss, ContrastiveLoss):
            raise TypeError(f"batches of tuples need the contrastive loss, not {type(self.loss).__name__}")
        return self.loss.tuple_loss(descriptors, self.tuple_size)


def param_groups(
    model: RetrievalModel, loss: nn.Module, lr: float, backbone_mult: float, weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups: pretrained parts (``model.from_pretrained``) at ``lr × backbone_mult``, the rest at ``lr``.

    Biases, norms, GeM ``p`` and other 1-D parameters get no weight decay.
    """
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        slow = model.from_pretrained(name)  # pretrained parts learn slower; new layers at the full rate
        groups.setdefault((("backbone" if slow else "head"), param.ndim > 1), []).append(param)
    for param in loss.parameters():
        groups.setdefault(("head", True), []).append(param)
    out = []
    for (kind, decay), params in sorted(groups.items()):
        out.append({"params": params, "lr": lr * (backbone_mult if kind == "backbone" else 1.0),
                    "weight_decay": weight_decay if decay else 0.0, "name": f"{kind}{'' if decay else '-no-decay'}"})
    return out


def freeze_cnn(model: RetrievalModel, stride: int) -> list[str]:
    """Fix the weights of ``model``'s CNN up to ``stride`` (``optim.freeze_stride``); their names."""
    from dtop.models.cnn_stem import feature_strides, parameters_to_stride

    if stride <= 0:
        return []
    cnn = model.cnn()
    if cnn is None:
        raise ConfigError(f"optim.freeze_stride={stride} needs a model with a CNN (a hybrid stem or a CNN "
                          f"backbone); {model.config.backbone} has none: set optim.freeze_stride=0")
    frozen = parameters_to_stride(cnn, stride)
    if not frozen:
        strides = [r for r, _ in feature_strides(cnn)]
        raise ConfigError(f"optim.freeze_stride={stride} is below the CNN's first feature stride "
                          f"({min(strides) if strides else 'unknown'}); use 0 or one of {strides}")
    for _, param in frozen:
        param.requires_grad_(False)
    return [name for name, _ in frozen]


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------ data + loss


def build_training_set(config: TrainConfig):
    """The :class:`~dtop.data.training.TrainingSet` of ``config.data``."""
    from dtop.data.training import load_training_set

    d = config.data
    return load_training_set(d.format, d.root, csv_path=d.csv, path_column=d.path_column,
                             label_column=d.label_column, exclude=d.exclude,
                             min_images_per_class=d.min_images_per_class)


def build_loss(config: TrainConfig, embedding_dim: int, num_classes: int) -> nn.Module:
    """The loss module of ``config.loss``."""
    from dtop.engine.losses import build_loss as _build

    c = config.loss
    if c.name == "contrastive":
        return _build("contrastive", margin=c.resolved_margin())
    return _build(c.name, embedding_dim=embedding_dim, num_classes=num_classes, margin=c.resolved_margin(),
                  scale=c.scale, subcenters=c.resolved_subcenters())


def build_sampler(config: TrainConfig, training_set: TrainingSet, rank: int, world: int) -> BatchSampler:
    """The batch sampler: tuples for the contrastive loss, else the one of ``config.data.sampling``."""
    from dtop.data.sampler import FixedSizeBatchSampler, GroupSizeBatchSampler

    if config.loss.name == "contrastive":
        return build_tuple_sampler(config, training_set, rank, world)
    cls = GroupSizeBatchSampler if config.data.sampling == "group-size" else FixedSizeBatchSampler
    return cls(training_set.aspect_ratios(), batch_size=config.optim.batch_size, train_size=config.data.train_size,
               seed=config.run.seed, rank=rank, world_size=world, drop_last=True)


def build_tuple_sampler(config: TrainConfig, training_set: TrainingSet, rank: int, world: int) -> TupleBatchSampler:
    """The :class:`~dtop.engine.mining.TupleBatchSampler` of the contrastive protocol."""
    from dtop.engine.mining import TupleSampler, training_pairs

    qidxs, pidxs = training_pairs(training_set)
    c = config.loss
    tuples = TupleSampler(qidxs, pidxs, training_set.labels, num_queries=c.num_queries, pool_size=c.pool_size,
                          num_negatives=c.num_negatives, seed=config.run.seed, rank=rank, world_size=world)
    sampler = TupleBatchSampler(tuples, config.optim.batch_size, training_set.image_sizes(),
                                config.data.train_size)
    if len(sampler) == 0:
        raise ConfigError(
            f"{tuples.num_queries} tuples per epoch over {world} rank(s) do not fill one batch of "
            f"optim.batch_size={config.optim.batch_size} tuples; lower optim.batch_size or raise loss.num_queries"
        )
    return sampler


# ---------------------------------------------------------------------------------------- trainer
