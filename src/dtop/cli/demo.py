"""``dtop demo``: generate data, train, evaluate, compare and report, offline."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    """Run the demo."""
    from dtop.apps.demo import run_demo

    run_demo(args.out, minutes=args.minutes, device=args.device, seed=args.seed, workers=args.workers)
    return 0


def register(subparsers) -> None:
    """Add ``dtop demo``."""
    p = subparsers.add_parser(
        "demo", help="the whole job on built-in data: generate, train, evaluate, compare, report",
        description="Generate the built-in benchmark, train the tiny DToP and baselines within --minutes, "
        "evaluate under the revisited protocol, print the table and write an HTML report. No downloads.",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--minutes", type=float, default=5.0, help="time budget for training (default 5)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0, help="benchmark seed")
    p.add_argument("--workers", type=int, default=2, help="data loading workers")
    p.set_defaults(func=run)
