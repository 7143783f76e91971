"""``dtop train``: train a model from a training config (one process or under torchrun)."""

from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> int:
    """Train and print the summary."""
    from dtop.engine.train import train
    from dtop.engine.train_config import load_train_config

    config = load_train_config(args.config, list(args.overrides or []))
    summary = train(config, resume=args.resume, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0


def register(subparsers) -> None:
    """Add ``dtop train``."""
    p = subparsers.add_parser(
        "train", help="train DToP or a baseline (ArcFace, group-size sampling, DDP, AMP, exact resume)",
        description="Train from a config (configs/train/*.yaml) with section.key=value overrides, e.g. "
        "`dtop train --config configs/train/gldv2_clean.yaml optim.batch_size=16 run.out=runs/x`. "
        "Several GPUs: `torchrun --nproc_per_node=8 -m dtop.cli.main train --config ...`.",
    )
    p.add_argument("--config", required=True, help="training config YAML")
    p.add_argument("overrides", nargs="*", help="overrides section.key=value")
    p.add_argument("--resume", action="store_true", help="continue the run in run.out from its state.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a run.out that holds one (its checkpoints and metrics are replaced)")
    p.set_defaults(func=run)
