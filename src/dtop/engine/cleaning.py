"""Sub-center ArcFace cleaning (Deng et al., ECCV 2020): keep each class's dominant sub-centre, drop far samples.

The math (:func:`dominant_subcenters`, :func:`clean_subcenters`) is plain; :func:`maybe_clean` and
:func:`apply_cleaning` are the trainer's stage (``loss.clean_after_epoch``). Design: docs/engine.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from dtop.engine.losses import ArcFaceLoss
from dtop.errors import ConfigError, DataError, TrainingError
from dtop.utils.io import write_text
from dtop.utils.paths import show_path

if TYPE_CHECKING:
    from dtop.engine.train import Trainer

log = logging.getLogger(__name__)

#: The list of dropped images in the run folder (tab-separated: index, class, angle, path).
DROPPED_FILE = "cleaning_dropped.tsv"


def dominant_subcenters(
    embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, subcenters: int, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dominant (C,), cosines (N, K))``: each class's dominant sub-centre and each sample's cosines to
    the K sub-centres of its own class.

    A sample belongs to the sub-centre of its class it is closest to; the dominant sub-centre of a
    class is the one most of its samples belong to (ties: the lowest index; a class without
    samples: 0). ``weight`` is the loss's ``(C·K, d)`` matrix, class ``j`` in rows ``j·K … j·K+K−1``.
    """
    k = int(subcenters)
    if weight.shape[0] != num_classes * k or embeddings.shape[1] != weight.shape[1]:
        raise DataError(f"sub-centres {tuple(weight.shape)} do not fit {num_classes} classes × {k} of "
                        f"{embeddings.shape[1]}-d embeddings")
    x = F.normalize(embeddings.double(), dim=1)
    w = F.normalize(weight.detach().double().cpu(), dim=1).view(num_classes, k, -1)
    labels = labels.long().cpu()
    cos = torch.einsum("nd,nkd->nk", x.cpu(), w[labels])
    counts = torch.zeros(num_classes, k, dtype=torch.int64)
    counts.index_put_((labels, cos.argmax(dim=1)), torch.ones(len(labels), dtype=torch.int64), accumulate=True)
    return counts.argmax(dim=1), cos  # argmax returns the first maximum: ties go to the lowest index


def clean_subcenters(
    embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, subcenters: int, num_classes: int,
    max_angle: float = 75.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(keep (N,) bool, dominant (C,), angles (N,) degrees)``: samples within ``max_angle`` of their
    class's dominant sub-centre are kept, the others dropped (Sub-center ArcFace's cleaning)."""
    dominant, cos = dominant_subcenters(embeddings, labels, weight, subcenters, num_classes)
    own = cos.gather(1, dominant[labels.long().cpu()].unsqueeze(1)).squeeze(1)
    angles = torch.rad2deg(torch.arccos(own.clamp(-1.0, 1.0))).numpy()
    return angles <= max_angle, dominant.numpy(), angles


@dataclass
class Cleaning:
    """What a cleaning decided: the images kept (indices into the full training set) and the
    dominant sub-centre of each class; ``epoch``/``step``: when it ran; ``stretch``: how the
    learning-rate schedule's remaining part is stretched over the shorter epochs."""

    epoch: int
    step: int
    kept: np.ndarray
    dominant: np.ndarray
    stretch: float = 1.0

    def state(self) -> dict[str, Any]:
        """For ``state.pt`` (tensors and plain values: weights_only-loadable)."""
        return {"epoch": self.epoch, "step": self.step, "stretch": self.stretch,
                "kept": torch.from_numpy(self.kept.astype(np.int64)),
                "dominant": torch.from_numpy(self.dominant.astype(np.int64))}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Cleaning:
        """Rebuild from :meth:`state`."""
        return cls(epoch=int(state["epoch"]), step=int(state["step"]), kept=state["kept"].numpy(),
                   dominant=state["dominant"].numpy(), stretch=float(state["stretch"]))


def _arcface(trainer: Trainer) -> ArcFaceLoss:
    if not isinstance(trainer.loss, ArcFaceLoss) or trainer.loss.subcenters < 2:
        raise ConfigError("the cleaning needs the sub-center ArcFace loss (loss.name=subcenter-arcface)")
    return trainer.loss


