"""``dtop info``: parameters, FLOPs, tapped layers and descriptor size of a model."""

from __future__ import annotations

import argparse
import json

from dtop.cli.common import model_overrides, parse_size


def run(args: argparse.Namespace) -> int:
    """Print the model summary."""
    from dtop.models import create_model
    from dtop.models.info import format_summary, model_summary

    height, width = parse_size(args.size)
    model = create_model(args.model, model_overrides(args.overrides), pretrained=False)
    summary = model_summary(model, height, width)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(args.model, summary))
    return 0


def register(subparsers) -> None:
    """Add ``dtop info``."""
    p = subparsers.add_parser(
        "info",
        help="parameters, GFLOPs, tapped layers and descriptor size of a model",
        description="Summarise a model: a registered name (see --list), a config file or a checkpoint. "
        "Builds the architecture only; no pretrained weights are fetched.",
    )
    p.add_argument("model", nargs="?", default="dtop_hybrid", help="registered name, config YAML or checkpoint")
    p.add_argument("overrides", nargs="*", help="model config overrides, key=value or model.key=value (e.g. dim=256)")
    p.add_argument("--size", default="512x384", metavar="HxW",
                   help="input size for GFLOPs, HxW: height x width (default 512x384)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--list", action="store_true", help="list the registered model names and exit")
    p.set_defaults(func=_run_or_list)


def _run_or_list(args: argparse.Namespace) -> int:
    if args.list:
        from dtop.models import list_models

        print("\n".join(list_models()))
        return 0
    return run(args)
