"""Entry point of the ``dtop`` command.

Each sub-command lives in its own module ``dtop.cli.<name>`` that defines
``register(subparsers)``; the module adds its parser and sets ``func`` (a callable taking the
parsed ``argparse.Namespace`` and returning an exit status).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from dtop.errors import DtopError

# Order is the order of `dtop --help`.
COMMANDS: list[str] = [
    "info", "download", "data", "extract", "score", "evaluate", "index", "search",
    "train", "plot", "demo", "report",
]


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available sub-command."""
    parser = argparse.ArgumentParser(
        prog="dtop",
        description="DToP global descriptors for image retrieval: models, evaluation, search.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"dtop.cli.{name}").register(sub)
    return parser


class _TqdmHandler(logging.Handler):
    """Writes log records to stderr through tqdm, so that they do not break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # a broken stream must not end the run
            self.handleError(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return f"warning: {message}" if record.levelno >= logging.WARNING else message


def setup_logging(level: int = logging.INFO) -> None:
    """Route the library's ``logging`` (and Python warnings) to stderr, one line per message."""
    root = logging.getLogger("dtop")
    for handler in list(root.handlers):
        if isinstance(handler, _TqdmHandler):
            root.removeHandler(handler)
    handler = _TqdmHandler()
    handler.setFormatter(_Formatter())
    root.addHandler(handler)
    root.setLevel(level)
    # Records still propagate: the root logger has no handler in a CLI run (so nothing prints
    # twice), and test harnesses that listen on the root logger keep seeing them.
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    if not any(isinstance(h, _TqdmHandler) for h in warnings_logger.handlers):
        warnings_logger.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    """Run the ``dtop`` command line and return its exit status."""
    parser = build_parser()
    # key=value overrides may stand anywhere on the line, also after options.
    args, unknown = parser.parse_known_args(argv)
    overrides = [u for u in unknown if "=" in u and not u.startswith("-")]
    rest = [u for u in unknown if u not in overrides]
    if rest or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(rest or overrides)}")
    if overrides:
        args.overrides = list(args.overrides or []) + overrides
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    setup_logging()
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
