"""``dtop download``: fetch ROxford5k, RParis6k, the R1M distractors, SfM-120k or GLDv2-clean."""

from __future__ import annotations

import argparse

from dtop.cli.common import int_in, positive_float
from dtop.data.download import BASE_URL_ENV, CATALOGUE, download_dataset

_EPILOG = f"""\
layout: ROOT/roxford5k/{{gnd_roxford5k.pkl,jpg/}}, ROOT/rparis6k/{{gnd_rparis6k.pkl,jpg/}},
ROOT/revisitop1m/{{revisitop1m.txt,jpg/}},
ROOT/retrieval-SfM-120k/{{retrieval-SfM-120k.pkl,ims/}} (train with data.root=ROOT/retrieval-SfM-120k),
ROOT/gldv2/{{train_clean.csv,train/}} (train with data.root=ROOT/gldv2; only the images of the clean
set are extracted from the 500 GLDv2 train archives, each archive is deleted once extracted).

verification: the GLDv2 archives are checked against the md5 files published next to them; the
other hosts publish no checksums: dtop checks the two ground-truth files against md5 sums
recorded from the official files, parses the SfM-120k pickle and train_clean.csv, checks the
length of every download against what the server announces, reads every archive end to end
(gzip CRC included) and, after extraction, that every image named by the ground truth (imlist +
qimlist), revisitop1m.txt, the SfM-120k pickle or train_clean.csv is present.

Interrupted downloads resume (HTTP Range) when the command is run again; a run on a complete
dataset does nothing. Mirror: --base-url URL or ${BASE_URL_ENV}; the mirror serves
URL/<dataset>/<file name> (e.g. URL/rparis6k/paris_1-v1.tgz).
"""


def run(args: argparse.Namespace) -> int:
    """Download the requested dataset(s)."""
    for name in args.datasets:
        download_dataset(
            name,
            args.root,
            base_url=args.base_url,
            keep_archives=args.keep_archives,
            progress=not args.no_progress,
            retries=args.retries,
            timeout=args.timeout,
        )
    return 0


def register(subparsers) -> None:
    """Add ``dtop download``."""
    lines = "\n".join(f"  {k}: {v.description}" for k, v in CATALOGUE.items())
    p = subparsers.add_parser(
        "download",
        help="download and verify ROxford5k, RParis6k, the R1M distractors, SfM-120k or GLDv2-clean",
        description=f"Download, verify and extract benchmark datasets from their official sources.\n{lines}",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "datasets",
        nargs="+",
        choices=list(CATALOGUE),
        metavar="DATASET",
        help=f"dataset(s) to download: {', '.join(CATALOGUE)}",
    )
    p.add_argument("--root", required=True,
                   help="data folder; each dataset goes to its folder under ROOT (see below)")
    p.add_argument(
        "--base-url", default=None, help=f"mirror replacing the official hosts (default: ${BASE_URL_ENV} if set)"
    )
    p.add_argument(
        "--keep-archives",
        action="store_true",
        help="keep the downloaded archives in ROOT/<dataset>/.download/ after extraction",
    )
    p.add_argument("--retries", type=int_in(0, 100), default=5, help="retries per file on network errors (default 5)")
    p.add_argument("--timeout", type=positive_float, default=60.0, help="network timeout in seconds (default 60)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
