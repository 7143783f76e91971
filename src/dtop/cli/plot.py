"""``dtop plot``: draw the training curves (loss, learning rate, validation mAP) of runs to PNG files."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dtop.cli.common import parse_size

MIN_HEIGHT, MIN_WIDTH = 120, 200


def run(args: argparse.Namespace) -> int:
    """Draw the plots and print the paths written (and what was left out, on stderr)."""
    from dtop.report.plots import plot_runs

    height, width = parse_size(args.size, min_height=MIN_HEIGHT, min_width=MIN_WIDTH)
    result = plot_runs(args.run_dirs, args.out, height=height, width=width)
    for message in result.messages:
        print(f"dtop plot: note: {message}", file=sys.stderr)
    for path in result.paths:
        print(f"wrote {path}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``dtop plot``."""
    p = subparsers.add_parser(
        "plot", help="training curves of runs as PNG files: loss, learning rate, validation mAP",
        description="Draw the training curves of `dtop train` runs (read from RUN_DIR/metrics.jsonl) against "
        "the step, as PNG files: loss.png, lr.png and, when the run was validated, val_map.png (one run: "
        "val_map = mean of Medium and Hard mAP, with Easy/Medium/Hard), and negatives.png for contrastive "
        "runs. One run: written to RUN_DIR/plots/ unless --out. Several runs: their curves are overlaid, one "
        "colour per run, labelled with the run folder name (val_map.png then shows val_map of each run), and "
        "--out is required. A run still training can be plotted; an incomplete last line is skipped.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run folder of `dtop train` (its run.out, holding metrics.jsonl), or the metrics.jsonl")
    p.add_argument("--out", metavar="DIR",
                   help="folder for the PNG files (default RUN_DIR/plots with one run; required with several)")
    p.add_argument("--size", default="450x800", metavar="HxW",
                   help=f"image size in pixels, HxW: height x width (default 450x800, at least "
                   f"{MIN_HEIGHT}x{MIN_WIDTH})")
    p.set_defaults(func=run)
