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
    reductions = [r for r, _ in feature_strides(probe)]
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


def feature_strides(cnn: nn.Module) -> list[tuple[int, str]]:
    """(stride, module name) of each feature map of a timm CNN (whole or ``features_only``)."""
    info: Any = getattr(cnn, "feature_info", None)
    if info is None:
        return []
    levels = getattr(info, "info", info)  # features_only: timm's FeatureInfo holds every level in .info
    return [(int(f["reduction"]), str(f["module"])) for f in levels]


def parameters_to_stride(cnn: nn.Module, stride: int) -> list[tuple[str, nn.Parameter]]:
    """The parameters of ``cnn`` that compute its feature maps up to ``stride``, in forward order.

    Everything registered before the module of the last feature map at a stride <= ``stride``, and
    that module (timm registers a CNN's layers in the order they run).
    """
    maps = [(r, name) for r, name in feature_strides(cnn) if r <= stride]
    if not maps:
        return []
    last = maps[-1][1]
    out: list[tuple[str, nn.Parameter]] = []
    inside = False
    for name, param in cnn.named_parameters():
        here = name.startswith(last + ".")
        if inside and not here:
            break
        inside = inside or here
        out.append((name, param))
    return out
