"""File helpers: atomic writes, versioned JSON headers, restricted unpickling.

Everything dtop writes (checkpoints, descriptor shards, manifests, JSON results) goes through
:func:`atomic_path` so that a killed process never leaves a half-written file that looks complete.
Dataset pickles are read with :func:`safe_unpickle`, which refuses every global it is not told to admit.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import pickle
import tempfile
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

from dtop.errors import DataError

MAX_PICKLE_BYTES = 1 << 30
"""Largest file :func:`safe_unpickle` reads: dataset pickles are far smaller, a larger file is the wrong one."""

NUMPY_ARRAY_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)
"""The globals a pickle of numpy arrays and scalars names (numpy 1 and numpy 2 module names)."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    The temporary file lives in the same directory (so the rename is atomic on POSIX) and is
    removed if the block raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            # mkstemp creates 0600; give the result the mode a plain open() would (shared indexes, results)
            os.chmod(tmp_path, _default_file_mode())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _default_file_mode() -> int:
    """0o666 minus the process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (NaN is written as null; ``indent=None``: one line)."""
    text = json.dumps(_nan_to_none(obj), indent=indent, sort_keys=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nan_to_none(v) for v in obj]
    return obj


def read_versioned_json(
    path: Path,
    *,
    fmt: str,
    version: int,
    required: Sequence[str],
    kind: str,
    damaged: str,
    foreign: str = "",
    outdated: str,
    text: str | None = None,
) -> dict[str, Any]:
    """Read the JSON header of an on-disk format: a dict with ``format`` = ``fmt``,
    ``format_version`` = ``version`` and every key of ``required``, else a :class:`DataError`.

    ``kind`` names the format (``"descriptor store"``); ``damaged`` says how to repair unreadable
    JSON or missing keys, ``foreign`` (may be empty) what to do with a file of another format, and
    ``outdated`` what to do with another format version. ``text``: the header when it is not the
    whole file (e.g. a safetensors metadata entry); ``path`` then names the file in messages.
    """
    try:
        header = json.loads(path.read_text() if text is None else text)
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not readable JSON ({err}); {damaged}") from err
    if not isinstance(header, dict) or header.get("format") != fmt:
        raise DataError(f"{path} is not a dtop {kind} (format must be {fmt!r}){foreign}")
    if header.get("format_version") != version:
        raise DataError(
            f"{path.parent} has {kind} format version {header.get('format_version')}; this dtop reads "
            f"{version}. {outdated}"
        )
    missing = [k for k in required if k not in header]
    if missing:
        raise DataError(f"{path} lacks the key(s) {missing}; {damaged}")
    return header


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds plain data and the admitted globals only; any other global or a persistent id is refused."""

    def __init__(self, file: io.BytesIO, source: str, allowed: Collection[tuple[str, str]], refusal: str,
                 encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self._source = source
        self._allowed = allowed
        self._refusal = refusal

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - pickle API
        if (module, name) in self._allowed:
            return _import_global(module, name)
        raise DataError(f"{self._source}: the pickle references the global '{module}.{name}', {self._refusal}")

    def persistent_load(self, pid: Any) -> Any:  # noqa: D102 - pickle API
        raise DataError(f"{self._source}: the pickle uses persistent ids, {self._refusal}")


def _import_global(module: str, name: str) -> Any:
    # numpy 2 renamed numpy.core to numpy._core: a pickle written by either loads with the other.
    if module.startswith(("numpy.core", "numpy._core")):
        np = importlib.import_module("numpy")
        module = "numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray"
    return getattr(importlib.import_module(module), name)


def safe_unpickle(
    path: str | os.PathLike,
    *,
    allowed: Collection[tuple[str, str]] = frozenset(),
    kind: str = "pickle",
    holds: str = "dicts, lists, strings and numbers",
    hint: str = "",
    encoding: str = "ASCII",
) -> Any:
    """Unpickle ``path`` admitting no global except the ``(module, name)`` pairs of ``allowed``.

    A pickle naming any other global (a class, a function such as ``os.system``) is refused with a
    :class:`DataError` before anything runs, and so are persistent ids, files over
    :data:`MAX_PICKLE_BYTES` and unreadable pickles. ``kind`` names the file in messages (``"ground-truth
    pickle"``), ``holds`` says what such a file contains, ``hint`` how to fix a refused file.
    ``encoding`` decodes Python 2 byte strings (``"latin1"`` keeps any byte).
    """
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise DataError(f"{path}: {size} bytes is far too large for a {kind}; wrong file?")
    refusal = (f"which a {kind} never needs (it holds only {holds}); it is refused because unpickling it "
               f"could run code. {hint}").rstrip()
    unpickler = _RestrictedUnpickler(io.BytesIO(path.read_bytes()), str(path), frozenset(allowed), refusal,
                                     encoding)
    try:
        return unpickler.load()
    except DataError:
        raise
    except Exception as err:  # corrupt, truncated or empty: UnpicklingError, EOFError, ValueError, ...
        raise DataError(f"{path}: not a readable {kind} ({type(err).__name__}: {err}). {hint}".rstrip()) from err
