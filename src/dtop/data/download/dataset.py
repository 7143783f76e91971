"""Downloading a whole dataset: its index, its archives, the check that every image is there, the marker."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dtop.data.download.archive import extract_archive
from dtop.data.download.catalogue import (
    CATALOGUE,
    INDEX_KINDS,
    DatasetSource,
    Resource,
    expected_images,
    md5_resource,
    parse_md5_file,
    resource_url,
)
from dtop.data.download.errors import CorruptArchiveError, DownloadError
from dtop.data.download.fetching import fetch
from dtop.errors import DataError
from dtop.utils.io import write_json

log = logging.getLogger(__name__)

MARKER_NAME = ".dtop_download.json"
"""File written into a dataset folder once its download is complete and verified."""


@dataclass
class DownloadReport:
    """What :func:`download_dataset` did."""

    name: str
    root: Path
    already_complete: bool = False
    downloaded: list[str] = field(default_factory=list)
    extracted: list[str] = field(default_factory=list)
    n_images: int = 0



def _present(jpg_dir: Path) -> set[str]:
    """Relative POSIX paths of all files under ``jpg_dir``."""
    out: set[str] = set()
    if not jpg_dir.is_dir():
        return out
    base = len(str(jpg_dir)) + 1
    for dirpath, _dirnames, filenames in os.walk(jpg_dir):
        prefix = dirpath[base:].replace(os.sep, "/")
        for f in filenames:
            out.add(f"{prefix}/{f}" if prefix else f)
    return out


def _first(names: Iterable[str], k: int = 5) -> str:
    items = sorted(names)
    head = ", ".join(items[:k])
    return head + (f", ... ({len(items) - k} more)" if len(items) > k else "")


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}



class _DatasetDownload:
    """One run of :func:`download_dataset`: the dataset's folders, the options and the report."""

    def __init__(self, source: DatasetSource, root: Path, *, base_url: str | None, keep_archives: bool,
                 progress: bool, retries: int, timeout: float, backoff: float) -> None:
        self.source = source
        self.ds_dir = root / source.directory
        self.dl_dir = self.ds_dir / ".download"
        self.jpg_dir = self.ds_dir / source.image_dir
        self.marker = self.ds_dir / MARKER_NAME
        self.state_path = self.dl_dir / "state.json"
        self.report = DownloadReport(name=source.name, root=root)
        self.base_url = base_url
        self.keep_archives = keep_archives
        self.progress = progress
        self.retries, self.timeout, self.backoff = retries, timeout, backoff
        self.extracted: list[str] = []  # archives extracted so far (kept in state.json across runs)

    def get(self, resource: Resource, dest: Path, validate: Callable[[Path], None] | None = None) -> Path:
        """``dest``, downloaded (and verified) unless it exists."""
        if not dest.exists():
            md5 = self.published_md5(resource) if resource.md5_url else resource.md5
            url = resource_url(self.source, resource, self.base_url)
            log.info("%s: downloading %s", self.source.name, url)
            fetch(url, dest, md5=md5, validate=validate, retries=self.retries, timeout=self.timeout,
                  backoff=self.backoff, progress=self.progress)
            self.report.downloaded.append(resource.filename)
        return dest

    def published_md5(self, resource: Resource) -> str | None:
        """The md5 of ``resource``: from the md5 file published next to it (fetched first), else the recorded one."""
        md5_res = md5_resource(resource)
        if md5_res is None:
            return resource.md5
        md5_path = self.dl_dir / md5_res.filename

        def check_md5(p: Path) -> None:
            parse_md5_file(p.read_text(errors="replace"), resource.filename, str(p))

        self.get(md5_res, md5_path, check_md5)
        return parse_md5_file(md5_path.read_text(errors="replace"), resource.filename, str(md5_path))

    def fetch_index(self) -> tuple[Resource, set[str]]:
        """The index (ground truth, image list, SfM-120k pickle or train_clean.csv) and the images it names."""
        source = self.source
        index = next((r for r in source.resources if r.kind in INDEX_KINDS), None)
        if index is None:
            raise DataError(f"{source.name}: the catalogue entry has no ground truth or image list")
        index_path = self.ds_dir / index.filename

        def check_index(p: Path) -> None:
            found = expected_images(index.kind, p)
            if index.kind == "list" and source.expected_images is not None and len(found) != source.expected_images:
                raise DataError(f"the list has {len(found)} images, expected {source.expected_images}")

        self.get(index, index_path, check_index)
        expected = set(expected_images(index.kind, index_path))
        if source.expected_images is not None and len(expected) != source.expected_images:
            raise DataError(
                f"{index_path}: lists {len(expected)} distinct images, {source.name} has "
                f"{source.expected_images}; delete the file and run the command again"
            )
        return index, expected

    def is_complete(self, expected: set[str]) -> bool:
        """Whether an earlier run finished and every image is still there (else the marker goes)."""
        if not self.marker.exists():
            return False
        missing = expected - _present(self.jpg_dir)
        if not missing:
            log.info("%s: already complete in %s (%d images); nothing to do", self.source.name, self.ds_dir,
                     len(expected))
            self.report.already_complete = True
            self.report.n_images = len(expected)
            return True
        log.info("%s: %d images went missing since the download; fetching them again", self.source.name,
                 len(missing))
        self.marker.unlink()
        return False

    def extract_missing(self, expected: set[str]) -> set[str]:
        """Extract the archives not extracted yet, then the earlier ones if images are still missing."""
        missing = expected - _present(self.jpg_dir)
        if not missing:
            return missing
        self.extracted = list(_read_state(self.state_path).get("extracted", []))
        archives = list(self.source.archives)
        earlier = [a for a in archives if a.filename in self.extracted]
        for resource in archives:
            if resource.filename not in self.extracted:
                self.extract(resource, expected)
        missing = expected - _present(self.jpg_dir)
        if missing and earlier:
            log.info("%s: %d images still missing; extracting the earlier archives again", self.source.name,
                     len(missing))
            self.extracted.clear()
            for resource in earlier:
                self.extract(resource, expected)
            missing = expected - _present(self.jpg_dir)
        return missing

    def extract(self, resource: Resource, expected: set[str]) -> None:
        """Download one archive, extract the expected images, record it, delete it (unless kept)."""
        archive_path = self.dl_dir / resource.filename
        self.get(resource, archive_path)
        log.info("%s: extracting %s", self.source.name, resource.filename)
        try:
            written, skipped = extract_archive(archive_path, self.jpg_dir, expected,
                                               staging_dir=self.dl_dir / "staging", progress=self.progress)
        except CorruptArchiveError as err:
            archive_path.unlink(missing_ok=True)
            raise DownloadError(f"{err}; deleted it, run the command again to download it afresh") from err
        note = f", skipped {skipped} not in the benchmark" if skipped else ""
        log.info("%s: %s: %d images%s", self.source.name, resource.filename, written, note)
        self.report.extracted.append(resource.filename)
        if resource.filename not in self.extracted:
            self.extracted.append(resource.filename)
        write_json(self.state_path, {"extracted": self.extracted})
        if not self.keep_archives:
            archive_path.unlink(missing_ok=True)
            md5_res = md5_resource(resource)
            if md5_res is not None:
                (self.dl_dir / md5_res.filename).unlink(missing_ok=True)

    def finish(self, index: Resource, expected: set[str]) -> None:
        """Write the completion marker and clean the download folder."""
        write_json(
            self.marker,
            {
                "dataset": self.source.name,
                "images": len(expected),
                "index": index.filename,
                "archives": [a.filename for a in self.source.archives],
                "completed": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )
        shutil.rmtree(self.dl_dir / "staging", ignore_errors=True)
        if not self.keep_archives:  # the state and md5 files are of no use once the dataset is complete
            shutil.rmtree(self.dl_dir, ignore_errors=True)
        self.report.n_images = len(expected)
        log.info("%s: complete, %d images verified in %s", self.source.name, len(expected), self.ds_dir)


def download_dataset(
    name: str | DatasetSource,
    root: str | os.PathLike,
    *,
    base_url: str | None = None,
    keep_archives: bool = False,
    progress: bool = True,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 2.0,
) -> DownloadReport:
    """Download, verify and extract dataset ``name`` (a :data:`CATALOGUE` key) into ``root/<folder>``.

    Idempotent: when the dataset is already complete it only checks that the images are all there
    and returns a report with ``already_complete=True``. An interrupted run continues where it
    stopped. ``docs/data.md`` describes the layout and what is verified.
    """
    if isinstance(name, DatasetSource):
        source = name
    else:
        key = str(name).lower()
        if key not in CATALOGUE:
            raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(CATALOGUE)}")
        source = CATALOGUE[key]
    job = _DatasetDownload(source, Path(root), base_url=base_url, keep_archives=keep_archives, progress=progress,
                           retries=retries, timeout=timeout, backoff=backoff)
    index, expected = job.fetch_index()
    if job.is_complete(expected):
        return job.report
    missing = job.extract_missing(expected)
    if missing:
        raise DownloadError(
            f"{source.name}: {len(missing)} of {len(expected)} images are missing after extraction "
            f"(first: {_first(missing)}); the archives do not match {index.filename}. Delete {job.ds_dir} and "
            "run the command again."
        )
    job.finish(index, expected)
    return job.report