def maybe_clean(trainer: Trainer) -> None:
    """At the end of epoch ``loss.clean_after_epoch``: clean the training set and the loss (once)."""
    if trainer.config.loss.clean_after_epoch != trainer.epoch or getattr(trainer, "cleaning", None) is not None:
        return
    c = trainer.config.loss
    full = trainer.training_set
    embeddings = trainer.describe_images(list(range(len(full))))
    keep, dominant, angles = clean_subcenters(embeddings, torch.from_numpy(full.labels), _arcface(trainer).weight,
                                              c.resolved_subcenters(), full.num_classes, c.clean_angle)
    if not keep.any():
        raise TrainingError(f"the cleaning would drop every image (none lies within loss.clean_angle="
                            f"{c.clean_angle:g} degrees of its class's dominant sub-centre); raise loss.clean_angle")
    cleaning = Cleaning(epoch=trainer.epoch, step=trainer.step, kept=np.flatnonzero(keep), dominant=dominant)
    _record(trainer, cleaning, keep, angles)
    apply_cleaning(trainer, cleaning)


def _record(trainer: Trainer, cleaning: Cleaning, keep: np.ndarray, angles: np.ndarray) -> None:
    """Counts in metrics.jsonl and the dropped images in :data:`DROPPED_FILE` (rank 0)."""
    full = trainer.training_set
    dropped = np.flatnonzero(~keep)
    per_class = np.bincount(full.labels[keep], minlength=full.num_classes)
    record = {"event": "cleaning", "step": trainer.step, "epoch": trainer.epoch,
              "clean_angle": trainer.config.loss.clean_angle, "images": len(full), "kept": int(keep.sum()),
              "dropped": int(dropped.size), "classes_emptied": int(((per_class == 0) & (full.images_per_class() > 0))
                                                                   .sum()),
              "median_angle_kept": float(np.median(angles[keep])), "dropped_file": DROPPED_FILE}
    trainer._log(record)
    log.info("cleaning: %d of %d training images dropped (farther than %g degrees from their class's dominant "
             "sub-centre), listed in %s", dropped.size, len(full), trainer.config.loss.clean_angle,
             trainer.out / DROPPED_FILE)
    if trainer.rank == 0:
        lines = ["index\tclass\tangle\tpath"] + [
            f"{i}\t{full.class_names[full.labels[i]]}\t{angles[i]:.2f}\t{show_path(full.paths[i])}" for i in dropped]
        write_text(trainer.out / DROPPED_FILE, "\n".join(lines) + "\n")


def apply_cleaning(trainer: Trainer, cleaning: Cleaning) -> None:
    """Train on the kept images with each class's dominant sub-centre (also on resume, before the state loads).

    The training set, dataset and sampler are rebuilt over the kept images (labels unchanged); the
    loss uses the dominant sub-centres only; the learning-rate schedule keeps its shape, its part
    after the cleaning stretched over the now shorter epochs so that it still ends with the last one.
    """
    from dtop.data.training import TrainDataset
    from dtop.engine.seeding import SeededItems
    from dtop.engine.train import build_sampler

    config = trainer.config
    trainer.training_set = trainer.training_set.subset(cleaning.kept)
    trainer.dataset = SeededItems(TrainDataset(trainer.training_set, augment=config.data.augment,
                                               mean=trainer.model.mean, std=trainer.model.std), config.run.seed)
    before = trainer.steps_per_epoch
    trainer.sampler = build_sampler(config, trainer.training_set, trainer.rank, trainer.world)
    trainer.sampler.set_epoch(cleaning.epoch)
    trainer.steps_per_epoch = max(1, len(trainer.sampler) // config.optim.accum_steps)
    cleaning.stretch = before / trainer.steps_per_epoch
    knee, stretch = cleaning.step, cleaning.stretch
    trainer.scheduler.lr_lambdas = [_stretched(fn, knee, stretch) for fn in trainer.scheduler.lr_lambdas]
    trainer.total_steps = knee + trainer.steps_per_epoch * (config.optim.epochs - cleaning.epoch)
    if config.run.max_steps is not None:
        trainer.total_steps = min(trainer.total_steps, config.run.max_steps)
    _arcface(trainer).keep_subcenters(torch.from_numpy(cleaning.dominant))
    trainer.cleaning = cleaning


def _stretched(fn: Any, knee: int, stretch: float) -> Any:
    """The schedule ``fn`` with the steps after ``knee`` counted ``stretch`` times (a plain function:
    LambdaLR leaves functions out of its state dict)."""
    def schedule(step: int) -> float:
        return fn(step if step <= knee else knee + (step - knee) * stretch)
    return schedule

