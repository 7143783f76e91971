"""Options shared by the sub-commands that run a model over images."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, get_args

from dtop.engine.settings import (
    RUNTIME_RANGES,
    Amp,
    ExtractSettings,
    ScalePool,
    StorageDtype,
    load_extract_settings,
)
from dtop.errors import ConfigError

if TYPE_CHECKING:
    from dtop.data.revisited import RevisitedDataset
    from dtop.models.base import RetrievalModel

#: A ``key=value`` config override: a dotted name, then ``=`` (``qe:k=5`` or ``runs/lr=0.1/x`` are not).
OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer from ``low`` to ``high`` (refused before any work)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number greater than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number greater than 0, got {text}")
    return value


def parse_size(text: str, *, min_height: int = 16, min_width: int = 16, option: str = "--size") -> tuple[int, int]:
    """Parse a ``--size`` value, ``HxW`` (height first) or a single number for a square, into (height, width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or parts[0] < min_height or parts[1] < min_width:
        raise ConfigError(f"{option} must be HxW (height x width) with at least {min_height}x{min_width} pixels, "
                          f"e.g. 512x384; got {text!r}")
    return parts[0], parts[1]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model`` and config overrides."""
    p.add_argument("--model", required=True,
                   help="a checkpoint (.safetensors), a model config YAML or a registered name (dtop info --list)")
    p.add_argument("overrides", nargs="*", help="model config overrides key=value or model.key=value (configs only)")


def split_overrides(argv: Sequence[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """``(argv without overrides, overrides)``: every ``key=value`` that is not the value of an option.

    An override after an option of several values (``--model a b key=value``, ``--scales 1 2 key=value``)
    would otherwise be taken for one of them; the value of a one-value option (``--search-params
    nprobe=16``) stays where it is.
    """
    options = {o: a for a in parser._actions for o in a.option_strings}
    rest: list[str] = []
    overrides: list[str] = []
    takes_value = False
    for i, token in enumerate(argv):
        if token == "--":
            rest.extend(argv[i:])
            break
        if takes_value:
            rest.append(token)
            takes_value = False
        elif token.startswith("-") and len(token) > 1:
            name = token.split("=", 1)[0]
            matches = [a for o, a in options.items() if o == name] or \
                [a for o, a in options.items() if o.startswith(name) and name.startswith("--")]
            action = matches[0] if len({id(a) for a in matches}) == 1 else None
            takes_value = action is not None and "=" not in token and action.nargs in (None, 1)
            rest.append(token)
        elif OVERRIDE.match(token):
            overrides.append(token)
        else:
            rest.append(token)
    return rest, overrides


def model_overrides(overrides: Sequence[str] | None) -> list[str]:
    """Model-config overrides as the model commands take them: ``dim=256`` or, as in training configs
    and hints, ``model.dim=256``."""
    return [o[len("model."):] if o.startswith("model.") else o for o in overrides or []]


def add_dataset_args(g: argparse._ActionsContainer, required: bool) -> None:
    """``--dataset`` and ``--data-root``, with one rule for every command that reads a revisited dataset."""
    g.add_argument("--dataset", required=required,
                   help="roxford5k | rparis6k (found under --data-root) | path of a revisited-format folder")
    g.add_argument("--data-root", default=".",
                   help="folder holding roxford5k/ and rparis6k/ (default: the current folder; not needed "
                   "when --dataset is a path)")


def open_dataset(args: argparse.Namespace) -> RevisitedDataset:
    """The revisited dataset of ``--dataset`` / ``--data-root``."""
    from dtop.data.revisited import RevisitedDataset

    return RevisitedDataset(args.data_root, args.dataset)


def add_extraction_args(p: argparse.ArgumentParser) -> None:
    """Multi-scale extraction settings (a YAML file and options over it) and runtime options."""
    g = p.add_argument_group("extraction")
    defaults = ExtractSettings()
    # None = not given: the --config file's value, else the default, applies
    g.add_argument("--config", dest="extract_config", metavar="YAML",
                   help="extraction settings file (image_size, scales, dtype, exif_transpose, scale_pool); "
                   "the options below override it")
    g.add_argument("--image-size", type=int, default=None,
                   help=f"longer side at scale 1 (default {defaults.image_size})")
    g.add_argument("--scales", type=float, nargs="+", default=None,
                   help="scales averaged into one descriptor (default 1/√2 1 √2)")
    g.add_argument("--scale-pool", choices=get_args(ScalePool), default=None,
                   help="how scales are combined: mean, power (cirtorch's power mean with the GeM exponent; "
                   "GeM models without a projection) or auto (default: power for those, as cirtorch; else mean)")
    g.add_argument("--dtype", choices=get_args(StorageDtype), default=None,
                   help=f"storage precision (default {defaults.dtype})")
    g.add_argument("--exif-transpose", action=argparse.BooleanOptionalAction, default=None,
                   help="apply EXIF orientation (phone photos; default off)")
    g.add_argument("--batch-size", type=int_in(*RUNTIME_RANGES["batch_size"]), default=None,
                   help="images per forward pass (per size bucket; default 1 on a CPU, 8 on a GPU)")
    g.add_argument("--workers", type=int_in(*RUNTIME_RANGES["num_workers"]), default=None,
                   help="decoding workers (default on a CPU: 0 on 2 cores or fewer, else 1, torch threads on "
                   "the other cores; 4 on a GPU)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model, dynamic shapes (minutes of compiling; for long GPU runs)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--amp", choices=get_args(Amp), default="auto", help="autocast (auto: bf16 on CUDA, off on CPU)")
    g.add_argument("--shard-size", type=int_in(*RUNTIME_RANGES["shard_size"]), default=1000,
                   help="images per store shard (resume granularity)")
    g.add_argument("--skip-bad", action="store_true", help="leave unreadable images out instead of failing")
    g.add_argument("--overwrite", action="store_true", help="replace a store made with another model/settings")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def settings_from_args(args: argparse.Namespace) -> ExtractSettings:
    """The extraction settings of ``--config`` (or the defaults) with the options given over them."""
    settings = load_extract_settings(args.extract_config)
    given = {"image_size": args.image_size, "scales": args.scales, "dtype": args.dtype,
             "exif_transpose": args.exif_transpose, "scale_pool": args.scale_pool}
    return dataclasses.replace(settings, **{k: v for k, v in given.items() if v is not None})


def runtime_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`dtop.engine.extract.extract_to_store` from the parsed options."""
    from dtop.engine.runtime import Acceleration  # torch: imported when the command runs

    return dict(acceleration=Acceleration(compile=True) if args.compile else None,
                batch_size=args.batch_size, num_workers=args.workers, device=args.device, amp=args.amp,
                skip_bad=args.skip_bad, shard_size=args.shard_size, overwrite=args.overwrite,
                progress=not args.no_progress)


def load_cli_model(args: argparse.Namespace) -> RetrievalModel:
    """The model named by ``--model`` (with overrides)."""
    from dtop.models import create_model

    return create_model(args.model, model_overrides(args.overrides))
