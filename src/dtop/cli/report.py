"""``dtop report``: a self-contained HTML report (tables, top-k grids, heatmaps, curves) of an evaluation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtop.cli.common import int_in

if TYPE_CHECKING:
    import torch

    from dtop.models.base import RetrievalModel


def _device(name: str) -> torch.device:
    from dtop.engine.runtime import resolve_device

    return resolve_device(name)


def _heatmap_models(args: argparse.Namespace) -> list[tuple[str, RetrievalModel]] | None:
    """(name, model) pairs for ``--heatmaps``; without values, the evaluated models' specs."""
    if args.heatmaps is None:
        return None
    from dtop.cli.evaluate import model_name
    from dtop.errors import DtopError
    from dtop.models import create_model

    specs: list[tuple[str, str, bool]] = [(model_name(s), s, True) for s in args.heatmaps]
    if not specs:  # `--heatmaps` alone: the models recorded in results.json
        from dtop.report import load_results

        specs = [(e["name"], str(e.get("spec") or e["name"]), False) for e in load_results(args.eval_dir)["models"]]
    device = _device(args.device)
    out = []
    for name, spec, explicit in specs:
        try:
            model = create_model(spec, [])
        except DtopError as err:
            if explicit:
                raise
            print(f"dtop report: note: no heatmaps for {name}: {err}", file=sys.stderr)
            continue
        out.append((name, model.to(device).eval()))
    return out


def run(args: argparse.Namespace) -> int:
    """Build the report and print where it is."""
    from dtop.report import build_report

    models = _heatmap_models(args)
    index = build_report(
        args.eval_dir, args.out, topk=args.topk, heatmap_models=models, variant=args.variant,
        max_queries=args.max_queries, thumb_size=args.thumb_size, heatmap_size=args.heatmap_size,
        progress=not args.no_progress,
    )
    print(f"wrote {index} (open it in a browser; the folder {Path(index).parent} is self-contained)")
    return 0


def register(subparsers: Any) -> None:
    """Add ``dtop report``."""
    p = subparsers.add_parser(
        "report", help="HTML report of an evaluation: results table, top-k per query, heatmaps, training curves",
        description="Write a self-contained HTML report (index.html + assets/, no JavaScript, opens offline) of "
        "the output folder of `dtop evaluate`: mAP/mP@k per dataset variant for every model, each query with its "
        "bbx and top-k retrieved images coloured by ground truth, attention heatmaps of given models, and the "
        "training curves of models trained by `dtop train`.",
    )
    p.add_argument("eval_dir", help="output folder of `dtop evaluate` (holds results.json and the ranks)")
    p.add_argument("--out", help="report folder (default <eval_dir>/report)")
    p.add_argument("--topk", type=int_in(1), default=10, help="retrieved images shown per query and model (default 10)")
    p.add_argument("--heatmaps", nargs="*", metavar="MODEL", default=None,
                   help="checkpoints or registered config names whose attention on each query is shown; "
                   "given without MODEL: the evaluated models (their spec in results.json)")
    p.add_argument("--variant", help="dataset variant whose ranks are shown per query (default: without +1M)")
    p.add_argument("--max-queries", type=int_in(1), help="show only the first N queries")
    p.add_argument("--thumb-size", type=int_in(16, 1024), default=144,
                   help="thumbnail longer side in pixels (default 144)")
    p.add_argument("--heatmap-size", type=int_in(16, 4096),
                   help="model input longer side for heatmaps (default: the evaluation's, at most 512)")
    p.add_argument("--device", default="cpu", help="device for heatmap models: cpu | cuda | cuda:N | auto")
    p.add_argument("--no-progress", action="store_true", help="no progress messages")
    p.set_defaults(func=run)
