"""``dtop score``: revisited-protocol mAP and mP@k of ranked lists or of descriptors.

Two inputs:

- ``--ranks RANKS.npy``: int array ``(n_ranked, n_queries)``, 0-based database indices, best
  first (the revisitop/cirtorch layout); indices ``>= len(imlist)`` are distractors.
- ``--queries Q.npy --database X.npy [--distractors D.npy]``: L2-normalised descriptors (one row
  per image, queries in ``qimlist`` order, database in ``imlist`` order); images are ranked by
  cosine similarity, without sorting the collection (exact, fast at +1M).

Prints mAP and mP@k in % (two decimals) per protocol; ``--json`` writes
``{"easy"|"medium"|"hard": {"map", "mp", "aps"}}`` with fractions.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np

from dtop.data.gnd import DEFAULT_KAPPAS, GroundTruth, load_gnd
from dtop.errors import DataError
from dtop.utils.io import write_json

NORM_TOLERANCE = 1e-2
_CHECK_ROWS = 1 << 16


def register(subparsers: Any) -> None:
    """Add the ``score`` sub-command to the ``dtop`` parser."""
    p = subparsers.add_parser(
        "score",
        help="mAP / mP@k (revisited protocol) of ranks or descriptors",
        description=(
            "Score retrieval results with the revisited Oxford/Paris protocol (easy, medium, hard): "
            "mAP and mean precision at k, exactly as the reference code (revisitop). Give either ranked "
            "lists (--ranks) or descriptors (--queries and --database, optionally --distractors)."
        ),
    )
    p.add_argument("--gnd", required=True, type=Path, help="ground truth: gnd_<dataset>.pkl or its .json form")
    p.add_argument(
        "--ranks",
        type=Path,
        help="ranked lists: .npy int array (n_ranked, n_queries), 0-based, best first; "
        "indices >= len(imlist) are distractors",
    )
    p.add_argument("--queries", type=Path, help="query descriptors .npy (n_queries, dim), L2-normalised rows")
    p.add_argument("--database", type=Path, help="database descriptors .npy (len(imlist), dim), imlist order")
    p.add_argument("--distractors", type=Path, help="distractor descriptors .npy (n, dim), e.g. R1M")
    p.add_argument(
        "--kappas", type=int, nargs="+", default=list(DEFAULT_KAPPAS), metavar="K", help="k of mP@k (default 1 5 10)"
    )
    p.add_argument("--json", type=Path, metavar="OUT.json", help="also write the results as JSON")
    p.add_argument("--device", default=None, help="device for descriptor scoring (default cpu)")
    p.add_argument("--chunk-size", type=int, default=None, help="database rows scored at once (default: automatic)")
    p.set_defaults(func=run)


def _load_npy(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: cannot read {what} as a .npy array ({err}); save it with numpy.save") from err


def _check_unique(ranks: np.ndarray) -> None:
    """Each query's ranked list must name every image at most once (sorted, so any index size works)."""
    ordered = np.sort(ranks, axis=0)
    repeated = ordered[1:] == ordered[:-1]
    if not repeated.any():
        return
    q = int(np.flatnonzero(repeated.any(axis=0))[0])
    dup = ordered[1:, q][repeated[:, q]][0]
    raise DataError(
        f"the ranked list of query {q} contains image {int(dup)} {int(np.count_nonzero(ranks[:, q] == dup))} "
        "times; each column of --ranks must list distinct database indices"
    )


