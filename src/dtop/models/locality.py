"""Locality enhancement of the deeper encoder blocks (SPEC §2.4, §3.6).

Both variants are inserted into timm's own blocks *after* pretrained weights are loaded, keep the
block's parameter names (so ``blocks.11.mlp.fc1.weight`` stays where timm put it), and add new
parameters initialised so that the block computes exactly what it did before:

* ``conv-ffn`` (:class:`ConvFFN`): a depth-wise 3x3 convolution over the patch-token grid inside the
  MLP, after the first linear layer and activation (LocalViT-style), as a zero-initialised residual
  path; prefix tokens ([CLS], registers) bypass it.
* ``local-attention`` (:class:`LocalWindowAttention`): an additive attention bias
  ``-strength * [chebyshev(i, j) > radius]`` between patch tokens, with one learnable
  ``locality_strength`` per block initialised to 0; prefix tokens attend and are attended freely.
  As the strength grows the bias becomes the hard window mask of radius r.

The token grid of the current forward pass is recorded by a forward hook on ``patch_embed``
(:class:`TokenGrid`), so the blocks need no extra arguments and timm's own ``forward_features`` and
``forward_intermediates`` keep working.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dtop.errors import ConfigError

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

    def hook(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        """Forward hook for ``patch_embed``: its output is (B, h, w, C) with ``dynamic_img_size``."""
        if output.ndim == 4:
            self.size = (int(output.shape[1]), int(output.shape[2]))
        else:
            self.size = tuple(int(s) for s in module.grid_size)

    def get(self) -> tuple[int, int]:
        """The recorded grid; fails if no forward pass has gone through ``patch_embed``."""
        if self.size is None:
            raise RuntimeError("token grid unknown: the backbone's patch_embed has not run")
        return self.size

    def __repr__(self) -> str:
        return f"TokenGrid(prefix={self.num_prefix_tokens}, size={self.size})"


class ConvFFN(nn.Module):
    """timm's ``Mlp`` with a zero-initialised depth-wise 3x3 conv over the patch grid after fc1+act."""

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
        nn.init.zeros_(self.dwconv.weight)
        nn.init.zeros_(self.dwconv.bias)
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

    def __init__(self, attn: nn.Module, grid: TokenGrid, radius: int):
        super().__init__()
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop", "num_heads"):
            if not hasattr(attn, name):
                raise ConfigError(
                    f"locality 'local-attention' needs timm's Attention (fused qkv), found {type(attn).__name__}"
                )
        self.qkv, self.q_norm, self.k_norm = attn.qkv, attn.q_norm, attn.k_norm
        self.attn_drop, self.proj, self.proj_drop = attn.attn_drop, attn.proj, attn.proj_drop
        self.norm = getattr(attn, "norm", nn.Identity())
        self.gate = getattr(attn, "gate", None)
        self.num_heads = attn.num_heads
        self.head_dim = getattr(attn, "head_dim", self.qkv.out_features // 3 // self.num_heads)
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


def apply_locality(vit: nn.Module, kind: str, num_blocks: int, radius: int = 3) -> TokenGrid | None:
    """Insert locality enhancement into the last ``num_blocks`` blocks of a timm ViT, in place."""
    if kind == "none" or num_blocks == 0:
        return None
    depth = len(vit.blocks)
    if num_blocks > depth:
        raise ConfigError(f"model.locality_blocks={num_blocks} exceeds the backbone's {depth} blocks")
    grid = TokenGrid(int(getattr(vit, "num_prefix_tokens", 1)))
    vit.patch_embed.register_forward_hook(grid.hook)
    for block in list(vit.blocks)[depth - num_blocks:]:
        if kind == "conv-ffn":
            block.mlp = ConvFFN(block.mlp, grid)
        elif kind == "local-attention":
            block.attn = LocalWindowAttention(block.attn, grid, radius)
        else:
            raise ConfigError(f"unknown locality {kind!r}")
    return grid
