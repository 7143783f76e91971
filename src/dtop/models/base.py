"""The interface every dtop model implements."""

from __future__ import annotations

import dataclasses

from torch import nn

from dtop.models.config import ModelConfig


class RetrievalModel(nn.Module):
    """A global-descriptor model: images (B, 3, H, W), normalised with ``mean``/``std``, in;
    L2-normalised descriptors (B, ``descriptor_dim``) out.

    Subclasses set ``backbone`` and implement :meth:`forward` and :meth:`part_of`.
    """

    config: ModelConfig
    backbone: nn.Module

    def __init__(self, config: ModelConfig, mean: list[float], std: list[float]):
        super().__init__()
        # The resolved normalisation is part of the configuration saved with the checkpoint.
        self.config = dataclasses.replace(config, mean=list(mean), std=list(std))

    @property
    def mean(self) -> list[float]:
        """Per-channel input mean (RGB, on [0, 1] pixels)."""
        return list(self.config.mean)

    @property
    def std(self) -> list[float]:
        """Per-channel input standard deviation."""
        return list(self.config.std)

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

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by part (for per-part learning rates and ``dtop info``)."""
        groups: dict[str, list[nn.Parameter]] = {"stem": [], "encoder": [], "locality": [], "head": []}
        for name, param in self.named_parameters():
            groups[self.part_of(name)].append(param)
        return groups

