"""The interface every dtop model implements."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from dtop.models.config import ModelConfig

#: The name of the checkpoint extra that holds a fitted whitening (``mean``, ``projection``).
WHITENING_EXTRA = "whitening"


@dataclasses.dataclass
class CheckpointExtra:
    """Named tensors and JSON metadata saved with a model in its checkpoint (e.g. a whitening)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


class RetrievalModel(nn.Module):
    """A global-descriptor model: images (B, 3, H, W), normalised with ``mean``/``std``, in;
    L2-normalised descriptors (B, ``descriptor_dim``) out.

    Subclasses set ``backbone`` and implement :meth:`forward` and :meth:`part_of`.
    """

    config: ModelConfig
    backbone: nn.Module
    #: Extras saved with the model in its checkpoint and loaded back with it, by name
    #: (:data:`WHITENING_EXTRA`); not part of the model's computation or fingerprint.
    checkpoint_extras: dict[str, CheckpointExtra]

    def __init__(self, config: ModelConfig, mean: list[float], std: list[float]):
        super().__init__()
        # The resolved normalisation is part of the configuration saved with the checkpoint.
        self.config = dataclasses.replace(config, mean=list(mean), std=list(std))
        self.checkpoint_extras = {}

    @property
    def mean(self) -> list[float]:
        """Per-channel input mean (RGB, on [0, 1] pixels)."""
        return _resolved(self.config.mean, "mean")

    @property
    def std(self) -> list[float]:
        """Per-channel input standard deviation."""
        return _resolved(self.config.std, "std")

    @property
    def stride(self) -> int:
        """Input sides are padded to a multiple of this (pixels per token side)."""
        return 1

    @property
    def descriptor_dim(self) -> int:
        """Size of the output descriptor."""
        raise NotImplementedError

    def part_of(self, name: str) -> str:
        """Which part a parameter belongs to: ``stem``, ``encoder``, ``locality`` or ``head``."""
        raise NotImplementedError

    def from_pretrained(self, name: str) -> bool:
        """Whether parameter ``name`` starts from the pretrained weights (``config.pretrained``) when set.

        Training runs these at ``optim.backbone_lr_mult`` times the learning rate and everything
        else (new layers, random ViT blocks on a pretrained CNN stem) at the full rate.
        """
        return self.part_of(name) in ("stem", "encoder")

    def cnn(self) -> nn.Module | None:
        """The timm CNN of this model: a hybrid's stem or a CNN backbone; None for a plain ViT."""
        embed = getattr(getattr(self, "backbone", None), "patch_embed", None)
        stem = getattr(embed, "backbone", None)  # timm's HybridEmbed keeps its CNN there
        return stem if isinstance(stem, nn.Module) else None

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by part (for per-part learning rates and ``dtop info``)."""
        groups: dict[str, list[nn.Parameter]] = {"stem": [], "encoder": [], "locality": [], "head": []}
        for name, param in self.named_parameters():
            groups[self.part_of(name)].append(param)
        return groups


def _resolved(values: list[float] | None, name: str) -> list[float]:
    """A copy of a normalisation list that ``RetrievalModel.__init__`` has set."""
    if values is None:
        raise RuntimeError(f"model.config.{name} is unset: a RetrievalModel resolves it when built")
    return list(values)
