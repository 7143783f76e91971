"""Options shared by the sub-commands that run a model over images."""

from __future__ import annotations

import argparse
import os

from dtop.config import AMP_CHOICES
from dtop.errors import ConfigError


def parse_size(text: str, *, min_height: int = 16, min_width: int = 16, option: str = "--size") -> tuple[int, int]:
    """Parse a ``--size`` value, ``HxW`` (height first) or a single number for a square, into (height, width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or parts[0] < min_height or parts[1] < min_width:
        raise ConfigError(f"{option} must be HxW (height x width) with at least {min_height}x{min_width} pixels, "
                          f"e.g. 512x384; got {text!r}")
    return parts[0], parts[1]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model`` and config overrides."""
    p.add_argument("--model", required=True,
                   help="a checkpoint (.safetensors), a model config YAML or a registered name (dtop info --list)")
    p.add_argument("overrides", nargs="*", help="model config overrides key=value (configs only)")


def add_extraction_args(p: argparse.ArgumentParser, image_size: int = 1024) -> None:
    """Multi-scale extraction settings and runtime options."""
    g = p.add_argument_group("extraction")
    g.add_argument("--image-size", type=int, default=image_size,
                   help=f"longer side at scale 1 (default {image_size})")
    g.add_argument("--scales", type=float, nargs="+", default=None,
                   help="scales averaged into one descriptor (default 1/√2 1 √2)")
    g.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="storage precision")
    g.add_argument("--exif-transpose", action="store_true", help="apply EXIF orientation (phone photos)")
    g.add_argument("--batch-size", type=int, default=8, help="images per forward pass (per size bucket)")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding workers")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--amp", choices=AMP_CHOICES, default="auto", help="autocast (auto: bf16 on CUDA, off on CPU)")
    g.add_argument("--shard-size", type=int, default=1000, help="images per store shard (resume granularity)")
    g.add_argument("--skip-bad", action="store_true", help="leave unreadable images out instead of failing")
    g.add_argument("--overwrite", action="store_true", help="replace a store made with another model/settings")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def settings_from_args(args: argparse.Namespace):
    """The :class:`~dtop.engine.extract.ExtractSettings` of the parsed options."""
    from dtop.engine.extract import DEFAULT_SCALES, ExtractSettings  # torch: imported when a command runs

    scales = list(args.scales) if args.scales is not None else list(DEFAULT_SCALES)
    return ExtractSettings(image_size=args.image_size, scales=scales, dtype=args.dtype,
                           exif_transpose=args.exif_transpose)


def runtime_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of :func:`dtop.engine.extract.extract_to_store` from the parsed options."""
    return dict(batch_size=args.batch_size, num_workers=args.workers, device=args.device, amp=args.amp,
                skip_bad=args.skip_bad, shard_size=args.shard_size, overwrite=args.overwrite,
                progress=not args.no_progress)


def init_distributed() -> None:
    """Join the process group when started by ``torchrun`` (NCCL on GPUs, gloo on CPUs)."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def load_cli_model(args: argparse.Namespace):
    """The model named by ``--model`` (with overrides)."""
    from dtop.models import create_model

    return create_model(args.model, list(args.overrides or []))
