"""``dtop whiten``: learn Lw on training pairs, or PCA on a separate set, for a model; write it to a file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from dtop.cli.common import add_extraction_args, add_model_args, load_cli_model, runtime_kwargs, settings_from_args
from dtop.data.formats import TRAINING_FORMATS
from dtop.errors import ConfigError

if TYPE_CHECKING:
    from dtop.models.base import RetrievalModel
    from dtop.retrieval.whitening import Whitening

EPILOG = """examples:
  dtop whiten --model best.safetensors --train data/train/retrieval-SfM-120k --format sfm120k \\
      --out lw.safetensors                       # Lw on the SfM-120k training pairs (cirtorch)
  dtop evaluate --model best.safetensors --dataset roxford5k --post whiten:path=lw.safetensors
  dtop whiten --model best.safetensors --train ... --format sfm120k --into-checkpoint best-lw.safetensors
  dtop evaluate --model best-lw.safetensors --dataset roxford5k --post whiten   # the checkpoint's whitening
  dtop whiten --model best.safetensors --images photos/ --out pca.safetensors   # PCA on other images

Use the extraction settings of the evaluation (--image-size, --scales, --config): a whitening
learned at other settings is warned about when it is used."""


def _method(args: argparse.Namespace) -> str:
    """``lw`` or ``pca``: as given, else lw for a training set and pca for images or a store."""
    sources = [name for name in ("train", "images", "store") if getattr(args, name)]
    if len(sources) != 1:
        raise ConfigError("give one source of descriptors: --train DIR --format FORMAT (pairs: Lw), "
                          "--images DIR|LIST or --store DIR (PCA)")
    method = args.method or ("lw" if args.train else "pca")
    if method == "lw" and not args.train:
        raise ConfigError("Lw is learned from matching pairs: give a training set (--train DIR --format FORMAT), "
                          "or --method pca for PCA on images or a store")
    if args.train and not args.format:
        raise ConfigError(f"--train needs --format ({', '.join(TRAINING_FORMATS)})")
    if not args.out and not args.into_checkpoint:
        raise ConfigError("say where the whitening goes: --out FILE and/or --into-checkpoint FILE")
    return method


def _learn(args: argparse.Namespace, method: str, model: RetrievalModel) -> Whitening:
    from dtop.engine import whiten

    settings = settings_from_args(args)
    target = Path(args.out or args.into_checkpoint)
    cache = args.cache or target.parent / "descriptors"
    runtime = runtime_kwargs(args)
    if args.store:
        return whiten.learn_pca_from_store(model, args.store, settings, dim=args.dim, shrinkage=args.shrinkage,
                                           eps=args.eps)
    if args.images:
        from dtop.data.folders import read_image_list

        images = list(read_image_list(args.images))
        images = images[: args.max_images] if args.max_images else images
        return whiten.learn_pca(model, images, cache, settings, name=Path(args.images).name, dim=args.dim,
                                shrinkage=args.shrinkage, eps=args.eps, **runtime)
    from dtop.data.training import load_training_set

    training_set = load_training_set(args.format, args.train, csv_path=args.csv, split=args.split)
    if method == "lw":
        return whiten.learn_lw(model, training_set, cache, settings, dim=args.dim, eps=args.eps,
                               max_pairs=args.max_pairs, seed=args.seed, **runtime)
    paths = training_set.paths[: args.max_images] if args.max_images else training_set.paths
    return whiten.learn_pca(model, paths, cache, settings, name=training_set.name, dim=args.dim,
                            shrinkage=args.shrinkage, eps=args.eps, **runtime)


def run(args: argparse.Namespace) -> int:
    """Learn the whitening and write the file and/or the checkpoint copy."""
    from dtop.engine.runtime import init_distributed
    from dtop.engine.whiten import save_with_whitening
    from dtop.retrieval.whitening import save_whitening

    method = _method(args)
    runtime = init_distributed(args.device)
    model = load_cli_model(args)
    whitening = _learn(args, method, model)
    if runtime.rank != 0:
        return 0
    source = whitening.info.get("source", {})
    pairs = f", {whitening.info['num_pairs']} pairs" if "num_pairs" in whitening.info else ""
    print(f"{whitening.kind} whitening {whitening.input_dim} -> {whitening.output_dim} learned on "
          f"{whitening.info.get('fitted_on')} ({whitening.info.get('num_descriptors')} descriptors{pairs}"
          + (f", {source['pairs_left_out']} pairs with unreadable images left out" if source.get("pairs_left_out")
             else "") + ")")
    if args.out:
        save_whitening(whitening, args.out)
        print(f"wrote {args.out}; use it with: dtop evaluate --model {args.model} ... --post whiten:path={args.out}")
    if args.into_checkpoint:
        model_file = Path(args.model)
        source_ckpt = model_file if model_file.suffix == ".safetensors" and model_file.is_file() else None
        save_with_whitening(model, whitening, args.into_checkpoint, source=source_ckpt)
        print(f"wrote {args.into_checkpoint} (the model with this whitening); use it with: "
              f"dtop evaluate --model {args.into_checkpoint} ... --post whiten")
    return 0


def register(subparsers) -> None:
    """Add ``dtop whiten``."""
    p = subparsers.add_parser(
        "whiten", help="learn a whitening (Lw on training pairs, or PCA) for a model",
        description="Learn a whitening for a model from images that are not evaluated: Lw (Radenovic et al.)\n"
        "on the (query, positive) pairs of a training set (SfM-120k's own pairs; for other sets each\n"
        "image with the next image of its class), or PCA on a separate image set or descriptor store.\n"
        "Descriptors are extracted with the evaluation's settings into cached, resumable stores.\n"
        "Writes a whitening file for `--post whiten:path=FILE` and/or a copy of the checkpoint that\n"
        "carries it (`--post whiten`).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    src = p.add_argument_group("descriptors to learn from (one)")
    src.add_argument("--train", metavar="DIR", help="a training set (or the CSV file of format csv): Lw on its pairs")
    src.add_argument("--format", choices=list(TRAINING_FORMATS), help="training-set format of --train")
    src.add_argument("--csv", default=None, help="CSV file of path,label (format csv; default: --train)")
    src.add_argument("--split", default="train", help="SfM-120k split: train or val (default train)")
    src.add_argument("--images", metavar="DIR|LIST", help="an image folder or list: PCA on its descriptors")
    src.add_argument("--store", metavar="DIR", help="a descriptor store of this model (dtop extract): PCA on it")
    w = p.add_argument_group("whitening")
    w.add_argument("--method", choices=["lw", "pca"], default=None,
                   help="lw (needs pairs: --train) or pca (default: lw for --train, pca otherwise)")
    w.add_argument("--dim", type=int, default=None, help="output dimension (default: all)")
    w.add_argument("--eps", type=float, default=1e-6, help="relative regularisation of the covariance (default 1e-6)")
    w.add_argument("--shrinkage", type=float, default=0.0, help="pca: shrink the spectrum towards isotropy (0..1)")
    w.add_argument("--max-pairs", type=int, default=None, help="lw: at most this many pairs, drawn with --seed")
    w.add_argument("--max-images", type=int, default=None, help="pca: the first N images only")
    w.add_argument("--seed", type=int, default=0, help="seed of the --max-pairs draw (default 0)")
    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="FILE", help="whitening file to write (.safetensors)")
    out.add_argument("--into-checkpoint", metavar="FILE",
                     help="also write a copy of the model checkpoint carrying the whitening")
    out.add_argument("--cache", help="descriptor cache folder (default: descriptors/ beside the output)")
    add_extraction_args(p)
    p.set_defaults(func=run)
