"""Backbones: timm VisionTransformers (plain or CNN-stem hybrids) and timm CNNs, unchanged.

dtop pads inputs to the token stride, loads weights with a strict key match and inserts locality
modules after loading (docs/models.md).
"""

from __future__ import annotations

import difflib
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dtop.errors import CheckpointError, ConfigError
from dtop.models.cnn_stem import STEM_CNN_PREFIX, create_cnn_stem, load_stem_weights
from dtop.models.config import ModelConfig
from dtop.models.locality import is_locality_param
from dtop.models.sources import packaged_weights
from dtop.models.weights import is_weights_path, pretrained_state_dict, read_state_dict, state_dict_mismatches

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Input statistics of a ``hybrid`` backbone (those of timm's R50+ViT hybrids).
HYBRID_MEAN = (0.5, 0.5, 0.5)
HYBRID_STD = (0.5, 0.5, 0.5)


def _timm_create(name: str, user_args: dict, **kwargs) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            raise
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ConfigError(f"unknown backbone {name!r}: timm has no such model.{hint}") from err
    except TypeError as err:
        if "dynamic_img_size" in str(err):
            raise ConfigError(
                f"backbone {name!r} is not a timm VisionTransformer; this arch needs a ViT "
                "(use arch 'gem-cnn' for CNNs)"
            ) from err
        raise ConfigError(f"backbone {name!r} does not accept model.backbone_args {user_args}: {err}") from err


def _hybrid_embed_cls():
    try:
        from timm.layers import HybridEmbed
    except ImportError:  # timm < 1.0.9 kept it in the model file
        from timm.models.vision_transformer_hybrid import HybridEmbed
    return HybridEmbed


def create_vit(config: ModelConfig) -> VisionTransformer:
    """Create the (randomly initialised) timm VisionTransformer of ``config``, without classifier."""
    from timm.models.vision_transformer import VisionTransformer

    kwargs = dict(config.backbone_args)
    kwargs.update(num_classes=0, dynamic_img_size=True)
    if config.backbone == "hybrid":
        stem = create_cnn_stem(config.stem) if config.stem else _resnetv2_stem(config)
        kwargs.setdefault("img_size", 224)
        try:
            return VisionTransformer(patch_size=1, embed_layer=partial(_hybrid_embed_cls(), backbone=stem), **kwargs)
        except TypeError as err:
            raise ConfigError(
                f"model.backbone_args {config.backbone_args} are not VisionTransformer arguments: {err}"
            ) from err
    model = _timm_create(config.backbone, config.backbone_args, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise ConfigError(
            f"backbone {config.backbone!r} is a {type(model).__name__}, not a timm VisionTransformer; "
            f"arch {config.arch!r} needs a ViT (use arch 'gem-cnn' for CNNs)"
        )
    return model


def _resnetv2_stem(config: ModelConfig) -> nn.Module:
    """The ResNetV2 stem of ``stem_layers`` with the layout of timm's R50+ViT hybrids."""
    from timm.layers import StdConv2dSame
    from timm.models.resnetv2 import ResNetV2

    if not config.stem_layers:
        raise ConfigError("backbone 'hybrid' needs model.stem_layers (ResNetV2 blocks per stage, e.g. [1, 1, 1])")
    return ResNetV2(
        layers=list(config.stem_layers),
        num_classes=0,
        global_pool="",
        preact=False,
        stem_type="same",
        conv_layer=partial(StdConv2dSame, eps=1e-8),
    )


def create_cnn(config: ModelConfig) -> nn.Module:
    """Create the timm CNN of ``config`` as a feature extractor (no pooling, no classifier)."""
    kwargs = dict(config.backbone_args)
    kwargs.update(num_classes=0, global_pool="")
    cnn = _timm_create(config.backbone, config.backbone_args, **kwargs)
    if not hasattr(cnn, "forward_features"):
        raise ConfigError(f"backbone {config.backbone!r} has no forward_features; pick a timm CNN")
    return cnn


def load_backbone_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` into a freshly created timm backbone with a strict key match.

    Classifier weights (``head.*``/``fc.*``/``classifier.*``) that the feature extractor does not
    have are dropped; position embeddings of another grid size are resampled (timm's filter).
    """
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    own = model.state_dict()
    state = {k: v for k, v in state_dict.items() if k in own or not _is_classifier_key(k)}
    if isinstance(model, VisionTransformer) and "pos_embed" in state and "pos_embed" in own \
            and state["pos_embed"].shape != own["pos_embed"].shape:
        state = checkpoint_filter_fn(state, model)
    parts = state_dict_mismatches(own, state)
    if parts:
        raise CheckpointError(
            f"weights from {source} do not fit backbone {type(model).__name__}: " + ", ".join(parts)
            + ". Check that model.backbone / model.backbone_args match the weights."
        )
    model.load_state_dict(state, strict=True)


def _is_classifier_key(key: str) -> bool:
    return key.split(".")[0] in ("head", "fc", "classifier", "head_dist", "pre_logits")


def load_pretrained(model: nn.Module, config: ModelConfig) -> None:
    """Load ``config.pretrained`` (none | tag | local file) into the backbone ``model``.

    For a hybrid with a ``stem`` CNN, a tag or file names the CNN's weights; a file that holds the
    whole backbone (a dtop checkpoint of the same model) loads into all of it.
    """
    spec = config.pretrained
    if spec is None:
        return
    if config.backbone == "hybrid" and config.stem:
        stem = cast(nn.Module, cast(nn.Module, model.patch_embed).backbone)
        if is_weights_path(spec):
            state = read_state_dict(spec)
            if any(k.startswith(STEM_CNN_PREFIX) for k in state):
                load_backbone_weights(model, state, spec)
            else:
                load_stem_weights(stem, state, config.stem, spec)
        else:
            load_stem_weights(stem, pretrained_state_dict(config.stem, spec), config.stem, f"{config.stem}.{spec}")
    elif is_weights_path(spec):
        load_backbone_weights(model, read_state_dict(spec), spec)
    else:
        if config.backbone == "hybrid":
            raise ConfigError("backbone 'hybrid' with stem_layers has no pretrained weights; pass a local file or none")
        state = pretrained_state_dict(config.backbone, spec, **config.backbone_args)
        load_backbone_weights(model, state, f"{config.backbone}.{spec}")


def resolve_normalisation(model: nn.Module, config: ModelConfig) -> tuple[list[float], list[float]]:
    """Input mean/std: the config's, else those of the pretrained weights (or of the architecture)."""
    architecture = config.stem or config.backbone
    packaged = packaged_weights(architecture, config.pretrained)
    cfg: dict[str, Any] = getattr(model, "pretrained_cfg", None) or {}
    if packaged is not None:
        cfg = {"mean": packaged.mean, "std": packaged.std}
    elif config.backbone == "hybrid" and config.stem:
        cfg = getattr(cast(nn.Module, model.patch_embed).backbone, "pretrained_cfg", None) or {}
    elif config.backbone == "hybrid":
        cfg = {"mean": HYBRID_MEAN, "std": HYBRID_STD}
    mean = config.mean or list(cfg.get("mean", IMAGENET_MEAN))
    std = config.std or list(cfg.get("std", IMAGENET_STD))
    return [float(m) for m in mean], [float(s) for s in std]


def from_pretrained(config: ModelConfig, name: str) -> bool:
    """Whether backbone parameter ``name`` (without ``backbone.``) is covered by ``pretrained`` weights.

    Everything but the locality modules, except in a hybrid with a ``stem`` CNN, whose ViT is new.
    """
    if config.backbone == "hybrid" and config.stem:
        return name.startswith(STEM_CNN_PREFIX)
    return not is_locality_param(name)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad (B, C, H, W) at the bottom/right so that H and W are multiples of ``multiple``.

    Zero is the mean colour after normalisation. dtop's loaders resize to multiples of 16, so in
    its own pipelines this never pads; it keeps direct calls with odd sizes well defined.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return x


def vit_stride(vit: VisionTransformer) -> int:
    """Pixels per token side of a timm ViT (16 for the R50 hybrid and ViT-B/16)."""
    pe: Any = vit.patch_embed  # timm's PatchEmbed, or HybridEmbed (a CNN stem) with feat_ratio()
    if hasattr(pe, "feat_ratio"):
        return int(pe.feat_ratio())
    return int(pe.patch_size[0])


def resolve_layers(layers: list[int], depth: int) -> list[int]:
    """Turn (possibly negative) block indices into sorted non-negative ones, checking the range."""
    out = []
    for i in layers:
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise ConfigError(
                f"model.layers entry {i} is out of range for a backbone with {depth} blocks "
                f"(valid: {-depth}..{depth - 1})"
            )
        out.append(j)
    if len(set(out)) != len(out):
        raise ConfigError(f"model.layers {layers} name the same block twice")
    return sorted(out)
