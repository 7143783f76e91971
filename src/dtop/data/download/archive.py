"""Extracting the listed images from a tar or tar.gz archive, read to its very end (gzip CRC included)."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

from tqdm import tqdm

from dtop.data.download.errors import CorruptArchiveError, DownloadError
from dtop.data.download.fetching import CHUNK
from dtop.data.revisited import safe_relative


def _open_archive_stream(path: Path) -> tuple[io.BufferedIOBase, io.BufferedReader | None]:
    """Open ``path`` for sequential reading: (the stream for tarfile, the raw file under a gzip stream or None)."""
    raw = open(path, "rb")
    magic = raw.read(2)
    raw.seek(0)
    if magic == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    return raw, None


def _expected_name(member_name: str, expected: set[str]) -> str | None:
    """The name in ``expected`` that the trailing path components of ``member_name`` match, if any."""
    rel = safe_relative(member_name)
    if rel is None:
        return None
    parts = rel.split("/")
    for i in range(len(parts)):
        candidate = "/".join(parts[i:])
        if candidate in expected:
            return candidate
    return None


def extract_archive(
    archive: str | os.PathLike,
    dest_dir: str | os.PathLike,
    expected: set[str],
    *,
    staging_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[int, int]:
    """Extract the members of ``archive`` whose trailing path matches a name in ``expected``.

    ``expected`` holds relative POSIX paths (``all_souls_000013.jpg``, or ``a/b/c.jpg`` for R1M); a
    member ``paris/louvre/paris_louvre_000001.jpg`` matches ``paris_louvre_000001.jpg`` and is
    written to ``dest_dir/paris_louvre_000001.jpg`` (this flattens archive sub-folders). Each file is
    written in ``staging_dir`` (default: a temporary folder beside ``dest_dir``, removed afterwards)
    and renamed into place. The archive is read to its very end (gzip
    CRC and length included). Returns ``(written, skipped)``; raises :class:`CorruptArchiveError` if
    the archive is corrupt or truncated, :class:`DownloadError` if writing fails (e.g. disk full).
    """
    archive = Path(archive)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    if staging_dir is not None:
        staging = Path(staging_dir)
        staging.mkdir(parents=True, exist_ok=True)
    else:  # a temporary folder beside dest_dir (same file system: renames), removed afterwards
        staging = Path(tempfile.mkdtemp(prefix=".dtop-extract-", dir=dest_dir.parent))
    stream, raw = _open_archive_stream(archive)
    try:
        with tqdm(desc=f"extract {archive.name}", unit=" files", disable=not progress, leave=False) as bar:
            counts = _extract_members(stream, archive.name, dest_dir, expected, staging, bar)
        # Read whatever follows the end-of-archive blocks, so gzip checks its CRC and length.
        while stream.read(CHUNK):
            pass
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as err:
        if isinstance(err, OSError) and not isinstance(err, gzip.BadGzipFile) and err.errno is not None:
            raise DownloadError(f"cannot extract {archive} into {dest_dir}: {err}") from err
        raise CorruptArchiveError(f"{archive.name} is corrupt or truncated ({type(err).__name__}: {err})") from err
    finally:
        stream.close()
        if raw is not None:
            raw.close()
        shutil.rmtree(staging, ignore_errors=True)
    return counts


def _extract_members(stream: io.BufferedIOBase, name: str, dest_dir: Path, expected: set[str], staging: Path,
                     bar: tqdm) -> tuple[int, int]:
    """Write the expected members of the tar ``stream`` through ``staging``; ``(written, skipped)``."""
    written = skipped = 0
    made_dirs: set[Path] = {dest_dir}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            match = _expected_name(member.name, expected)
            src = tar.extractfile(member) if match is not None else None
            if match is None or src is None:
                skipped += 1
                continue
            target = dest_dir / match
            if target.parent not in made_dirs:
                target.parent.mkdir(parents=True, exist_ok=True)
                made_dirs.add(target.parent)
            tmp = staging / f"{written}.tmp"
            with open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
            if tmp.stat().st_size != member.size:
                raise CorruptArchiveError(f"{name} is corrupt or truncated (member {member.name})")
            os.replace(tmp, target)
            written += 1
            bar.update(1)
    return written, skipped
