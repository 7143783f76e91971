"""Where a model looks on an image: attention heatmaps for reports (DToP local branch, ViT [CLS] attention).

How each map is computed: docs/report.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dtop.data.images import resize_image, to_tensor
from dtop.errors import ConfigError

# Anchor colours of the heat colour map (dark blue → cyan → yellow → red), from 0 to 1.
_CMAP_ANCHORS = np.array(
    [[0, 0, 90], [0, 60, 200], [0, 190, 230], [120, 230, 120], [250, 230, 40], [250, 120, 20], [200, 10, 10]],
    dtype=np.float32,
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape) to RGB uint8 (shape + (3,)) with a blue→red heat colour map."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0) * (len(_CMAP_ANCHORS) - 1)
    lo = np.floor(v).astype(np.int64).clip(0, len(_CMAP_ANCHORS) - 2)
    t = (v - lo)[..., None]
    rgb = _CMAP_ANCHORS[lo] * (1 - t) + _CMAP_ANCHORS[lo + 1] * t
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def colorbar(width: int = 160, height: int = 10) -> Image.Image:
    """A horizontal colour bar of :func:`colormap` (low on the left)."""
    row = colormap(np.linspace(0.0, 1.0, width, dtype=np.float32))
    return Image.fromarray(np.repeat(row[None], height, axis=0), "RGB")


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """Blend ``heat`` (h, w) in [0, 1], resized bilinearly to the image, over ``image``."""
    image = image.convert("RGB")
    heat_img = Image.fromarray(np.clip(heat * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    heat_img = heat_img.resize(image.size, Image.Resampling.BILINEAR)
    colours = colormap(np.asarray(heat_img, dtype=np.float32) / 255.0)
    base = np.asarray(image, dtype=np.float32)
    out = base * (1.0 - alpha) + colours.astype(np.float32) * alpha
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


def _normalise(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float32)
    lo, hi = float(m.min()), float(m.max())
    if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo < 1e-12:
        return np.zeros_like(m)
    return (m - lo) / (hi - lo)


def _device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _grid(backbone: Any, n_patches: int, height: int, width: int, stride: int) -> tuple[int, int]:
    gh, gw = -(-height // stride), -(-width // stride)
    if gh * gw == n_patches:
        return gh, gw
    feat = getattr(getattr(backbone, "patch_embed", None), "dynamic_feat_size", None)
    if callable(feat):
        gh, gw = (int(v) for v in feat((height, width)))
        if gh * gw == n_patches:
            return gh, gw
    raise ConfigError(f"cannot lay out {n_patches} patch tokens on a grid for a {height}x{width} input")


@torch.no_grad()
def cls_attention(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Last block's [CLS]→patch attention (B, h, w), averaged over heads, of a timm-ViT-based model.

    ``images``: normalised (B, 3, H, W), H and W multiples of the model's stride. The model's
    ``backbone`` must be a timm VisionTransformer whose blocks use a fused ``qkv`` attention.
    """
    from dtop.models.backbone import pad_to_multiple

    backbone = getattr(model, "backbone", None)
    blocks = getattr(backbone, "blocks", None)
    if backbone is None or blocks is None or len(blocks) == 0:
        raise ConfigError(f"{type(model).__name__} has no transformer blocks: no [CLS] attention to show")
    last = blocks[-1]
    attn = getattr(last, "attn", None)
    if attn is None or not hasattr(attn, "qkv") or not hasattr(last, "norm1"):
        raise ConfigError(f"the last block of {type(model).__name__} has no fused qkv attention to read")
    captured: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        captured["x"] = args[0] if args else kwargs["x"]

    stride = int(getattr(model, "stride", 16))
    x = pad_to_multiple(images, stride)
    handle = last.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        backbone.forward_features(x)
    finally:
        handle.remove()
    tokens = captured["x"]
    y = last.norm1(tokens)
    b, n, d = y.shape
    heads = int(attn.num_heads)
    head_dim = int(getattr(attn, "head_dim", d // heads))
    qkv = attn.qkv(y).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    q = getattr(attn, "q_norm", torch.nn.Identity())(q)
    k = getattr(attn, "k_norm", torch.nn.Identity())(k)
    scale = float(getattr(attn, "scale", head_dim**-0.5))
    weights = ((q[:, :, :1] * scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, 1, N)
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    cls = weights[:, :, 0, prefix:].mean(dim=1)  # (B, N - prefix)
    gh, gw = _grid(backbone, n - prefix, x.shape[-2], x.shape[-1], stride)
    return cls.reshape(b, gh, gw)


def heatmap_kind(model: torch.nn.Module) -> str:
    """What :func:`attention_heatmap` shows for ``model`` (a caption)."""
    if callable(getattr(model, "forward_parts", None)):
        return "local-branch spatial attention"
    return "last-block [CLS]→patch attention (mean over heads)"


@torch.no_grad()
def attention_heatmap(model: torch.nn.Module, image: Image.Image, long_side: float) -> np.ndarray:
    """Where ``model`` looks on ``image``: a map (H', W') in [0, 1] (min-max normalised) over the image.

    The image is resized like the extraction does (longer side ``long_side``, sides multiples of the
    model's stride); the token-grid map is upsampled bilinearly to that resized image's size.
    """
    was_training = model.training
    model.eval()
    try:
        stride = int(getattr(model, "stride", 16))
        img = resize_image(image.convert("RGB"), long_side, multiple=stride)
        # Read off the model object: any module with these attributes works, not only a RetrievalModel.
        mean, std = getattr(model, "mean", None), getattr(model, "std", None)
        if mean is None or std is None:
            raise ConfigError(f"{type(model).__name__} has no mean/std: cannot normalise its input")
        x = to_tensor(img, mean, std).unsqueeze(0).to(_device(model))
        forward_parts = getattr(model, "forward_parts", None)
        if callable(forward_parts):
            att = forward_parts(x)["attention"][:, 0]
        else:
            att = cls_attention(model, x)
        # Keep only the tokens of the image (the model pads bottom/right to a multiple of the stride).
        gh, gw = -(-img.height // stride), -(-img.width // stride)
        att = att[:, :gh, :gw].float()
        att = F.interpolate(att[:, None], size=(gh * stride, gw * stride), mode="bilinear", align_corners=False)
        att = att[0, 0, : img.height, : img.width]
        return _normalise(att.cpu().numpy())
    finally:
        model.train(was_training)
