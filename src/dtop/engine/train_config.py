"""The typed configuration of a training run (``configs/train/*.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dtop.config import AMP_CHOICES, from_dict, load_config
from dtop.data.formats import TRAINING_FORMATS
from dtop.errors import ConfigError
from dtop.models.config import ModelConfig

LOSSES = ("arcface", "subcenter-arcface", "contrastive")


@dataclass
class DataConfig:
    """Where the training images are and how batches are formed."""

    #: sfm120k | gldv2-clean | gldv1 | folder (a folder per class) | csv (path,label)
    format: str = "folder"
    root: str = ""
    #: CSV file for format csv (paths relative to it), with these columns.
    csv: str | None = None
    path_column: str = "path"
    label_column: str = "label"
    #: A file of landmark ids to leave out (GLDv2-clean without the ROxf/RPar overlap).
    exclude: str | None = None
    min_images_per_class: int = 1
    #: Longer side of training images (group-size sampling: one common size per batch).
    train_size: int = 512
    #: group-size (aspect-ratio buckets) | square (fixed square resize, the baseline)
    sampling: str = "group-size"
    augment: bool = True
    num_workers: int = 4

    def __post_init__(self) -> None:
        if self.format not in TRAINING_FORMATS:
            raise ConfigError(f"data.format must be one of {', '.join(TRAINING_FORMATS)}, got {self.format!r}")
        if self.sampling not in ("group-size", "square"):
            raise ConfigError(f"data.sampling must be group-size or square, got {self.sampling!r}")
        if self.train_size < 16 or self.train_size % 16:
            raise ConfigError(f"data.train_size must be a multiple of 16, got {self.train_size}")


@dataclass
class LossConfig:
    """The training loss.

    ``arcface`` / ``subcenter-arcface`` train on class labels with ``optim.batch_size`` images per
    batch. ``contrastive`` runs the cirtorch tuple protocol (SPEC §4): each epoch ``num_queries``
    (query, positive) pairs and a pool of ``pool_size`` images are drawn, ``num_negatives`` hard
    negatives per query are mined with the current model, and a batch is ``optim.batch_size``
    *tuples* of ``2 + num_negatives`` images. Pairs come from the SfM-120k file, or from the class
    labels of other training sets (each image with the next image of its class).
    """

    #: arcface | subcenter-arcface | contrastive (the SfM-120k tuple protocol)
    name: str = "arcface"
    #: ArcFace angular margin (default 0.3) or contrastive margin (default 0.7, cirtorch).
    margin: float | None = None
    #: ArcFace logit scale.
    scale: float = 30.0
    subcenters: int = 1
    #: contrastive: (query, positive) pairs drawn per epoch (null: all), pool size, negatives per query.
    num_queries: int | None = 2000
    pool_size: int = 20000
    num_negatives: int = 5
    #: contrastive: images per batch when describing queries and pool for mining.
    mining_batch_size: int = 32

    def __post_init__(self) -> None:
        if self.name not in LOSSES:
            raise ConfigError(f"loss.name must be one of {', '.join(LOSSES)}, got {self.name!r}")
        for name in ("pool_size", "num_negatives", "mining_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"loss.{name} must be at least 1, got {getattr(self, name)}")
        if self.num_queries is not None and self.num_queries < 1:
            raise ConfigError(f"loss.num_queries must be at least 1 (or null for all), got {self.num_queries}")

    def resolved_margin(self) -> float:
        """The margin: the configured one, else 0.7 for contrastive and 0.3 for ArcFace."""
        if self.margin is not None:
            return float(self.margin)
        return 0.7 if self.name == "contrastive" else 0.3


@dataclass
class OptimConfig:
    """AdamW, warm-up + cosine, clipping, AMP."""

    epochs: int = 10
    #: Images per process per step (before accumulation).
    batch_size: int = 32
    #: Micro-batches accumulated per optimiser step.
    accum_steps: int = 1
    #: Learning rate of the head (and loss weights, locality modules).
    lr: float = 1e-4
    #: Backbone learning rate = lr × this (the pretrained parts learn slower).
    backbone_lr_mult: float = 0.1
    weight_decay: float = 0.05
    warmup_steps: int = 500
    #: Cosine decays to lr × this.
    min_lr_ratio: float = 0.01
    #: Max gradient norm (0 = no clipping).
    grad_clip: float = 1.0
    amp: str = "auto"
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.amp not in AMP_CHOICES:
            raise ConfigError(f"optim.amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        for name in ("epochs", "batch_size", "accum_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"optim.{name} must be at least 1")


@dataclass
class ValConfig:
    """Periodic revisited evaluation during training; the best checkpoint is kept."""

    #: roxford5k | rparis6k | a revisited-format folder | null (no validation)
    dataset: str | None = None
    data_root: str = "."
    every_epochs: int = 1
    image_size: int = 1024
    scales: list[float] = field(default_factory=lambda: [1.0])
    batch_size: int = 8


@dataclass
class RunConfig:
    """Output, logging, checkpointing and stopping."""

    out: str = "runs/train/default"
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    #: Save a resumable checkpoint every this many optimiser steps (and at every epoch end).
    save_every: int = 500
    #: Stop after this many optimiser steps (null = all epochs).
    max_steps: int | None = None
    #: Stop (after saving) when this much wall time has passed.
    max_minutes: float | None = None
    tensorboard: bool = False
    progress: bool = True


@dataclass
class TrainConfig:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    val: ValConfig = field(default_factory=ValConfig)
    run: RunConfig = field(default_factory=RunConfig)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "loss": LossConfig, "optim": OptimConfig,
            "val": ValConfig, "run": RunConfig}


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from a mapping with the sections model, data, loss, optim, val, run."""
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown config section {unknown[0]!r}; sections: {', '.join(SECTIONS)}")
    return TrainConfig(**{name: from_dict(cls, data.get(name), where=name) for name, cls in SECTIONS.items()})


def load_train_config(path: str, overrides: list[str] = ()) -> TrainConfig:
    """Load a training config file with ``_base_`` composition and ``section.key=value`` overrides."""
    return train_config_from_dict(load_config(path, overrides))
