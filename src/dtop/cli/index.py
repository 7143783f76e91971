"""``dtop index build|add|info``: an on-disk, self-contained index of an image folder."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from dtop.apps.index_format import ENGINES
from dtop.cli.common import add_extraction_args, add_model_args, int_in, load_cli_model, settings_from_args
from dtop.engine.settings import RUNTIME_RANGES, Amp
from dtop.utils.paths import show_path

if TYPE_CHECKING:
    from dtop.apps.index import AddReport, ImageIndex
    from dtop.data.folders import ImageList
    from dtop.retrieval.store import Failure

MAX_LISTED_FAILURES = 10


def add_runtime_args(p: argparse.ArgumentParser, workers: int | None = None, shard_size: bool = True) -> None:
    """Runtime options of commands whose extraction settings come from an index (not from the command line)."""
    g = p.add_argument_group("runtime")
    # workers None (index build/add): batch size and workers default to the device's (engine.runtime)
    device_defaults = workers is None
    g.add_argument("--batch-size", type=int_in(*RUNTIME_RANGES["batch_size"]), default=None if device_defaults else 8,
                   help="images per forward pass (per size bucket; default "
                   + ("1 on a CPU, 8 on a GPU)" if device_defaults else "8)"))
    g.add_argument("--workers", type=int_in(*RUNTIME_RANGES["num_workers"]), default=workers,
                   help=f"decoding workers (default {'1 on a CPU, 4 on a GPU' if device_defaults else workers})")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--amp", choices=get_args(Amp), default="auto", help="autocast (auto: bf16 on CUDA, off on CPU)")
    if shard_size:
        g.add_argument("--shard-size", type=int_in(*RUNTIME_RANGES["shard_size"]), default=1000,
                       help="images per shard of the new segment (resume granularity)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def display_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies below it, else as given; on one printable
    line (a name with a line break or bytes that are not UTF-8 is shown escaped)."""
    try:
        return show_path(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return show_path(path)


def print_failures(failures: Sequence[Failure], where: str) -> None:
    """Print the first unreadable images, one per line with the reason; say ``where`` the rest are listed."""
    for f in failures[:MAX_LISTED_FAILURES]:
        print(f"  {display_path(f.path)}: {f.reason}")
    if len(failures) > MAX_LISTED_FAILURES:
        print(f"  … and {len(failures) - MAX_LISTED_FAILURES} more (listed in {where})")


def print_listed(source: str | os.PathLike, images: ImageList) -> None:
    """Print what a folder listing skipped (unreadable folders, dangling or looping links, FIFOs)."""
    if not images.skipped:
        return
    print(f"{display_path(source)}: {len(images.skipped)} entr{'y' if len(images.skipped) == 1 else 'ies'} "
          "skipped while listing:")
    for item in images.skipped[:MAX_LISTED_FAILURES]:
        print(f"  {display_path(item.path)}: {item.reason}")
    if len(images.skipped) > MAX_LISTED_FAILURES:
        print(f"  … and {len(images.skipped) - MAX_LISTED_FAILURES} more")


def _add_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(batch_size=args.batch_size, num_workers=args.workers, device=args.device, amp=args.amp,
                shard_size=args.shard_size, progress=not args.no_progress)


def _describe_search(index: ImageIndex) -> str:
    search = index.meta["search"]
    if search["engine"] == "faiss":
        params = f", {search['search_params']}" if search.get("search_params") else ""
        return f"faiss {search['factory']}{params}"
    return "exact (torch)"


def print_add_report(index: ImageIndex, report: AddReport) -> None:
    """Print what an add did and what the index holds now."""
    name = display_path(index.root)
    if report.segment is None:
        print(f"{name}: nothing to add ({report.unchanged} image(s) already indexed and unchanged)")
    else:
        parts = [f"{len(report.new)} new"]
        if report.modified:
            parts.append(f"{len(report.modified)} modified")
        skipped = f", {report.unchanged} unchanged skipped" if report.unchanged else ""
        resumed = " (resumed)" if report.resumed else ""
        print(f"{name}: segment {report.segment:03d}{resumed}: {report.extracted} image(s) indexed "
              f"({', '.join(parts)}){skipped}")
        if report.failures:
            print(f"{name}: {len(report.failures)} unreadable image(s) skipped (fix them and run `dtop index add` "
                  "again):")
            print_failures(report.failures, "the segment's manifest.json")
    model = index.meta["model"]
    n_seg = len(index.meta["segments"])
    print(f"{name}: {len(index)} searchable image(s) in {n_seg} segment(s); {model['descriptor_dim']}-d, "
          f"{_describe_search(index)} search; model {model.get('source') or '?'} ({model['fingerprint']})")


def run_build(args: argparse.Namespace) -> int:
    """Create the index (or reopen the same one) and add the images."""
    from dtop.apps.index import ImageIndex
    from dtop.data.folders import read_image_list

    settings = settings_from_args(args)  # checked before any work
    paths = read_image_list(args.images)
    print_listed(args.images, paths)
    model = load_cli_model(args)
    source = " ".join([str(args.model), *(args.overrides or [])])
    index = ImageIndex.create(args.out, model, settings, source=source, engine=args.engine,
                              factory=args.factory, search_params=args.search_params, overwrite=args.overwrite)
    if index.reopened:
        print(f"{display_path(args.out)} is already an index of this model and settings: adding new images only")
    report = index.add(paths, **_add_kwargs(args))
    print_add_report(index, report)
    return 0


def run_add(args: argparse.Namespace) -> int:
    """Add the new and modified images of a folder or list to an index."""
    from dtop.apps.index import ImageIndex
    from dtop.data.folders import read_image_list

    index = ImageIndex.open(args.index)
    paths = read_image_list(args.images)
    print_listed(args.images, paths)
    report = index.add(paths, **_add_kwargs(args))
    print_add_report(index, report)
    return 0


def run_info(args: argparse.Namespace) -> int:
    """Print a summary of an index."""
    from dtop.apps.index import ImageIndex

    index = ImageIndex.open(args.index)
    summary = index.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    s = summary["settings"]
    scales = ", ".join(f"{v:.3g}" for v in s["scales"])
    print(f"index       {display_path(index.root)}")
    print(f"images      {summary['images']} searchable, {summary['unreadable']} unreadable, "
          f"{summary['superseded']} superseded by re-indexed versions")
    print(f"segments    {summary['segments']}")
    print(f"model       {summary['model']['source'] or '?'} ({summary['model']['arch']}, fingerprint "
          f"{summary['model']['fingerprint']}), {summary['descriptor_dim']}-d")
    print(f"extraction  image size {s['image_size']}, scales {scales}, {s['dtype']}"
          + (", EXIF orientation applied" if s["exif_transpose"] else ""))
    print(f"search      {_describe_search(index)}")
    print(f"updated     {summary['updated']}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``dtop index`` with its sub-commands ``build``, ``add`` and ``info``."""
    p = subparsers.add_parser(
        "index", help="build and update a searchable index of your own images",
        description="An index is a self-contained folder: index.json, a copy of the model, one descriptor "
        "store per segment and optionally a faiss index. `build` creates it from an image folder or list, "
        "`add` extracts only images not indexed yet (or modified since), `info` summarises it. Query it with "
        "`dtop search`.",
    )
    sub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)

    b = sub.add_parser(
        "build", help="create an index of an image folder or list",
        description="Create an index at --out and extract all images into its first segment. Unreadable "
        "images are skipped and reported. Rerunning the same command on the same --out resumes a killed "
        "build and then adds only new images.",
    )
    add_model_args(b)
    b.add_argument("--images", required=True, help="an image folder (searched recursively) or a text file "
                   "with one path per line")
    b.add_argument("--out", required=True, help="the index folder (new or empty)")
    g = b.add_argument_group("search engine")
    g.add_argument("--engine", choices=ENGINES, default="torch",
                   help="torch: exact search (default); faiss: a faiss index built from --factory, rebuilt on add")
    g.add_argument("--factory", default=None,
                   help="faiss index-factory string, e.g. 'IVF1024,Flat' or 'HNSW32' (default Flat, exact)")
    g.add_argument("--search-params", default=None,
                   help="default faiss search parameters, e.g. nprobe=16 (dtop search can override them)")
    add_extraction_args(b)
    for action in b._actions:  # unreadable images are always skipped by an index
        if "--skip-bad" in action.option_strings:
            action.help = argparse.SUPPRESS
        if "--overwrite" in action.option_strings:
            action.help = "replace an index at --out made with another model or other settings"
    b.set_defaults(func=run_build)

    a = sub.add_parser(
        "add", help="add new (and modified) images to an index",
        description="Extract the images of a folder or list that the index does not hold yet, or whose size "
        "or modification time changed, into a new segment, with the index's own model and settings. "
        "A killed add leaves the index as it was; rerun it to resume.",
    )
    a.add_argument("--index", required=True, help="the index folder (made by `dtop index build`)")
    a.add_argument("--images", required=True, help="an image folder or a text file with one path per line")
    add_runtime_args(a)
    a.set_defaults(func=run_add)

    i = sub.add_parser("info", help="summarise an index", description="Counts, model and settings of an index.")
    i.add_argument("--index", required=True, help="the index folder")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=run_info)
