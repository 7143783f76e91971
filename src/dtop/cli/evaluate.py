"""``dtop evaluate``: extract → search → score on ROxford5k / RParis6k (+1M) or your own benchmark."""

from __future__ import annotations

import argparse
from pathlib import Path

from dtop.cli.common import (
    add_dataset_args,
    add_extraction_args,
    int_in,
    model_overrides,
    runtime_kwargs,
    settings_from_args,
)


def model_name(spec: str) -> str:
    """A short display name of a model spec (registered name or file stem)."""
    path = Path(spec)
    return path.stem if path.suffix in (".safetensors", ".yaml", ".yml") else spec


def run(args: argparse.Namespace) -> int:
    """Evaluate every ``--model`` and print the standard table."""
    from dtop.engine.evaluate import format_table, run_evaluation
    from dtop.engine.runtime import init_distributed
    from dtop.models import create_model

    init_distributed(args.device)
    models = []
    for spec in args.model:
        model = create_model(spec, model_overrides(args.overrides))
        models.append((model_name(spec), spec, model))
    out = Path(args.out or f"runs/evaluate/{Path(args.dataset).name}")
    payload = run_evaluation(
        models, args.data_root, args.dataset, out, cache_dir=args.cache, r1m_root=args.r1m,
        settings=settings_from_args(args), post=args.post, topk=args.topk, **runtime_kwargs(args),
    )
    print(format_table(payload["models"]))
    print(f"\nwrote {out / 'results.json'} (every setting, per-query APs) and ranks for `dtop report {out}`")
    return 0


def register(subparsers) -> None:
    """Add ``dtop evaluate``."""
    p = subparsers.add_parser(
        "evaluate", help="extract, search and score a model on a revisited benchmark (+1M)",
        description="Evaluate one or more models under the revisited protocol (Easy/Medium/Hard mAP, mP@k). "
        "Descriptor stores are cached per model and settings and reused.",
    )
    p.add_argument("--model", nargs="+", required=True,
                   help="checkpoints, config YAMLs or registered names (several: compared side by side)")
    p.add_argument("overrides", nargs="*", help="model config overrides key=value or model.key=value (configs only)")
    add_dataset_args(p, required=True)
    p.add_argument("--r1m", help="root of the revisitop1m distractors (adds the +1M results)")
    p.add_argument("--out", help="output folder (default runs/evaluate/<dataset>)")
    p.add_argument("--cache", help="descriptor cache folder (default <out>/descriptors)")
    p.add_argument("--post", nargs="*", default=[],
                   help="post-processing steps, applied in the order whiten → dba → qe, e.g. whiten qe:k=5,alpha=3. "
                   "whiten: the checkpoint's whitening; whiten:path=FILE: a whitening file (both from `dtop "
                   "whiten`); whiten:fit=database: PCA fitted on the evaluated database (transductive, marked *). "
                   "Then at most one re-ranking step of each query's top results: diffusion (k=50 graph "
                   "neighbours, trunc=10000 re-ranked, kq, alpha, gamma, ivf=N for an approximate graph) or "
                   "superglobal (m=400 re-ranked, k, kq, beta), e.g. qe:k=2 diffusion:k=50")
    p.add_argument("--topk", type=int_in(1), default=100, help="ranks kept for the report (default 100)")
    add_extraction_args(p)
    p.set_defaults(func=run)
