"""Model summaries: parameters per part and FLOPs at an input size (``dtop info``)."""

from __future__ import annotations

from typing import Any

import torch

from dtop.models.backbone import vit_stride
from dtop.models.base import RetrievalModel
from dtop.models.dtop import DToP

PARTS = ("stem", "encoder", "locality", "head")


def count_parameters(model: RetrievalModel) -> dict[str, int]:
    """Number of parameters per part (stem, encoder, locality, head) and ``total``."""
    counts = {part: sum(p.numel() for p in params) for part, params in model.parameter_groups().items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def count_flops(model: RetrievalModel, height: int, width: int, batch: int = 1) -> float:
    """FLOPs of one forward pass per image (torch's counter: a multiply-add counts as 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(batch, 3, height, width, device=next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / batch


def model_summary(model: RetrievalModel, height: int = 512, width: int = 384) -> dict[str, Any]:
    """Everything ``dtop info`` prints, as a JSON-friendly dict."""
    cfg = model.config
    summary: dict[str, Any] = {
        "arch": cfg.arch,
        "backbone": cfg.backbone,
        "descriptor_dim": model.descriptor_dim,
        "parameters": count_parameters(model),
        "input_size": [height, width],
        "gflops": count_flops(model, height, width) / 1e9,
        "mean": model.mean,
        "std": model.std,
    }
    if isinstance(model, DToP):
        summary["tapped_layers"] = list(model.taps)
        summary["fusion"] = cfg.fusion
        summary["locality"] = (
            cfg.locality if cfg.locality == "none" else f"{cfg.locality} in last {cfg.locality_blocks} blocks"
        )
    summary.update(_backbone_summary(model))
    return summary


def _backbone_summary(model: RetrievalModel) -> dict[str, Any]:
    """The encoder's blocks and width (a ViT), the CNN stem of a hybrid, or a CNN's feature channels."""
    from timm.models.vision_transformer import VisionTransformer

    cfg, backbone = model.config, model.backbone
    if not isinstance(backbone, VisionTransformer):  # a timm CNN (gem-cnn)
        return {"feature_channels": int(getattr(backbone, "num_features", 0))}
    out: dict[str, Any] = {"blocks": len(backbone.blocks), "width": int(backbone.embed_dim)}
    if cfg.backbone == "hybrid":
        channels = int(getattr(backbone.patch_embed, "feature_dim", 0))
        stem = cfg.stem or f"ResNetV2 {cfg.stem_layers}"
        out["stem"] = f"{stem} to stride {vit_stride(backbone)}, {channels} channels"
    return out


def format_summary(name: str, summary: dict[str, Any]) -> str:
    """Human-readable table of :func:`model_summary`."""
    params = summary["parameters"]
    h, w = summary["input_size"]
    lines = [f"model       {name}", f"arch        {summary['arch']} on {summary['backbone']}"]
    if "stem" in summary:
        lines.append(f"stem        {summary['stem']}")
    if "blocks" in summary:
        lines.append(f"encoder     {summary['blocks']} blocks, width {summary['width']}")
    if "feature_channels" in summary:
        lines.append(f"features    {summary['feature_channels']} channels (last feature map)")
    if "tapped_layers" in summary:
        lines.append(f"taps        blocks {summary['tapped_layers']} (0-based)")
        lines.append(f"fusion      {summary['fusion']}")
        lines.append(f"locality    {summary['locality']}")
    lines.append(f"descriptor  {summary['descriptor_dim']}-d, L2-normalised")
    lines.append("parameters")
    for part in PARTS:
        lines.append(f"  {part:<9} {params[part] / 1e6:10.3f} M")
    lines.append(f"  {'total':<9} {params['total'] / 1e6:10.3f} M")
    lines.append(f"GFLOPs      {summary['gflops']:.2f} at {h}x{w} (HxW), per image")
    return "\n".join(lines)
