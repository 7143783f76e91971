"""Small building blocks of the heads: GeM pooling, spatial attention, L2 normalisation.

The math lives in plain functions (cirtorch style); modules are thin wrappers with a ``repr``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gem(x: torch.Tensor, p: torch.Tensor | float = 3.0, eps: float = 1e-6, dims: tuple[int, ...] = (-2, -1)):
    """Generalised-mean pooling: ``mean(x.clamp(eps) ** p) ** (1/p)`` over ``dims``."""
    return x.clamp(min=eps).pow(p).mean(dim=dims).pow(1.0 / p)


def l2n(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L2-normalise the last dimension."""
    return F.normalize(x, p=2.0, dim=-1, eps=eps)


class GeM(nn.Module):
    """GeM pooling over the spatial dims of (B, C, H, W) maps (or ``dims``), learnable ``p``."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, trainable: bool = True, dims=(-2, -1)):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=trainable)
        self.eps = eps
        self.dims = tuple(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return gem(x, self.p, self.eps, self.dims)

    def extra_repr(self) -> str:  # noqa: D102
        return f"p={self.p.item():.4f}, eps={self.eps}, trainable={self.p.requires_grad}"


class SpatialAttention(nn.Module):
    """A non-negative weight per position (DELG/DOLG style): conv1x1 → ReLU → conv1x1 → softplus."""

    def __init__(self, channels: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or channels
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(hidden, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return weights of shape (B, 1, H, W)."""
        return F.softplus(self.conv2(self.act(self.conv1(x))))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map, per position (batch-independent)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)
