"""Checks of a training set: is every image present on disk and decodable?"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from dtop.errors import DataError

if TYPE_CHECKING:
    from dtop.data.training import TrainingSet


def _check_one(path: str, decode: bool = True) -> tuple[str, str | None]:
    """``(status, reason)``: status ``ok``, ``missing`` or ``unreadable``."""
    if not os.path.isfile(path):
        return "missing", None
    if not decode:
        return "ok", None
    from dtop.data.images import ImageLoadError, load_image  # torch: imported when the check runs

    try:
        load_image(path)
    except ImageLoadError as err:
        return "unreadable", err.reason
    except DataError as err:
        return "unreadable", str(err)
    except Exception as err:  # never let one odd file stop the check
        return "unreadable", f"{type(err).__name__}: {err}"
    return "ok", None


def _check_chunk(args: tuple[list[str], bool]) -> list[tuple[str, str | None]]:
    paths, decode = args
    return [_check_one(p, decode) for p in paths]


def check_images(
    paths: Sequence[str], *, workers: int = 1, decode: bool = True, progress: bool = True, chunk: int = 256
) -> Iterator[tuple[int, str, str | None]]:
    """Check every path; yields ``(index, status, reason)`` (in order) for each image."""
    n = len(paths)
    chunks = [(list(paths[i:i + chunk]), decode) for i in range(0, n, chunk)]
    with tqdm(total=n, desc="check images", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        results: Iterator[list[tuple[str, str | None]]]
        if workers <= 1:
            results = map(_check_chunk, chunks)
            pool = None
        else:
            pool = ProcessPoolExecutor(max_workers=workers)
            results = pool.map(_check_chunk, chunks)
        try:
            start = 0
            for res in results:
                for k, (status, reason) in enumerate(res):
                    yield start + k, status, reason
                start += len(res)
                bar.update(len(res))
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)


def check_training_set(
    ts: TrainingSet, *, workers: int = 1, decode: bool = True, progress: bool = True
) -> dict[str, Any]:
    """Counts and the missing / unreadable images of ``ts`` as a JSON-ready dict (``ok``: none of either)."""
    missing: list[str] = []
    unreadable: list[dict[str, str]] = []
    for i, status, reason in check_images(ts.paths, workers=workers, decode=decode, progress=progress):
        if status == "missing":
            missing.append(ts.paths[i])
        elif status == "unreadable":
            unreadable.append({"path": ts.paths[i], "reason": reason or ""})
    report = ts.summary()
    report.update(
        format=None,
        root=ts.root,
        decoded=decode,
        missing=len(missing),
        unreadable=len(unreadable),
        missing_paths=missing,
        unreadable_images=unreadable,
        ok=not missing and not unreadable,
    )
    extras = {k: v for k, v in ts.extras.items() if isinstance(v, int | float | str)}
    if extras:
        report["notes"] = extras
    return report
