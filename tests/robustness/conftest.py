"""Fixtures of the robustness suite: a hostile corpus, denied access, in-process ``dtop`` runs.

The generators live in :mod:`hostile` (import them with ``from .hostile import ...``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .hostile import COMMANDS, TRIED, Corpus, make_corpus


@pytest.fixture
def corpus(tmp_path: Path) -> Corpus:
    """A fresh default corpus in ``tmp_path/photos``."""
    c = make_corpus(tmp_path / "photos")
    TRIED["corpus entries"] += c.size
    return c


@pytest.fixture
def deny_access(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], None]:
    """``deny(path)``: opening ``path`` raises PermissionError (as for a non-root user after chmod 0)."""
    import builtins

    denied: set[str] = set()
    real_open, real_os_open = builtins.open, os.open

    def check(file: object) -> None:
        if isinstance(file, str | bytes | os.PathLike) and os.path.abspath(os.fsdecode(file)) in denied:
            raise PermissionError(13, "Permission denied", os.fsdecode(file))

    def fake_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        check(file)
        return real_open(file, *args, **kwargs)

    def fake_os_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        check(path)
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    return lambda path: denied.add(os.path.abspath(path))


@dataclasses.dataclass
class CliResult:
    """Exit status and output of one ``dtop`` run."""

    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        """The ``dtop …: error:`` lines of stderr."""
        return [line for line in self.err.splitlines() if ": error: " in line]


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[..., CliResult]]:
    """``run_cli(*argv)``: run ``dtop argv`` in-process; asserts that no traceback reached stderr."""
    from dtop.cli.main import main

    def run(*argv: str | os.PathLike) -> CliResult:
        args = [os.fspath(a) for a in argv]
        COMMANDS[" ".join(["dtop", *[a for a in args[:2] if not a.startswith("-")]][:3])] += 1
        capsys.readouterr()
        try:
            code = main(args)
        except SystemExit as exit_:  # argparse errors
            code = int(exit_.code or 0)
        out, err = capsys.readouterr()
        assert "Traceback" not in err, err
        return CliResult(code, out, err)

    yield run


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    """Print how many hostile inputs and command lines the suite tried."""
    if TRIED or COMMANDS:
        terminalreporter.write_sep("-", "robustness: inputs tried and commands run")
        for kind, n in sorted(TRIED.items()):
            terminalreporter.write_line(f"{n:6d}  {kind}")
        for command, n in sorted(COMMANDS.items()):
            terminalreporter.write_line(f"{n:6d}  runs of {command}")
        terminalreporter.write_line(f"{sum(TRIED.values()):6d}  inputs in all, {len(COMMANDS)} commands")

