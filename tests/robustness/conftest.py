"""Fixtures of the robustness suite: a hostile corpus, denied access, in-process ``dtop`` runs.

The generators live in :mod:`hostile` (import them with ``from .hostile import ...``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from .hostile import COMMANDS, TRIED, CliResult, Corpus, build_index, encode, make_corpus, run_dtop, texture


@pytest.fixture
def corpus(tmp_path: Path) -> Corpus:
    """A fresh default corpus in ``tmp_path/photos``."""
    c = make_corpus(tmp_path / "photos")
    TRIED["corpus entries"] += c.size
    return c


@pytest.fixture
def deny_access(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], None]:
    """``deny(path)``: opening ``path`` raises PermissionError (as for a non-root user after chmod 0)."""
    return lambda path: deny(monkeypatch, [path], [])


@pytest.fixture
def run_cli() -> Callable[..., CliResult]:
    """``run_cli(*argv)``: run ``dtop argv`` in-process (see :func:`hostile.run_dtop`)."""
    return run_dtop


@pytest.fixture(scope="session")
def hostile(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A corpus with a linked folder of photos outside it, the damaged DDS of the issue, a file the user
    may not read and a sub-folder that cannot be listed, indexed once (a build costs seconds)."""
    root = tmp_path_factory.mktemp("hostile")
    corpus = make_corpus(root / "photos")
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    for i in range(2):
        texture(200 + i).save(elsewhere / f"linked{i}.jpg")
    (corpus.root / "linked-folder").symlink_to(elsewhere, target_is_directory=True)
    linked = [corpus.root / "linked-folder" / f"linked{i}.jpg" for i in range(2)]
    dds = encode(texture(0, (16, 16)), "DDS")
    (corpus.root / "corrupt-dds.jpg").write_bytes(dds[:80] + bytes(4) + dds[84:])  # PIL: NotImplementedError
    corpus.bad.append(corpus.root / "corrupt-dds.jpg")
    (corpus.root / "private").mkdir()
    texture(7).save(corpus.root / "private" / "hidden-by-permissions.jpg")
    locked = corpus.root / "locked.jpg"
    if not locked.exists():
        texture(8).save(locked)
        corpus.bad.append(locked)
    with pytest.MonkeyPatch.context() as mp:
        deny(mp, [locked], folders=[corpus.root / "private"])
        result = build_index(corpus.root, root / "ix")
    TRIED["corpus entries (index build)"] += corpus.size + 5
    return corpus, root / "ix", result, linked


def deny(mp: pytest.MonkeyPatch, files: list[Path], folders: list[Path]) -> None:
    """Opening ``files`` and listing ``folders`` raise PermissionError (as for a user without the rights;
    the tests may run as root, who reads everything)."""
    import builtins

    names = {os.path.abspath(p) for p in files}
    dirs = {os.path.abspath(p) for p in folders}
    real_open, real_os_open, real_scandir = builtins.open, os.open, os.scandir

    def check(path: object, which: set[str]) -> None:
        if isinstance(path, str | bytes | os.PathLike) and os.path.abspath(os.fsdecode(path)) in which:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))

    mp.setattr(builtins, "open", lambda f, *a, **k: (check(f, names), real_open(f, *a, **k))[1])
    mp.setattr(os, "open", lambda f, *a, **k: (check(f, names), real_os_open(f, *a, **k))[1])
    mp.setattr(os, "scandir", lambda p=".": (check(p, dirs), real_scandir(p))[1])


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    """Print how many hostile inputs and command lines the suite tried."""
    if TRIED or COMMANDS:
        terminalreporter.write_sep("-", "robustness: inputs tried and commands run")
        for kind, n in sorted(TRIED.items()):
            terminalreporter.write_line(f"{n:6d}  {kind}")
        for command, n in sorted(COMMANDS.items()):
            terminalreporter.write_line(f"{n:6d}  runs of {command}")
        terminalreporter.write_line(f"{sum(TRIED.values()):6d}  inputs in all, {len(COMMANDS)} commands")

