"""The typed configuration of every model dtop builds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from dtop.config import NonNegativeInt, PositiveFloat, PositiveInt, check_fields
from dtop.errors import ConfigError

#: The DToP head, or a baseline.
Arch = Literal["dtop", "cls", "gem-tokens", "gem-cnn"]
#: How the global and local vectors are fused.
Fusion = Literal["concat", "orthogonal"]
#: Locality enhancement of the deeper encoder blocks.
Locality = Literal["none", "conv-ffn", "local-attention"]
#: Which branches form the descriptor (``global``/``local``: ablations).
Branches = Literal["both", "global", "local"]


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; stored inside every checkpoint.

    See ``docs/design.md`` for why each default is what it is.
    """

    #: ``dtop`` (the DToP head), or a baseline: ``cls``, ``gem-tokens``, ``gem-cnn``.
    arch: Arch = "dtop"
    #: A timm model name (a VisionTransformer, or any CNN for ``gem-cnn``), or ``hybrid``: a CNN
    #: stem (``stem`` or ``stem_layers``) + a ViT of your own shape (``backbone_args``), timm's layout.
    backbone: str = "vit_base_r50_s16_384"
    #: Extra keyword arguments for the timm constructor (``depth``, ``embed_dim``, ``num_heads``, ...).
    backbone_args: dict[str, Any] = field(default_factory=dict)
    #: ResNetV2 blocks per stage of the stem when ``backbone: hybrid`` (timm's R50 hybrid: [3, 4, 9]).
    stem_layers: list[PositiveInt] | None = None
    #: Or any timm CNN as the stem of ``backbone: hybrid``, cut at stride 16 (``efficientnet_lite0``).
    stem: str | None = None
    #: ``none``, a pretrained tag (timm's, e.g. ``orig_in21k_ft_in1k``; ``default`` = timm's default
    #: tag; or one that a pip package ships, e.g. ``tf_in1k`` of ``efficientnet_lite0``), or the path
    #: of a local weights file (.safetensors, .pth, .bin, or a dtop checkpoint). For a hybrid with a
    #: ``stem`` CNN it names the CNN's weights (or a file holding the whole backbone).
    pretrained: str | None = None
    #: Encoder blocks whose outputs are tapped (negative = from the end).
    layers: list[int] = field(default_factory=lambda: [-4, -3, -2, -1])
    #: Descriptor dimension (None: no final projection, baselines only).
    dim: PositiveInt | None = 512
    #: Output size of the global ([CLS]) branch.
    global_dim: PositiveInt = 512
    #: Output size of the local (patch-token) branch.
    local_dim: PositiveInt = 512
    #: Channels of the local branch's 1x1 reduction of the concatenated token maps.
    local_channels: PositiveInt = 512
    #: Which branches form the descriptor: ``both`` (DToP), ``global`` or ``local`` (ablations).
    branches: Branches = "both"
    #: ``concat`` (Linear over [g; l]) or ``orthogonal`` (DOLG-style: l minus its projection on g).
    fusion: Fusion = "concat"
    #: Locality enhancement in the last ``locality_blocks`` blocks: none | conv-ffn | local-attention.
    locality: Locality = "conv-ffn"
    locality_blocks: NonNegativeInt = 4
    #: Window radius (in tokens, Chebyshev distance) of ``local-attention``.
    locality_radius: NonNegativeInt = 3
    #: Initial GeM exponent and whether it is learned.
    gem_p: PositiveFloat = 3.0
    gem_p_trainable: bool = True
    #: Seed of the random initialisation (the same config always builds the same model).
    init_seed: int = 0
    #: Input normalisation; None = the backbone's pretrained statistics.
    mean: list[float] | None = None
    std: list[PositiveFloat] | None = None

    def __post_init__(self) -> None:
        if self.pretrained is not None and str(self.pretrained).lower() in ("none", "false", ""):
            self.pretrained = None
        check_fields(self, "model")
        if not self.layers:
            raise ConfigError("model.layers must name at least one encoder block to tap")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"model.layers has repeated entries: {self.layers}")
        if self.arch == "dtop" and self.dim is None:
            raise ConfigError("model.dim must be set for arch 'dtop' (the fused descriptor size)")
        if self.fusion == "orthogonal" and self.global_dim != self.local_dim:
            raise ConfigError(
                "fusion 'orthogonal' projects the local vector on the global one: set "
                f"model.global_dim == model.local_dim (got {self.global_dim} and {self.local_dim})"
            )
        if self.backbone == "hybrid" and bool(self.stem_layers) == bool(self.stem):
            raise ConfigError(
                "backbone 'hybrid' needs exactly one stem: model.stem_layers (ResNetV2 blocks per stage, e.g. "
                "[1, 1, 1]) or model.stem (a timm CNN, e.g. efficientnet_lite0)"
            )
        for name in ("stem_layers", "stem"):
            if getattr(self, name) is not None and self.backbone != "hybrid":
                raise ConfigError(f"model.{name} applies only to backbone 'hybrid'")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise ConfigError(f"model.{name} must have 3 values (RGB), got {value}")
