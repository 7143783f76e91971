"""Any timm CNN as the stem of a hybrid ViT: cut at stride 16, its pretrained weights loaded strictly."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dtop.errors import CheckpointError, ConfigError
from dtop.models.weights import state_dict_mismatches

#: The token stride of every hybrid (that of timm's R50+ViT hybrids).
STEM_STRIDE = 16
#: Parameter-name prefix of the CNN inside a hybrid's timm VisionTransformer.
STEM_CNN_PREFIX = "patch_embed.backbone."


def create_cnn_stem(architecture: str) -> nn.Module:
    """timm's ``architecture`` as a feature extractor returning only its stride-16 feature map."""
    import timm

    try:
        probe = timm.create_model(architecture, pretrained=False, features_only=True)
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            raise
        raise ConfigError(f"unknown stem {architecture!r}: timm has no such model") from err
    except (TypeError, AttributeError) as err:
        raise ConfigError(f"model.stem {architecture!r} is not a timm CNN with feature maps ({err})") from err
    info: Any = probe.feature_info  # timm's FeatureInfo
    reductions = list(info.reduction())
    if STEM_STRIDE not in reductions:
        raise ConfigError(
            f"model.stem {architecture!r} has no feature map at stride {STEM_STRIDE} (its strides: {reductions}); "
            "pick a CNN with one, e.g. efficientnet_lite0 or resnet50"
        )
    index = reductions.index(STEM_STRIDE)
    return timm.create_model(architecture, pretrained=False, features_only=True, out_indices=(index,))


def load_stem_weights(stem: nn.Module, state: dict[str, torch.Tensor], architecture: str, source: str) -> None:
    """Load the CNN weights ``state`` (timm keys of the whole ``architecture``) into the cut ``stem``.

    Strict: every key of the stem must be in ``state`` with its shape, and every key of ``state``
    must belong to ``architecture`` (keys past the cut, such as the classifier, are ignored).
    """
    from dtop.models.convert import timm_state_dict

    full = timm_state_dict(architecture)
    foreign = sorted(set(state) - set(full))
    own = stem.state_dict()
    parts = state_dict_mismatches(own, {k: v for k, v in state.items() if k in own})
    if foreign:
        parts.append(f"{len(foreign)} keys that {architecture} does not have (e.g. {', '.join(foreign[:3])})")
    if parts:
        raise CheckpointError(
            f"weights from {source} do not fit the stem {architecture}: " + ", ".join(parts)
            + ". Pass the weights of that CNN with timm's key names (see dtop.models.convert)."
        )
    stem.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