def _check_descriptors(x: np.ndarray, what: str, rows: int | None, dim: int | None) -> None:
    if x.ndim != 2:
        raise DataError(f"{what} must be a 2-D array (n, dim), got shape {x.shape}")
    if x.dtype.kind != "f":
        raise DataError(f"{what} must hold floating-point descriptors, got dtype {x.dtype}")
    if rows is not None and x.shape[0] != rows:
        raise DataError(f"{what} has {x.shape[0]} rows but the ground truth needs {rows} (one per image, in order)")
    if dim is not None and x.shape[1] != dim:
        raise DataError(f"{what} has dimension {x.shape[1]} but the queries have {dim}; use the same model")
    for start in range(0, x.shape[0], _CHECK_ROWS):
        block = np.asarray(x[start : start + _CHECK_ROWS], dtype=np.float32)
        if not np.isfinite(block).all():
            bad = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise DataError(f"{what}: row {bad} contains NaN or infinity")
        norms = np.linalg.norm(block, axis=1)
        off = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOLERANCE)
        if off.size:
            bad = start + int(off[0])
            raise DataError(
                f"{what}: row {bad} has L2 norm {norms[off[0]]:.4g}, not 1; scoring uses cosine similarity, "
                "so L2-normalise the rows first (x / np.linalg.norm(x, axis=1, keepdims=True))"
            )


def _score_ranks(args: argparse.Namespace, gnd: GroundTruth) -> tuple[dict[str, Any], str]:
    from dtop.retrieval.metrics import check_ranks, evaluate

    ranks = _load_npy(args.ranks, "ranks")
    ranks = check_ranks(ranks, gnd.n_queries)
    ranks = np.asarray(ranks)
    _check_unique(ranks)
    n_ranked = ranks.shape[0]
    extra = int(ranks.max()) + 1 - gnd.n_database
    info = f"ranks {n_ranked:,} per query"
    if extra > 0:
        info += f" (indices up to {int(ranks.max()):,}: >= {gnd.n_database:,} count as distractors)"
    return evaluate(ranks, gnd, args.kappas), info


def _score_descriptors(args: argparse.Namespace, gnd: GroundTruth) -> tuple[dict[str, Any], str]:
    from dtop.retrieval.metrics import evaluate_scores
    from dtop.retrieval.search import iter_scores

    if args.database is None:
        raise DataError("--queries needs --database (the descriptors of the imlist images)")
    q = _load_npy(args.queries, "query descriptors")
    _check_descriptors(q, f"--queries {args.queries}", gnd.n_queries, None)
    dim = int(q.shape[1])
    x = _load_npy(args.database, "database descriptors")
    _check_descriptors(x, f"--database {args.database}", gnd.n_database, dim)
    parts = [x]
    info = f"descriptors dim {dim}, {gnd.n_database:,} database images"
    if args.distractors is not None:
        d = _load_npy(args.distractors, "distractor descriptors")
        _check_descriptors(d, f"--distractors {args.distractors}", None, dim)
        if d.shape[0]:
            parts.append(d)
        info += f" + {d.shape[0]:,} distractors"
    blocks = iter_scores(np.asarray(q), parts, chunk_size=args.chunk_size, device=args.device)
    return evaluate_scores(blocks, gnd, args.kappas), info + ", cosine similarity"


def run(args: argparse.Namespace) -> int:
    """Score ranks or descriptors against a ground truth; print a table, optionally write JSON."""
    from dtop.retrieval.metrics import format_results  # torch: imported when the command runs

    if args.ranks is not None and (args.queries is not None or args.database is not None):
        raise DataError("give either --ranks or --queries/--database, not both")
    if args.ranks is None and args.queries is None:
        raise DataError("nothing to score: give --ranks RANKS.npy, or --queries Q.npy --database X.npy")
    if args.ranks is None and args.distractors is not None and args.queries is None:
        raise DataError("--distractors needs --queries and --database")
    if any(k < 1 for k in args.kappas):
        raise DataError(f"--kappas must be positive integers, got {args.kappas}")
    if args.json is not None and args.json.is_dir():
        raise DataError(f"--json {args.json} is a directory; give a file name such as results.json")
    gnd = load_gnd(args.gnd)
    if gnd.n_queries == 0:
        raise DataError(f"{args.gnd}: the ground truth has no queries, so there is nothing to score; check the file")
    if args.ranks is not None:
        results, info = _score_ranks(args, gnd)
    else:
        results, info = _score_descriptors(args, gnd)
    title = f"{gnd.name or os.fspath(args.gnd)}: {gnd.n_queries} queries, {info}"
    print(format_results(results, title=title))
    if args.json is not None:
        write_json(args.json, results)
        print(f"results written to {args.json}")
    return 0
