"""DToP: deep token pooling over a (hybrid) vision transformer."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from dtop.errors import ConfigError
from dtop.models.backbone import (
    create_vit,
    from_pretrained,
    load_pretrained,
    pad_to_multiple,
    resolve_layers,
    resolve_normalisation,
    vit_stride,
)
from dtop.models.base import RetrievalModel
from dtop.models.config import ModelConfig
from dtop.models.layers import GeM, LayerNorm2d, SpatialAttention, l2n
from dtop.models.locality import apply_locality, is_locality_param

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

STEM_PREFIXES = ("patch_embed", "cls_token", "reg_token", "pos_embed", "norm_pre")


class GlobalBranch(nn.Module):
    """Concatenated [CLS] tokens of the tapped blocks → LayerNorm → Linear."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc = nn.Linear(in_dim, out_dim)

    def forward(self, cls_tokens: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fc(self.norm(cls_tokens))


class LocalBranch(nn.Module):
    """Concatenated patch-token maps → 1x1 conv + LayerNorm + ReLU → spatial attention → GeM → Linear.

    The ReLU makes the map non-negative, as GeM requires; the attention weights are non-negative
    (softplus), so the weighted map stays non-negative.
    """

    def __init__(self, in_dim: int, channels: int, out_dim: int, gem_p: float, gem_p_trainable: bool):
        super().__init__()
        self.reduce = nn.Conv2d(in_dim, channels, kernel_size=1)
        self.norm = LayerNorm2d(channels)
        self.act = nn.ReLU()
        self.attention = SpatialAttention(channels)
        self.pool = GeM(gem_p, trainable=gem_p_trainable)
        self.fc = nn.Linear(channels, out_dim)

    def forward(self, maps: torch.Tensor, return_attention: bool = False):  # noqa: D102
        x = self.act(self.norm(self.reduce(maps)))
        weights = self.attention(x)
        pooled = self.fc(self.pool(x * weights))
        return (pooled, weights) if return_attention else pooled


class Fusion(nn.Module):
    """Fuse global ``g`` and local ``l``: ``concat`` → Linear([g; l]); ``orthogonal`` → Linear([g; l⊥g]).

    With ``branches`` = ``global`` or ``local`` (ablations) only that vector goes into the Linear.
    """

    def __init__(self, global_dim: int, local_dim: int, out_dim: int, mode: str, branches: str = "both"):
        super().__init__()
        self.mode, self.branches = mode, branches
        width = {"both": global_dim + local_dim, "global": global_dim, "local": local_dim}[branches]
        self.fc = nn.Linear(width, out_dim)

    def forward(self, g: torch.Tensor | None, l: torch.Tensor | None) -> torch.Tensor:  # noqa: D102, E741
        if self.branches == "global" and g is not None:
            return self.fc(g)
        if self.branches == "local" and l is not None:
            return self.fc(l)
        if g is None or l is None:
            raise ValueError(f"fusion of branches {self.branches!r} got global={g is not None}, local={l is not None}")
        if self.mode == "orthogonal":
            g_sq = (g * g).sum(-1, keepdim=True).clamp(min=1e-6)
            l = l - (l * g).sum(-1, keepdim=True) / g_sq * g  # noqa: E741
        return self.fc(torch.cat([g, l], dim=-1))

    def extra_repr(self) -> str:  # noqa: D102
        return f"mode={self.mode}, branches={self.branches}"


class DToP(RetrievalModel):
    """DToP: multi-layer [CLS] (global) + multi-layer patch tokens (local) of a ViT, fused, L2-normalised.

    ``forward(images)`` takes normalised images (B, 3, H, W) of any size (padded to a multiple of the
    token stride) and returns descriptors (B, ``config.dim``).
    """

    backbone: VisionTransformer

    def __init__(self, config: ModelConfig):
        if config.dim is None:
            raise ConfigError("model.dim must be set for arch 'dtop' (the fused descriptor size)")
        vit = create_vit(config)
        load_pretrained(vit, config)
        mean, std = resolve_normalisation(vit, config)
        super().__init__(config, mean, std)
        self.taps = resolve_layers(config.layers, len(vit.blocks))
        apply_locality(vit, config.locality, config.locality_blocks, config.locality_radius)
        # Parts the descriptor never sees (the final norm: taps are taken before it; blocks after
        # the last tap) stay in the state dict, so timm weights load strictly, but are frozen.
        for module in (vit.norm, getattr(vit, "fc_norm", None), *list(vit.blocks)[self.taps[-1] + 1:]):
            if module is not None:
                module.requires_grad_(False)
        self.backbone = vit
        width = vit.embed_dim * len(self.taps)
        # An ablation without one branch does not build it (every parameter then gets a gradient).
        self.global_branch = GlobalBranch(width, config.global_dim) if config.branches != "local" else None
        self.local_branch = None
        if config.branches != "global":
            self.local_branch = LocalBranch(
                width, config.local_channels, config.local_dim, config.gem_p, config.gem_p_trainable
            )
        self.fusion = Fusion(config.global_dim, config.local_dim, config.dim, config.fusion, config.branches)

    @property
    def stride(self) -> int:  # noqa: D102
        return vit_stride(self.backbone)

    @property
    def descriptor_dim(self) -> int:  # noqa: D102
        return self.fusion.fc.out_features

    def part_of(self, name: str) -> str:  # noqa: D102
        if not name.startswith("backbone."):
            return "head"
        name = name[len("backbone."):]
        if is_locality_param(name):
            return "locality"
        return "stem" if name.startswith(STEM_PREFIXES) else "encoder"

    def from_pretrained(self, name: str) -> bool:  # noqa: D102
        return name.startswith("backbone.") and from_pretrained(self.config, name[len("backbone."):])

    def forward_taps(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The tapped blocks' [CLS] tokens (B, D) and patch-token maps (B, D, h, w), in block order."""
        x = pad_to_multiple(images, self.stride)
        # intermediates only, with prefix tokens: one (patch map, prefix tokens) pair per tapped block
        taps = cast(list[tuple[torch.Tensor, torch.Tensor]], self.backbone.forward_intermediates(
            x,
            indices=self.taps,
            return_prefix_tokens=True,
            norm=False,
            stop_early=True,
            output_fmt="NCHW",
            intermediates_only=True,
        ))
        maps = [spatial for spatial, _ in taps]
        cls_tokens = [prefix[:, 0] for _, prefix in taps]
        return cls_tokens, maps

    def forward_parts(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Descriptor plus its parts: ``global``, ``local``, ``attention`` (B, 1, h, w), ``descriptor``.

        Parts of a branch the config leaves out are None.
        """
        descriptor, parts = self._describe(images)
        return {**parts, "descriptor": descriptor}

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self._describe(images)[0]

    def _describe(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        """The descriptor, and the parts ``global``, ``local``, ``attention`` it is made of."""
        cls_tokens, maps = self.forward_taps(images)
        g = self.global_branch(torch.cat(cls_tokens, dim=-1)) if self.global_branch is not None else None
        l, attention = None, None  # noqa: E741
        if self.local_branch is not None:
            l, attention = self.local_branch(torch.cat(maps, dim=1), return_attention=True)  # noqa: E741
        return l2n(self.fusion(g, l)), {"global": g, "local": l, "attention": attention}

    def extra_repr(self) -> str:  # noqa: D102
        c = self.config
        return (
            f"backbone={c.backbone}, taps={self.taps}, dim={c.dim}, branches={c.branches}, fusion={c.fusion}, "
            f"locality={c.locality}x{c.locality_blocks if c.locality != 'none' else 0}"
        )
