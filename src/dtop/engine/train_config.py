"""The typed configuration of a training run (``configs/train/*.yaml``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from dtop.config import (
    AtMost,
    NonNegative,
    NonNegativeFloat,
    NonNegativeInt,
    Positive,
    PositiveFloat,
    PositiveInt,
    check_fields,
    from_dict,
    load_config,
)
from dtop.data.formats import TrainingFormat
from dtop.engine.losses import DEFAULT_SUBCENTERS, LossName
from dtop.engine.settings import Amp, ImageSize
from dtop.errors import ConfigError
from dtop.models.config import ModelConfig

#: How training images are resized into batches: aspect-ratio buckets, or a fixed square (baseline).
Sampling = Literal["group-size", "square"]
#: A learning rate: AdamW diverges long before 1.
LearningRate = Annotated[float, Positive, AtMost(1.0, why="AdamW diverges far below; typical: 1e-5 to 1e-3")]
#: A fraction of something, 0 to 1.
Fraction = Annotated[float, NonNegative, AtMost(1.0)]
#: The ArcFace logit scale: published settings are 16 to 64; far beyond, the loss saturates in float32.
LogitScale = Annotated[float, Positive, AtMost(256.0, why="published settings are 16 to 64")]
#: An angle in degrees between two directions, in (0, 180).
Degrees = Annotated[float, Positive, AtMost(180.0, exclusive=True, why="an angle in degrees")]
#: The largest margin per loss: ArcFace's is an angle (below pi/2, else even a sample on its centre gets
#: a negative target logit); the contrastive margin is a distance between unit vectors (at most 2).
MAX_MARGIN = {"arcface": math.pi / 2, "subcenter-arcface": math.pi / 2, "contrastive": 2.0}


@dataclass
class DataConfig:
    """Where the training images are and how batches are formed."""

    #: sfm120k | gldv2-clean | gldv1 | folder (a folder per class) | csv (path,label)
    format: TrainingFormat = "folder"
    root: str = ""
    #: CSV file for format csv (paths relative to it), with these columns.
    csv: str | None = None
    path_column: str = "path"
    label_column: str = "label"
    #: A file of landmark ids to leave out (GLDv2-clean without the ROxf/RPar overlap).
    exclude: str | None = None
    min_images_per_class: PositiveInt = 1
    #: Longer side of training images (group-size sampling: one common size per batch).
    train_size: ImageSize = 512
    #: group-size (aspect-ratio buckets) | square (fixed square resize, the baseline)
    sampling: Sampling = "group-size"
    augment: bool = True
    num_workers: NonNegativeInt = 4

    def __post_init__(self) -> None:
        check_fields(self, "data")
        if self.train_size % 16:
            raise ConfigError(f"data.train_size must be a multiple of 16, got {self.train_size}")


@dataclass
class LossConfig:
    """The training loss.

    ``arcface`` / ``subcenter-arcface`` train on class labels with ``optim.batch_size`` images per
    batch. ``contrastive`` runs the cirtorch tuple protocol: each epoch ``num_queries``
    (query, positive) pairs and a pool of ``pool_size`` images are drawn, ``num_negatives`` hard
    negatives per query are mined with the current model, and a batch is ``optim.batch_size``
    *tuples* of ``2 + num_negatives`` images. Pairs come from the SfM-120k file, or from the class
    labels of other training sets (each image with the next image of its class).
    """

    #: arcface | subcenter-arcface | contrastive (the SfM-120k tuple protocol)
    name: LossName = "arcface"
    #: ArcFace angular margin (default 0.3) or contrastive margin (default 0.7, cirtorch).
    margin: NonNegativeFloat | None = None
    #: ArcFace logit scale.
    scale: LogitScale = 30.0
    #: Centres per class of sub-center ArcFace (default 3); plain ArcFace has one.
    subcenters: PositiveInt | None = None
    #: subcenter-arcface: at the end of this epoch, keep each class's dominant sub-centre and drop the
    #: training images farther than clean_angle from it, then train on (Sub-center ArcFace's
    #: cleaning; null: never). The dropped images are listed in the run folder.
    clean_after_epoch: PositiveInt | None = None
    #: Largest angle (degrees) between an image and its class's dominant sub-centre that is kept.
    clean_angle: Degrees = 75.0
    #: contrastive: (query, positive) pairs drawn per epoch (null: all), pool size, negatives per query.
    num_queries: PositiveInt | None = 2000
    pool_size: PositiveInt = 20000
    num_negatives: PositiveInt = 5
    #: contrastive: images per batch when describing queries and pool for mining.
    mining_batch_size: PositiveInt = 32

    def __post_init__(self) -> None:
        check_fields(self, "loss")
        limit = MAX_MARGIN.get(self.name)
        if limit is not None and self.margin is not None and self.margin >= limit:
            raise ConfigError(f"loss.margin={self.margin:g} is out of range for loss {self.name!r}: it must be below "
                              f"{limit:.4g} (typical: 0.3 for ArcFace, 0.7 for contrastive; null picks these)")
        if self.name == "arcface" and self.subcenters not in (None, 1):
            raise ConfigError(
                f"loss 'arcface' has one centre per class (got loss.subcenters={self.subcenters}); "
                "use loss.name=subcenter-arcface for several"
            )
        if self.clean_after_epoch is not None and (self.name != "subcenter-arcface" or self.resolved_subcenters() < 2):
            raise ConfigError(
                "loss.clean_after_epoch drops the images far from their class's dominant sub-centre: it needs "
                f"loss.name=subcenter-arcface with loss.subcenters >= 2 (got {self.name} with "
                f"{self.resolved_subcenters()}); or set loss.clean_after_epoch=null"
            )

    def resolved_margin(self) -> float:
        """The margin: the configured one, else 0.7 for contrastive and 0.3 for ArcFace."""
        if self.margin is not None:
            return float(self.margin)
        return 0.7 if self.name == "contrastive" else 0.3

    def resolved_subcenters(self) -> int:
        """Centres per class: the configured number, else 3 for sub-center ArcFace and 1 otherwise."""
        return resolved_subcenters(self.name, self.subcenters)


def resolved_subcenters(loss: str, subcenters: int | None) -> int:
    """``loss.subcenters`` of loss ``loss``: as given, else 3 for subcenter-arcface and 1 otherwise."""
    if subcenters is not None:
        return subcenters
    return DEFAULT_SUBCENTERS if loss == "subcenter-arcface" else 1


@dataclass
class OptimConfig:
    """AdamW, warm-up + cosine, clipping, AMP."""

    epochs: PositiveInt = 10
    #: Images per process per step (before accumulation).
    batch_size: PositiveInt = 32
    #: Micro-batches accumulated per optimiser step.
    accum_steps: PositiveInt = 1
    #: Learning rate of the head (and loss weights, locality modules).
    lr: LearningRate = 1e-4
    #: Backbone learning rate = lr × this (the pretrained parts learn slower).
    backbone_lr_mult: NonNegativeFloat = 0.1
    #: The model's CNN (a hybrid's stem or a CNN backbone) keeps its weights up to this stride:
    #: low-level pretrained features stay, and their backward pass is skipped (0: all layers train).
    freeze_stride: NonNegativeInt = 0
    weight_decay: NonNegativeFloat = 0.05
    warmup_steps: NonNegativeInt = 500
    #: Cosine decays to lr × this.
    min_lr_ratio: Fraction = 0.01
    #: Length of the warm-up + cosine schedule in optimiser steps (null: optim.epochs × an epoch's
    #: steps). With run.max_steps equal to it, a short run ends on the decayed rate.
    schedule_steps: PositiveInt | None = None
    #: Max gradient norm (0 = no clipping).
    grad_clip: NonNegativeFloat = 1.0
    #: auto (bf16 on CUDA, off on the CPU) | none | bf16 | fp16 (with a gradient scaler)
    amp: Amp = "auto"
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "optim")


@dataclass
class ValConfig:
    """Periodic revisited evaluation during training; the best checkpoint is kept."""

    #: roxford5k | rparis6k | a revisited-format folder | null (no validation)
    dataset: str | None = None
    data_root: str = "."
    every_epochs: PositiveInt = 1
    image_size: ImageSize = 1024
    scales: list[PositiveFloat] = field(default_factory=lambda: [1.0])
    batch_size: PositiveInt = 8

    def __post_init__(self) -> None:
        check_fields(self, "val")


@dataclass
class RunConfig:
    """Output, logging, checkpointing and stopping."""

    out: str = "runs/train/default"
    seed: int = 0
    device: str = "auto"
    log_every: PositiveInt = 10
    #: Save a resumable checkpoint every this many optimiser steps (and at every epoch end).
    save_every: PositiveInt = 500
    #: Stop after this many optimiser steps (null = all epochs).
    max_steps: PositiveInt | None = None
    #: Stop (after saving) when this much wall time has passed (null = no limit).
    max_minutes: PositiveFloat | None = None
    tensorboard: bool = False
    progress: bool = True
    #: NHWC activations and weights: CNN stems train 1.2-1.5x faster on CPU and CUDA, same math.
    channels_last: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "run")


@dataclass
class TrainConfig:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    val: ValConfig = field(default_factory=ValConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        clean = self.loss.clean_after_epoch
        if clean is not None and clean >= self.optim.epochs:
            raise ConfigError(
                f"loss.clean_after_epoch={clean} leaves no epoch to train on the cleaned set "
                f"(optim.epochs={self.optim.epochs}); clean after an earlier epoch or train longer"
            )


SECTIONS = {"model": ModelConfig, "data": DataConfig, "loss": LossConfig, "optim": OptimConfig,
            "val": ValConfig, "run": RunConfig}


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from a mapping with the sections model, data, loss, optim, val, run."""
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown config section {unknown[0]!r}; sections: {', '.join(SECTIONS)}")
    return TrainConfig(**{name: from_dict(cls, data.get(name), where=name) for name, cls in SECTIONS.items()})


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a training config file with ``_base_`` composition and ``section.key=value`` overrides."""
    return train_config_from_dict(load_config(path, overrides))
