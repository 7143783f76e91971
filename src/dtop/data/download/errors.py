"""The errors of a download: each says what failed and how to get the file."""

from __future__ import annotations

from dtop.errors import DataError


class DownloadError(DataError):
    """A download failed: HTTP error, unreachable host, size or checksum mismatch, corrupt archive."""


class ChecksumError(DownloadError):
    """A downloaded file does not have its expected md5; the file was deleted."""


class CorruptArchiveError(DownloadError):
    """An archive cannot be read to its end (truncated, bad gzip CRC, not a tar file)."""
