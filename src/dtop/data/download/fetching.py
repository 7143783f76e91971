"""Fetching one file over HTTP: resumable, retried, verified, renamed into place only when complete."""

from __future__ import annotations

import enum
import hashlib
import http.client
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dtop.data.download.catalogue import BASE_URL_ENV
from dtop.data.download.errors import ChecksumError, DownloadError
from dtop.errors import DataError

log = logging.getLogger(__name__)

USER_AGENT = "dtop-download/0.1 (+https://github.com/; research dataset download)"
CHUNK = 1 << 20
"""Bytes read and written at a time (downloads, md5 sums, archive members)."""


def _md5_of(path: Path, h: Any | None = None) -> Any:
    h = h if h is not None else hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` → (START, TOTAL); ``bytes */TOTAL`` → (None, TOTAL)."""
    if not value:
        return None, None
    value = value.strip()
    if not value.lower().startswith("bytes"):
        return None, None
    spec = value[5:].strip()
    rng, _, total_s = spec.partition("/")
    total = int(total_s) if total_s.strip().isdigit() else None
    if rng.strip() == "*":
        return None, total
    start_s = rng.partition("-")[0].strip()
    return (int(start_s) if start_s.isdigit() else None), total


_TRANSIENT = (
    urllib.error.URLError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
    socket.timeout,
)



class _Next(enum.Enum):
    """What a request tells the download loop when it brings no response to read."""

    AGAIN = "try again"  # after a retry wait or a restart from zero
    COMPLETE = "complete"  # the part file already holds the whole file


class _Transfer:
    """One file being fetched into ``<dest>.part``: retry and restart counts and the running md5."""

    def __init__(self, url: str, dest: Path, *, md5: str | None, retries: int, timeout: float, backoff: float,
                 progress: bool, label: str) -> None:
        self.url = url
        self.dest = dest
        self.part = dest.with_name(dest.name + ".part")
        self.md5 = md5
        self.retries = retries
        self.timeout = timeout
        self.backoff = backoff
        self.progress = progress
        self.label = label
        self.failures = 0  # failed attempts in a row
        self.restarts = 0
        self.hash: Any | None = None  # md5 of the part file, fed while streaming (None: computed at the end)

    def retry(self, why: str) -> bool:
        """Count a failed attempt; wait (exponential back-off) and return True while retries are left."""
        if self.failures >= self.retries:
            return False
        self.failures += 1
        log.warning("%s: %s; retry %d/%d", self.label, why, self.failures, self.retries)
        time.sleep(self.backoff * 2 ** (self.failures - 1))
        return True

    def restart(self, why: str, give_up: str) -> None:
        """Delete the part file so that the next attempt starts from zero; give up after three restarts."""
        log.warning("%s: %s; restarting from zero", self.label, why)
        self.part.unlink(missing_ok=True)
        self.restarts += 1
        if self.restarts > 3:
            raise DownloadError(f"{self.url}: {give_up}")

    def download(self) -> None:
        """Fetch until the part file holds the whole file, resuming after interruptions."""
        while True:
            self.hash = None
            offset = self.part.stat().st_size if self.part.exists() else 0
            response = self.request(offset)
            if response is _Next.COMPLETE:
                return
            if response is _Next.AGAIN:
                continue
            received = self.receive(response, offset)
            if received is not None and self.finished(*received):
                return

    def request(self, offset: int) -> Any:
        """The server's response for the bytes from ``offset``, or what to do next (:class:`_Next`)."""
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            return urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=self.timeout)
        except urllib.error.HTTPError as err:
            return self._http_error(err, offset)
        except _TRANSIENT as err:
            if self.retry(str(err)):
                return _Next.AGAIN
            raise DownloadError(
                f"{self.url}: cannot connect ({err}) after {self.retries} retries. Check the network, or use a "
                f"mirror with --base-url / ${BASE_URL_ENV}."
            ) from err

    def _http_error(self, err: urllib.error.HTTPError, offset: int) -> _Next:
        if err.code == 416 and offset:  # the part file is not shorter than the server's file
            _, total = _parse_content_range(err.headers.get("Content-Range"))
            err.close()
            if total is not None and total == offset:
                return _Next.COMPLETE
            self.restart("the partial file does not fit the server's file",
                         "the server keeps refusing the byte range; giving up")
            return _Next.AGAIN
        err.close()
        if 500 <= err.code < 600 and self.retry(f"HTTP {err.code} from the server"):
            return _Next.AGAIN
        raise DownloadError(
            f"{self.url}: HTTP {err.code} {err.reason}. Check the URL (and --base-url / ${BASE_URL_ENV} if "
            "you use a mirror); if the official host moved the file, download it by hand and put it at "
            f"{self.dest}."
        ) from err

    def receive(self, response: Any, offset: int) -> tuple[int, int | None, BaseException | None] | None:
        """Write the body to the part file: ``(start offset, total size, what cut it)``, None to restart.

        A 206 answer continues the part file; a 200 answer (the server ignores Range) rewrites it.
        """
        with response:
            status = getattr(response, "status", 200)
            length = response.headers.get("Content-Length")
            length_i = int(length) if length and length.strip().isdigit() else None
            if offset and status == 206:
                start, total = _parse_content_range(response.headers.get("Content-Range"))
                if start != offset:
                    self.restart("the server sent another byte range than asked",
                                 "the server answers range requests inconsistently")
                    return None
                if total is None and length_i is not None:
                    total = offset + length_i
                mode = "ab"
            else:
                if offset:
                    log.info("%s: the server ignores HTTP Range; downloading again from the start", self.label)
                offset, total, mode = 0, length_i, "wb"
            if self.md5:
                self.hash = _md5_of(self.part) if mode == "ab" else hashlib.md5()
            return offset, total, self._write(response, mode, offset, total)

    def _write(self, response: Any, mode: str, offset: int, total: int | None) -> BaseException | None:
        """Stream the body into the part file; the network error that cut it short, if any."""
        with (
            open(self.part, mode) as out,
            tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=self.label,
                 disable=not self.progress, leave=False) as bar,
        ):
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (*_TRANSIENT, OSError) as err:  # network trouble only; write errors propagate
                    return err
                if not chunk:
                    return None
                out.write(chunk)
                if self.hash is not None:
                    self.hash.update(chunk)
                bar.update(len(chunk))

    def finished(self, offset: int, total: int | None, interrupted: BaseException | None) -> bool:
        """Whether the part file is complete; False (after the back-off) when the transfer is to resume."""
        size = self.part.stat().st_size
        if interrupted is not None or (total is not None and size < total):
            if size - offset >= CHUNK:
                self.failures = 0  # this attempt made progress: count retries afresh
            why = interrupted or f"connection closed at {size} of {total} bytes"
            if self.retry(f"transfer interrupted ({why}), resuming"):
                return False
            raise DownloadError(
                f"{self.url}: transfer interrupted {self.retries + 1} times; run the command again to resume "
                f"from {size} bytes (kept in {self.part})."
            )
        if total is not None and size > total:
            self.part.unlink(missing_ok=True)
            raise DownloadError(f"{self.url}: got {size} bytes, more than the announced {total}; deleted {self.part}")
        return True

    def verify(self, validate: Callable[[Path], None] | None) -> None:
        """Check the md5 and call ``validate``; a failure deletes the part file."""
        if self.md5:
            got = (self.hash if self.hash is not None else _md5_of(self.part)).hexdigest()
            if got.lower() != self.md5.lower():
                self.part.unlink(missing_ok=True)
                raise ChecksumError(
                    f"{self.dest.name}: md5 mismatch (expected {self.md5}, got {got}); the corrupt download was "
                    "deleted. Run the command again; if it fails again the server or mirror serves a different "
                    f"file (if you trust it, place the file at {self.dest} by hand)."
                )
        if validate is not None:
            try:
                validate(self.part)
            except DataError as err:
                self.part.unlink(missing_ok=True)
                raise DownloadError(
                    f"{self.dest.name}: the downloaded file is not valid ({err}); it was deleted"
                ) from err


def fetch(
    url: str,
    dest: str | os.PathLike,
    *,
    md5: str | None = None,
    validate: Callable[[Path], None] | None = None,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 2.0,
    progress: bool = True,
    desc: str | None = None,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming, verifying, renaming at the end.

    A ``.part`` left by an interrupted run is continued with ``Range: bytes=N-``. A 200 answer to a
    range request (the server ignores Range), a range that starts elsewhere, or a 416 for a part
    larger than the file restarts from zero. Dropped connections and 5xx answers are retried up to
    ``retries`` times in a row (waiting ``backoff`` × 2^k seconds; an attempt that received at least
    1 MiB resets the count). When complete, the length is checked against the announced total, the
    md5 against ``md5`` (if given) and ``validate(part)`` is called; any failure deletes the
    ``.part`` and raises :class:`DownloadError` (or :class:`ChecksumError`). If ``dest`` exists it
    is returned unchanged (only complete, verified files ever get the final name).
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    transfer = _Transfer(url, dest, md5=md5, retries=retries, timeout=timeout, backoff=backoff, progress=progress,
                         label=desc or dest.name)
    transfer.download()
    transfer.verify(validate)
    os.replace(transfer.part, dest)
    return dest
