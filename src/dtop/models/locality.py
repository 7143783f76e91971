"""Locality enhancement of the deeper encoder blocks: ``conv-ffn`` and ``local-attention``.

Both are inserted into timm's own blocks after the weights are loaded, keep the blocks' parameter
names and start as the identity (docs/models.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from dtop.errors import ConfigError

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

#: Name fragments of the parameters that locality enhancement adds to a timm backbone.
LOCALITY_PARAM_NAMES = ("dwconv", "locality_strength")


def is_locality_param(name: str) -> bool:
    """True for the parameters that locality enhancement adds (not in timm's state dict)."""
    return any(part in name.split(".") for part in LOCALITY_PARAM_NAMES)


class TokenGrid:
    """Holds the (h, w) patch-token grid of the current forward pass of one ViT."""

    def __init__(self, num_prefix_tokens: int):
        self.num_prefix_tokens = num_prefix_tokens
        self.size: tuple[int, int] | None = None

    def hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        """Forward hook for ``patch_embed``: its output is (B, h, w, C) with ``dynamic_img_size``."""
        if output.ndim == 4:
            self.size = (int(output.shape[1]), int(output.shape[2]))
        else:
            grid_size: Any = module.grid_size  # timm's PatchEmbed: (h, w) of its fixed image size
            self.size = (int(grid_size[0]), int(grid_size[1]))

    def get(self) -> tuple[int, int]:
        """The recorded grid; fails if no forward pass has gone through ``patch_embed``."""
        if self.size is None:
            raise RuntimeError("token grid unknown: the backbone's patch_embed has not run")
        return self.size

    def __repr__(self) -> str:
        return f"TokenGrid(prefix={self.num_prefix_tokens}, size={self.size})"


class ConvFFN(nn.Module):
    """timm's ``Mlp`` with a zero-initialised depth-wise 3x3 conv over the patch grid after fc1+act."""

    # taken over from timm's Mlp under its own names (so its weights load into them)
    fc1: nn.Linear
    act: nn.Module
    drop1: nn.Module
    norm: nn.Module
    fc2: nn.Module
    drop2: nn.Module

    def __init__(self, mlp: nn.Module, grid: TokenGrid):
        super().__init__()
        for name in ("fc1", "act", "drop1", "norm", "fc2", "drop2"):
            if not hasattr(mlp, name):
                raise ConfigError(
                    f"locality 'conv-ffn' needs timm's Mlp (fc1/act/fc2), found {type(mlp).__name__}; "
                    "use locality 'local-attention' or 'none' for this backbone"
                )
            setattr(self, name, getattr(mlp, name))
        if not isinstance(self.fc1, nn.Linear):
            raise ConfigError(f"locality 'conv-ffn' needs a Linear fc1, found {type(self.fc1).__name__}")
        hidden = self.fc1.out_features
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        for param in self.dwconv.parameters():  # weight and bias
            nn.init.zeros_(param)
        self.dwact = nn.GELU()  # GELU(0) = 0: the path adds exactly nothing at initialisation
        self._grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.act(self.fc1(x))
        p = self._grid.num_prefix_tokens
        h, w = self._grid.get()
        prefix, patches = x[:, :p], x[:, p:]
        b, n, c = patches.shape
        grid = patches.transpose(1, 2).reshape(b, c, h, w)
        patches = patches + self.dwact(self.dwconv(grid)).flatten(2).transpose(1, 2)
        x = torch.cat([prefix, patches], dim=1)
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        return self.drop2(x)


class LocalWindowAttention(nn.Module):
    """timm's ``Attention`` with a learnable window bias between patch tokens (zero at init)."""

    # taken over from timm's Attention under its own names (so its weights load into them)
    qkv: nn.Linear
    q_norm: nn.Module
    k_norm: nn.Module
    attn_drop: nn.Dropout
    proj: nn.Module
    proj_drop: nn.Module
    norm: nn.Module
    gate: nn.Module | None

    def __init__(self, attn: nn.Module, grid: TokenGrid, radius: int):
        super().__init__()
        names = ("qkv", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop", "num_heads")
        if not all(hasattr(attn, name) for name in names):
            raise ConfigError(
                f"locality 'local-attention' needs timm's Attention (fused qkv), found {type(attn).__name__}"
            )
        parts: dict[str, Any] = {name: getattr(attn, name) for name in names}
        for name in names[:-1]:
            setattr(self, name, parts[name])
        self.norm = getattr(attn, "norm", nn.Identity())
        self.gate = getattr(attn, "gate", None)
        self.num_heads = int(parts["num_heads"])
        self.head_dim = int(getattr(attn, "head_dim", self.qkv.out_features // 3 // self.num_heads))
        self.radius = radius
        self.locality_strength = nn.Parameter(torch.zeros(()))
        self._grid = grid
        self._mask_cache: dict[tuple, torch.Tensor] = {}

    def outside_window(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(N, N) float mask: 1 where a patch pair is farther apart than the radius, else 0."""
        p = self._grid.num_prefix_tokens
        key = (h, w, p, str(device))
        mask = self._mask_cache.get(key)
        if mask is None:
            ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            ys, xs = ys.flatten(), xs.flatten()
            dist = torch.maximum((ys[:, None] - ys[None]).abs(), (xs[:, None] - xs[None]).abs())
            mask = torch.zeros(p + h * w, p + h * w, device=device)
            mask[p:, p:] = (dist > self.radius).float()
            self._mask_cache = {key: mask}  # one grid at a time: bounded memory
        return mask

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:  # noqa: D102
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        h, w = self._grid.get()
        bias = -self.locality_strength * self.outside_window(h, w, x.device)
        bias = bias.to(q.dtype)
        if attn_mask is not None:
            bias = bias + attn_mask
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0
        )
        x = x.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:  # noqa: D102
        return f"radius={self.radius}, strength={self.locality_strength.item():.4f}"


def apply_locality(vit: VisionTransformer, kind: str, num_blocks: int, radius: int = 3) -> TokenGrid | None:
    """Insert locality enhancement into the last ``num_blocks`` blocks of a timm ViT, in place."""
    if kind == "none" or num_blocks == 0:
        return None
    depth = len(vit.blocks)
    if num_blocks > depth:
        raise ConfigError(f"model.locality_blocks={num_blocks} exceeds the backbone's {depth} blocks")
    grid = TokenGrid(int(getattr(vit, "num_prefix_tokens", 1)))
    vit.patch_embed.register_forward_hook(grid.hook)
    blocks: list[Any] = list(vit.blocks)[depth - num_blocks:]  # timm blocks (Block, ResPostBlock, …)
    for block in blocks:
        if kind == "conv-ffn":
            block.mlp = ConvFFN(block.mlp, grid)
        elif kind == "local-attention":
            block.attn = LocalWindowAttention(block.attn, grid, radius)
        else:
            raise ConfigError(f"unknown locality {kind!r}")
    return grid
