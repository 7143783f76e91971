"""``dtop data check``: is a training set complete and readable?

Loads the set the way training does (``--format``), prints the counts (images, classes, images per
class min/median/max), then checks every image: present on disk, and (unless ``--no-decode``)
decodable by :func:`dtop.data.images.load_image`, in ``--workers`` processes with a progress bar.
Exit status 1 when an image is missing or unreadable, 0 when all are fine (2 for bad arguments or
an unreadable label file, like every dtop command).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from dtop.cli.common import int_in
from dtop.data.formats import TRAINING_FORMATS
from dtop.errors import DataError
from dtop.utils.io import write_json

_SHOW = 20


def _print_report(r: dict[str, Any], out: Any) -> None:
    ipc = r["images_per_class"]
    print(f"training set {r['name']} ({r['format']}) in {r['root']}", file=out)
    print(f"  images:  {r['images']}", file=out)
    print(f"  classes: {r['classes']}  (images per class: min {ipc['min']}, median {ipc['median']:g}, "
          f"max {ipc['max']})", file=out)
    for key, value in (r.get("notes") or {}).items():
        print(f"  {key}: {value}", file=out)
    print(f"  missing files:     {r['missing']}", file=out)
    for p in r["missing_paths"][:_SHOW]:
        print(f"    {p}", file=out)
    if r["missing"] > _SHOW:
        print(f"    ... ({r['missing'] - _SHOW} more; --json for the full list)", file=out)
    if r["decoded"]:
        print(f"  unreadable images: {r['unreadable']}", file=out)
        for item in r["unreadable_images"][:_SHOW]:
            print(f"    {item['path']}: {item['reason']}", file=out)
        if r["unreadable"] > _SHOW:
            print(f"    ... ({r['unreadable'] - _SHOW} more; --json for the full list)", file=out)
    else:
        print("  images not decoded (--no-decode)", file=out)
    verdict = "OK" if r["ok"] else "PROBLEMS FOUND (training skips these images and counts them)"
    print(f"  => {verdict}", file=out)


def run(args: argparse.Namespace) -> int:
    """Run ``dtop data check``."""
    if args.action != "check":  # pragma: no cover - argparse restricts the choices
        raise DataError(f"unknown action {args.action!r}")
    from dtop.data.checks import check_training_set
    from dtop.data.training import load_training_set

    fmt = args.format
    csv_path = args.csv
    if fmt == "csv" and csv_path is None:
        csv_path = args.root
    ts = load_training_set(
        fmt,
        args.root,
        csv_path=csv_path,
        path_column=args.path_column,
        label_column=args.label_column,
        exclude=args.exclude,
        min_images_per_class=args.min_images_per_class,
        split=args.split,
        skip_missing=False,  # report GLDv1's missing images instead of leaving them out
    )
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    report = check_training_set(ts, workers=max(1, workers), decode=not args.no_decode,
                                progress=not args.no_progress)
    report["format"] = fmt
    if fmt == "gldv1" and report["missing"]:
        report.setdefault("notes", {})["gldv1"] = (
            "GLDv1 images come from URLs of which many are dead; training leaves missing images out"
        )
    if args.json:
        if args.json == "-":
            print(json.dumps(report, indent=2))
        else:
            write_json(args.json, report)
    _print_report(report, sys.stderr if args.json == "-" else sys.stdout)
    return 0 if report["ok"] else 1


def register(subparsers: Any) -> None:
    """Add ``dtop data``."""
    p = subparsers.add_parser(
        "data",
        help="check a training set: counts, missing files, unreadable images",
        description="Check a training set as training would load it: counts per class, missing files and "
        "images that cannot be decoded. Exit status 1 when any image is missing or unreadable.",
    )
    p.add_argument("action", choices=["check"], help="check: count and verify every image")
    p.add_argument("root", help="data folder (sfm120k, gldv2-clean, gldv1, folder) or the CSV file (csv)")
    p.add_argument("--format", required=True, choices=list(TRAINING_FORMATS), help="training-set format")
    p.add_argument("--csv", default=None, help="CSV file of path,label (format csv; default: ROOT)")
    p.add_argument("--path-column", default="path", help="CSV column of image paths (default path)")
    p.add_argument("--label-column", default="label", help="CSV column of labels (default label)")
    p.add_argument("--exclude", default=None, help="file of landmark ids to leave out (gldv2-clean)")
    p.add_argument("--split", default="train", help="SfM-120k split: train or val (default train)")
    p.add_argument("--min-images-per-class", type=int_in(1), default=1, help="drop smaller classes (default 1)")
    p.add_argument("--workers", type=int_in(1, 256), default=None, help="decoding processes (default: all CPUs)")
    p.add_argument("--no-decode", action="store_true", help="only check that the files exist (fast)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write the report as JSON to FILE ('-': JSON on stdout, text on stderr)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
