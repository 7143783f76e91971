"""Entry point of the ``dtop`` command.

Each sub-command lives in its own module ``dtop.cli.<name>`` that defines
``register(subparsers)``; the module adds its parser and sets ``func`` (a callable taking the
parsed ``argparse.Namespace`` and returning an exit status).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dtop.errors import DtopError

# Order is the order of `dtop --help`.
COMMANDS: list[str] = ["info", "download", "extract", "score", "evaluate", "index", "search"]


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available sub-command."""
    parser = argparse.ArgumentParser(
        prog="dtop",
        description="DToP global descriptors for image retrieval: models, evaluation, search.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"dtop.cli.{name}")
        except ModuleNotFoundError as err:  # a sub-command not written yet
            if err.name == f"dtop.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``dtop`` command line and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except DtopError as err:
        print(f"dtop {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dtop {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
