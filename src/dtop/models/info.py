"""Model summaries: parameters per part and FLOPs at an input size (``dtop info``)."""

from __future__ import annotations

from typing import Any

import torch

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
    blocks = getattr(model.backbone, "blocks", None)  # a ViT (a CNN has none)
    if blocks is not None:
        summary["blocks"] = len(blocks)
        summary["width"] = int(getattr(model.backbone, "embed_dim", 0))
    return summary


def format_summary(name: str, summary: dict[str, Any]) -> str:
    """Human-readable table of :func:`model_summary`."""
    params = summary["parameters"]
    h, w = summary["input_size"]
    lines = [f"model       {name}", f"arch        {summary['arch']} on {summary['backbone']}"]
    if "blocks" in summary:
        lines.append(f"encoder     {summary['blocks']} blocks, width {summary['width']}")
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
