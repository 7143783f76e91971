"""``dtop plot``: draw the training curves (loss, learning rate, validation mAP) of runs to PNG files."""

from __future__ import annotations

import argparse
import sys


def _size(text: str) -> tuple[int, int]:
    """Parse ``WIDTHxHEIGHT`` (e.g. ``800x450``)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 800x450, got {text!r}") from None
    if w < 200 or h < 120:
        raise argparse.ArgumentTypeError(f"at least 200x120 pixels, got {text!r}")
    return w, h


def run(args: argparse.Namespace) -> int:
    """Draw the plots and print the paths written."""
    from dtop.report.plots import plot_runs

    notes: list[str] = []
    written = plot_runs(args.run_dirs, args.out, size=args.size, notes=notes)
    for note in notes:
        print(f"dtop plot: note: {note}", file=sys.stderr)
    for path in written:
        print(f"wrote {path}")
    return 0


def register(subparsers) -> None:
    """Add ``dtop plot``."""
    p = subparsers.add_parser(
        "plot", help="training curves of runs as PNG files: loss, learning rate, validation mAP",
        description="Draw the training curves of `dtop train` runs (read from RUN_DIR/metrics.jsonl) against "
        "the step, as PNG files: loss.png, lr.png and, when the run was validated, val_map.png (one run: "
        "val_map = mean of Medium and Hard mAP, with Easy/Medium/Hard). One run: written to RUN_DIR/plots/ "
        "unless --out. Several runs: their curves are overlaid, one colour per run, labelled with the run "
        "folder name (val_map.png then shows val_map of each run), and --out is required. A run still "
        "training can be plotted; an incomplete last line is skipped.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run folder of `dtop train` (its run.out, holding metrics.jsonl), or the metrics.jsonl")
    p.add_argument("--out", metavar="DIR",
                   help="folder for the PNG files (default RUN_DIR/plots with one run; required with several)")
    p.add_argument("--size", type=_size, default=(800, 450), metavar="WxH",
                   help="image size in pixels (default 800x450)")
    p.set_defaults(func=run)
