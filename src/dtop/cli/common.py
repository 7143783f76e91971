"""Options shared by the sub-commands that run a model over images."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import TYPE_CHECKING, Any, get_args

from dtop.engine.settings import Amp, ExtractSettings, ScalePool, StorageDtype, load_extract_settings
from dtop.errors import ConfigError

if TYPE_CHECKING:
    from dtop.models.base import RetrievalModel


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


def add_extraction_args(p: argparse.ArgumentParser) -> None:
    """Multi-scale extraction settings (a YAML file and options over it) and runtime options."""
    g = p.add_argument_group("extraction")
    defaults = ExtractSettings()
    # None = not given: the --config file's value, else the default, applies
    g.add_argument("--config", dest="extract_config", metavar="YAML",
                   help="extraction settings file (image_size, scales, dtype, exif_transpose, scale_pool); "
                   "the options below override it")
    g.add_argument("--image-size", type=int, default=None,
                   help=f"longer side at scale 1 (default {defaults.image_size})")
    g.add_argument("--scales", type=float, nargs="+", default=None,
                   help="scales averaged into one descriptor (default 1/√2 1 √2)")
    g.add_argument("--scale-pool", choices=get_args(ScalePool), default=None,
                   help="how scales are combined: mean, power (cirtorch's power mean with the GeM exponent; "
                   "GeM models without a projection) or auto (default: power for those, as cirtorch; else mean)")
    g.add_argument("--dtype", choices=get_args(StorageDtype), default=None,
                   help=f"storage precision (default {defaults.dtype})")
    g.add_argument("--exif-transpose", action=argparse.BooleanOptionalAction, default=None,
                   help="apply EXIF orientation (phone photos; default off)")
    g.add_argument("--batch-size", type=int, default=8, help="images per forward pass (per size bucket)")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding workers")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--amp", choices=get_args(Amp), default="auto", help="autocast (auto: bf16 on CUDA, off on CPU)")
    g.add_argument("--shard-size", type=int, default=1000, help="images per store shard (resume granularity)")
    g.add_argument("--skip-bad", action="store_true", help="leave unreadable images out instead of failing")
    g.add_argument("--overwrite", action="store_true", help="replace a store made with another model/settings")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def settings_from_args(args: argparse.Namespace) -> ExtractSettings:
    """The extraction settings of ``--config`` (or the defaults) with the options given over them."""
    settings = load_extract_settings(args.extract_config)
    given = {"image_size": args.image_size, "scales": args.scales, "dtype": args.dtype,
             "exif_transpose": args.exif_transpose, "scale_pool": args.scale_pool}
    return dataclasses.replace(settings, **{k: v for k, v in given.items() if v is not None})


def runtime_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`dtop.engine.extract.extract_to_store` from the parsed options."""
    return dict(batch_size=args.batch_size, num_workers=args.workers, device=args.device, amp=args.amp,
                skip_bad=args.skip_bad, shard_size=args.shard_size, overwrite=args.overwrite,
                progress=not args.no_progress)


def load_cli_model(args: argparse.Namespace) -> RetrievalModel:
    """The model named by ``--model`` (with overrides)."""
    from dtop.models import create_model

    return create_model(args.model, list(args.overrides or []))
