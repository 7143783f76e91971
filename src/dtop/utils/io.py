"""Atomic writes: an output either exists complete or not at all.

Everything dtop writes (checkpoints, descriptor shards, manifests, JSON results) goes through
:func:`atomic_path` so that a killed process never leaves a half-written file that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


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


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (NaN is written as null)."""
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
) -> dict[str, Any]:
    """Read the JSON header of an on-disk format: a dict with ``format`` = ``fmt``,
    ``format_version`` = ``version`` and every key of ``required``, else a :class:`DataError`.

    ``kind`` names the format (``"descriptor store"``); ``damaged`` says how to repair unreadable
    JSON or missing keys, ``foreign`` (may be empty) what to do with a file of another format, and
    ``outdated`` what to do with another format version.
    """
    from dtop.errors import DataError

    try:
        header = json.loads(path.read_text())
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
