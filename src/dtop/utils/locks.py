"""Coordination of processes that write the same folder: an advisory file lock and UTC timestamps."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

from dtop.errors import DataError


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, busy_error: str | None = None) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on ``path`` (created if missing) for the block.

    ``busy_error=None`` waits for the lock; a message makes the lock fail fast instead: if another
    process holds it, :class:`DataError` is raised with that message. Where ``flock`` is not
    available (not POSIX, some network file systems) the block runs unlocked, so callers must
    stay correct without the lock (it only serialises, it never guards integrity alone).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    flags = fcntl.LOCK_EX if busy_error is None else fcntl.LOCK_EX | fcntl.LOCK_NB
    with open(path, "a") as f:
        try:
            fcntl.flock(f, flags)
        except BlockingIOError:
            raise DataError(busy_error) from None
        except OSError:  # file systems without flock: go on unlocked
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def utc_now() -> str:
    """The current time in UTC, ISO 8601 to the second (the timestamps dtop writes into its files)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
