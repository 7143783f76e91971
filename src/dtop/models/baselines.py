"""Baselines of the paper's comparisons, built by the same factory.

* ``cls``: the last block's [CLS] token (after the final norm) of any timm ViT.
* ``gem-tokens``: GeM over the last block's patch tokens (after the final norm).
* ``gem-cnn``: GeM over the last feature map of any timm CNN (the cirtorch GeM baseline).

Each is followed by an optional Linear to ``dim`` and L2 normalisation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dtop.models.backbone import (
    create_cnn,
    create_vit,
    from_pretrained,
    load_pretrained,
    pad_to_multiple,
    resolve_normalisation,
    vit_stride,
)
from dtop.models.base import RetrievalModel
from dtop.models.config import ModelConfig
from dtop.models.dtop import STEM_PREFIXES
from dtop.models.layers import GeM, l2n

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

CNN_STEM_PREFIXES = ("conv1", "bn1", "stem", "conv_stem")


class _ProjectedBaseline(RetrievalModel):
    """Shared tail: optional Linear to ``dim``, then L2 normalisation."""

    def _init_tail(self, width: int) -> None:
        self.width = width
        self.fc = nn.Linear(width, self.config.dim) if self.config.dim is not None else nn.Identity()

    @property
    def descriptor_dim(self) -> int:  # noqa: D102
        return self.config.dim if self.config.dim is not None else self.width

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled feature before the projection."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return l2n(self.fc(self.pooled(images)))

    def part_of(self, name: str) -> str:  # noqa: D102
        if not name.startswith("backbone."):
            return "head"
        prefixes = STEM_PREFIXES if self.config.arch != "gem-cnn" else CNN_STEM_PREFIXES
        return "stem" if name[len("backbone."):].startswith(prefixes) else "encoder"

    def extra_repr(self) -> str:  # noqa: D102
        return f"arch={self.config.arch}, backbone={self.config.backbone}, dim={self.descriptor_dim}"


class _VitBaseline(_ProjectedBaseline):
    backbone: VisionTransformer

    def __init__(self, config: ModelConfig):
        vit = create_vit(config)
        load_pretrained(vit, config)
        mean, std = resolve_normalisation(vit, config)
        super().__init__(config, mean, std)
        self.backbone = vit
        self._init_tail(vit.embed_dim)

    @property
    def stride(self) -> int:  # noqa: D102
        return vit_stride(self.backbone)

    def from_pretrained(self, name: str) -> bool:  # noqa: D102
        return name.startswith("backbone.") and from_pretrained(self.config, name[len("backbone."):])

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Final-norm tokens of the last block (B, prefix + h*w, D)."""
        return self.backbone.forward_features(pad_to_multiple(images, self.stride))


class ClsBaseline(_VitBaseline):
    """Last-layer [CLS] token of a timm ViT."""

    def pooled(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.tokens(images)[:, 0]


class GemTokensBaseline(_VitBaseline):
    """GeM over the last layer's patch tokens of a timm ViT."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.pool = GeM(config.gem_p, trainable=config.gem_p_trainable, dims=(1,))

    def pooled(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        prefix = int(getattr(self.backbone, "num_prefix_tokens", 1))
        return self.pool(self.tokens(images)[:, prefix:])


class GemCnnBaseline(_ProjectedBaseline):
    """GeM over the last feature map of a timm CNN."""

    def cnn(self) -> nn.Module | None:  # noqa: D102
        return self.backbone

    #: any timm CNN (timm's CNNs share no base class): ``forward_features`` and ``num_features``
    backbone: Any

    def __init__(self, config: ModelConfig):
        cnn = create_cnn(config)
        load_pretrained(cnn, config)
        mean, std = resolve_normalisation(cnn, config)
        super().__init__(config, mean, std)
        self.backbone = cnn
        self.pool = GeM(config.gem_p, trainable=config.gem_p_trainable)
        self._init_tail(int(self.backbone.num_features))  # channels of the last feature map

    def pooled(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.pool(self.backbone.forward_features(images))
