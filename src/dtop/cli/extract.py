"""``dtop extract``: descriptors of an image folder, list or revisited dataset into a store."""

from __future__ import annotations

import argparse

from dtop.cli.common import (
    add_dataset_args,
    add_extraction_args,
    add_model_args,
    load_cli_model,
    open_dataset,
    runtime_kwargs,
    settings_from_args,
)
from dtop.errors import ConfigError


def run(args: argparse.Namespace) -> int:
    """Extract and report the store."""
    from dtop.cli.index import display_path, print_failures, print_listed
    from dtop.data.folders import read_image_list
    from dtop.engine.extract import extract_to_store
    from dtop.engine.runtime import init_distributed

    settings = settings_from_args(args)  # checked before any work
    init_distributed(args.device)
    bbxs = None
    if args.dataset:
        ds = open_dataset(args)
        if args.split == "queries":
            paths, bbxs = ds.query_paths, ds.query_bbxs
        else:
            paths = ds.database_paths
    elif args.images:
        paths = read_image_list(args.images)
        print_listed(args.images, paths)
    else:
        raise ConfigError("give --images DIR|LIST, or --dataset roxford5k|rparis6k|PATH (with --data-root DIR "
                          "for a name)")
    model = load_cli_model(args)
    store = extract_to_store(model, paths, args.out, bbxs=bbxs, settings=settings, **runtime_kwargs(args))
    failures = store.failures()
    print(f"{store.num_images} images, {store.descriptor_dim}-d descriptors in {display_path(args.out)}"
          + (f"; {len(failures)} unreadable, left out:" if failures else ""))
    print_failures(failures, f"{display_path(args.out)}/manifest.json")
    return 0


def register(subparsers) -> None:
    """Add ``dtop extract``."""
    p = subparsers.add_parser(
        "extract", help="extract multi-scale descriptors into a resumable descriptor store",
        description="Extract descriptors into a store (shards + manifest). Rerunning resumes: finished "
        "shards are skipped. Runs under torchrun with one shard subset per rank.",
    )
    add_model_args(p)
    src = p.add_argument_group("images")
    src.add_argument("--images", help="an image folder or a text file with one path per line")
    add_dataset_args(src, required=False)
    src.add_argument("--split", choices=["queries", "database"], default="database",
                     help="with --dataset: queries (cropped to bbx) or database (whole)")
    p.add_argument("--out", required=True, help="store directory")
    add_extraction_args(p)
    p.set_defaults(func=run)
