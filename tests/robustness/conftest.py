"""Fixtures of the robustness suite: a hostile corpus, denied access, in-process ``dtop`` runs.

The generators live in :mod:`hostile` (import them with ``from .hostile import ...``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from .hostile import COMMANDS, TRIED, CliResult, Corpus, make_corpus, run_dtop


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


@pytest.fixture
def run_cli() -> Callable[..., CliResult]:
    """``run_cli(*argv)``: run ``dtop argv`` in-process (see :func:`hostile.run_dtop`)."""
    return run_dtop


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    """Print how many hostile inputs and command lines the suite tried."""
    if TRIED or COMMANDS:
        terminalreporter.write_sep("-", "robustness: inputs tried and commands run")
        for kind, n in sorted(TRIED.items()):
            terminalreporter.write_line(f"{n:6d}  {kind}")
        for command, n in sorted(COMMANDS.items()):
            terminalreporter.write_line(f"{n:6d}  runs of {command}")
        terminalreporter.write_line(f"{sum(TRIED.values()):6d}  inputs in all, {len(COMMANDS)} commands")

