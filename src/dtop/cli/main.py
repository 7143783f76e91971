"""Entry point of the ``dtop`` command.

Each sub-command lives in its own module ``dtop.cli.<name>`` that defines
``register(subparsers)``; the module adds its parser and sets ``func`` (a callable taking the
parsed ``argparse.Namespace`` and returning an exit status).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

from dtop.cli.common import split_overrides
from dtop.errors import DtopError

# Order is the order of `dtop --help`.
COMMANDS: list[str] = [
    "info", "download", "data", "extract", "score", "evaluate", "whiten", "index", "search",
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


def _command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The parser of the (sub-)command that reads ``argv`` (``index build …``: the parser of build)."""
    current = parser
    for token in argv:
        subs = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            break
        if token in subs[0].choices:
            current = subs[0].choices[token]
        elif not token.startswith("-"):
            break
    return current


def parse_args(argv: list[str] | None = None) -> argparse.Namespace | None:
    """Parse a ``dtop`` command line (None: no command given, help printed); ``key=value`` overrides may
    stand anywhere on it."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    pulled: list[str] = []
    if any(a.dest == "overrides" for a in _command_parser(parser, argv)._actions):
        # taken out first: after an option of several values (--model a b) they would become its values
        argv, pulled = split_overrides(argv, _command_parser(parser, argv))
    args, unknown = parser.parse_known_args(argv)
    overrides = [u for u in unknown if "=" in u and not u.startswith("-")]
    rest = [u for u in unknown if u not in overrides]
    if rest or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(rest or overrides)}")
    if pulled or overrides:
        args.overrides = list(args.overrides or []) + pulled + overrides
    if not getattr(args, "func", None):
        parser.print_help()
        return None
    return args


#: What to do about an OS error, by errno.
_OS_HINTS = {
    errno.ENOSPC: "free disk space (or write elsewhere) and run the command again: finished work is kept",
    errno.EDQUOT: "free space within your quota (or write elsewhere) and run the command again",
    errno.EACCES: "check the permissions, or choose another location",
    errno.EPERM: "check the permissions, or choose another location",
    errno.EROFS: "the file system is read-only: choose another location",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "give a file, not a folder",
    errno.EMFILE: "too many open files: lower --workers or raise the limit (ulimit -n)",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EIO: "the disk reported an I/O error: check it, then run the command again",
}


def os_error_message(err: OSError, args: argparse.Namespace) -> str:
    """One line for an OS error: what failed, on which file, and what to do."""
    from dtop.utils.paths import show_path

    what = err.strerror or str(err) or type(err).__name__
    if err.filename is not None:
        where = f": {show_path(err.filename)}"
        if err.filename2 is not None:
            where += f" -> {show_path(err.filename2)}"
    else:  # a write error often names no file: name the command's output
        out = next((getattr(args, k) for k in ("out", "index") if getattr(args, k, None)), None)
        where = f" (while writing under {show_path(out)})" if out else ""
    hint = _OS_HINTS.get(err.errno or -1)
    return f"{what}{where}" + (f"; {hint}" if hint else "")


def main(argv: list[str] | None = None) -> int:
    """Run the ``dtop`` command line and return its exit status."""
    args = parse_args(argv)  # argparse exits with status 2 on a bad option, 0 after --help
    if args is None:
        return 1
    setup_logging()
    name = args.command
    try:
        return int(args.func(args) or 0)
    except DtopError as err:
        message = str(err)
    except OSError as err:
        message = os_error_message(err, args)
    except MemoryError:
        message = "out of memory: lower --batch-size or the image size, or free memory"
    except KeyboardInterrupt:
        print(f"dtop {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if type(err).__name__ != "SafetensorError" and "out of memory" not in str(err):
            raise  # a bug: its traceback is what a report needs
        message = " ".join(str(err).split())
        message += ("; lower --batch-size or the image size" if "out of memory" in message
                    else " (a .safetensors file could not be read or written)")
    print(f"dtop {name}: error: {' '.join(message.splitlines())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
