"""``dtop search``: query an image index with images; ranked lists, JSON and a contact sheet."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtop.cli.index import MAX_LISTED_FAILURES, add_runtime_args, display_path, print_listed
from dtop.errors import ConfigError

if TYPE_CHECKING:
    from dtop.apps.index import SearchResult


#: Most results per query (the ranked lists are printed and kept in memory).
MAX_TOPK = 100_000


def _query_paths(items: list[str]) -> list[str]:
    """Query images: files as given (an unreadable one is reported with the results); a folder stands
    for all images in it (what its listing skipped is printed)."""
    from dtop.data.folders import list_images

    out: list[str] = []
    for item in items:
        if Path(item).is_dir():
            found = list_images(item)
            print_listed(item, found)
            if not found:
                raise ConfigError(f"the query folder {display_path(item)} holds no images")
            out.extend(str(p) for p in found)
        else:
            out.append(item)
    return out


def format_results(results: Sequence[SearchResult]) -> str:
    """The ranked lists as text: one block per query, one line per result (rank, score, path)."""
    lines = []
    for r in results:
        lines.append(f"query {display_path(r.query)}")
        if r.error is not None:
            lines.append(f"  (unreadable: {r.error})")
        elif not r.paths:
            lines.append("  (no results)")
        for rank, (path, score) in enumerate(zip(r.paths, r.scores), 1):
            lines.append(f"  {rank:>3}  {score:.4f}  {display_path(path)}")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def run(args: argparse.Namespace) -> int:
    """Search the index and write the requested outputs."""
    from dtop.apps.index import ImageIndex
    from dtop.utils.io import write_json

    if not 1 <= args.topk <= MAX_TOPK:
        raise ConfigError(f"--topk must be from 1 to {MAX_TOPK}, got {args.topk}")
    index = ImageIndex.open(args.index)
    queries = _query_paths(args.images)
    if args.sheet:  # a sheet too large to draw is refused now, not after the search
        from dtop.report.contact_sheet import check_sheet

        check_sheet(len(queries), 1 + args.topk, args.thumb)
    post = None
    if args.post:  # a bare whiten takes the whitening saved with the index's model, as in dtop evaluate
        from dtop.engine.evaluate import post_processing_for

        post = post_processing_for(args.post, index.load_model())
    results = index.query(queries, args.topk, exact=args.exact, search_params=args.search_params,
                          batch_size=args.batch_size, num_workers=args.workers, device=args.device, amp=args.amp,
                          progress=not args.no_progress and len(queries) > 50, post=post)
    print(format_results(results))
    unreadable = [r for r in results if r.error is not None]
    if unreadable:
        listed = "; ".join(f"{display_path(r.query)}: {r.error}" for r in unreadable[:MAX_LISTED_FAILURES])
        print(f"dtop search: warning: {len(unreadable)} of {len(results)} query image(s) unreadable, searched the "
              f"others: {listed}", file=sys.stderr)
    if args.json:
        write_json(args.json, {
            "index": str(index.root.resolve()),
            "topk": args.topk,
            "engine": "torch" if args.exact or args.post or index.engine == "torch" else "faiss",
            "post": post.describe() if post is not None else [],
            "model_fingerprint": index.model_fingerprint,
            "queries": [r.to_dict() for r in results],
        })
        print(f"wrote {args.json}")
    if args.sheet:
        from dtop.report.contact_sheet import contact_sheet

        contact_sheet([r.query for r in results], [(r.paths, r.scores) for r in results], args.sheet,
                      thumb=args.thumb, exif_transpose=index.settings.exif_transpose)
        print(f"wrote {args.sheet}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``dtop search``."""
    p = subparsers.add_parser(
        "search", help="find the images of an index most similar to query images",
        description="Extract each query image (whole image) with the index's own model and settings, search "
        "the index and print a ranked list per query (rank, cosine similarity, path). Optionally write the "
        "results as JSON and a contact sheet (a PNG grid, one row per query).",
    )
    p.add_argument("--index", required=True, help="the index folder (made by `dtop index build`)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="query image files (a folder: all images in it)")
    p.add_argument("--topk", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--json", metavar="OUT.json", help="also write the results as JSON")
    p.add_argument("--sheet", metavar="OUT.png", help="also write a contact sheet of the results")
    p.add_argument("--thumb", type=int, default=160,
                   help="contact sheet thumbnail size in pixels, 32 to 1024 (default 160)")
    p.add_argument("--exact", action="store_true", help="exact search even if the index has a faiss index")
    p.add_argument("--search-params", default=None, help="faiss search parameters, e.g. nprobe=32")
    p.add_argument("--post", nargs="+", default=[], metavar="STEP",
                   help="post-processing at query time over the index's descriptors (the index is not changed), "
                   "put after the images: whiten, dba, qe, then at most one re-ranking step, diffusion or "
                   "superglobal, e.g. --post qe:k=3 superglobal:m=100. The search is then exact, and the scores "
                   "printed are those of the re-ranking step")
    add_runtime_args(p, workers=0, shard_size=False)
    p.set_defaults(func=run)
