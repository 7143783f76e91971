"""Download the benchmarks, the R1M distractors and the training sets: resumable, verified, idempotent.

Catalogue (:data:`CATALOGUE`, the only place that names the official sources, SPEC §7):

- ``roxford5k``: ``gnd_roxford5k.pkl`` + ``oxbuild_images-v1.tgz`` → ``<root>/roxford5k/``
- ``rparis6k``: ``gnd_rparis6k.pkl`` + ``paris_1-v1.tgz``, ``paris_2-v1.tgz`` → ``<root>/rparis6k/``
- ``revisitop1m``: ``revisitop1m.txt`` + ``jpg/revisitop1m.{1..100}.tar.gz`` → ``<root>/revisitop1m/``
- ``sfm120k``: ``retrieval-SfM-120k.pkl`` + ``ims.tar.gz`` → ``<root>/retrieval-SfM-120k/`` with the
  images in ``ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>`` (cirtorch's layout; the images of
  the ``train`` and ``val`` splits are extracted)
- ``gldv2-clean``: ``train_clean.csv`` + ``train/images_000.tar`` … ``images_499.tar`` (CVDF
  google-landmark, about 500 GB) → ``<root>/gldv2/`` with the images of the clean set in
  ``train/<id[0]>/<id[1]>/<id[2]>/<id>.jpg`` (the other GLDv2 train images are not extracted)

How a file is fetched (:func:`fetch`): into ``<name>.part`` next to its final name; an existing
``.part`` is continued with an HTTP ``Range`` request, and restarted from zero when the server
answers with the whole file (it ignores Range) or with another range; dropped connections are
retried (resuming) with back-off; the ``.part`` file is renamed to its final name only once it is
complete and verified, so a final name never holds a half file.

What is verified: only the CVDF host (GLDv2) publishes checksums: each ``images_NNN.tar`` is
checked against the md5 of its published ``md5.images_NNN.txt`` (fetched first). The two
ground-truth pickles are checked against md5 sums recorded from the official files (and validated by
:func:`dtop.data.gnd.load_gnd`); the SfM-120k pickle and ``train_clean.csv`` are parsed; the length
of every download is checked against ``Content-Length``/``Content-Range`` when the server sends it;
every archive is read end to end, gzip CRC included; after extraction every image the ground truth
(``imlist`` and ``qimlist``), the R1M list, the SfM-120k pickle or ``train_clean.csv`` names must be
present.

Extraction: tar members are matched to the expected image names by their trailing path components,
so the sub-folders of the Paris archives (``paris/<landmark>/<name>.jpg``) are flattened into
``jpg/`` and R1M keeps the relative paths of its list; members the benchmark does not list (e.g. the
corrupt Paris images left out of RParis6k) are not extracted. Each image is written under a staging
name and renamed into place. Archives are deleted once extracted (``keep_archives`` keeps them).

Idempotence: a finished dataset has a marker ``.dtop_download.json``; a later run checks that every
image is still there and does nothing. An interrupted run continues where it stopped (partial
``.part`` files, archives already extracted are recorded in ``.download/state.json``).

Mirrors: ``base_url`` (or the environment variable :data:`BASE_URL_ENV`) replaces the official
hosts; a mirror serves ``<base_url>/<dataset>/<file name>`` (e.g.
``<base_url>/revisitop1m/revisitop1m.42.tar.gz``, ``<base_url>/gldv2-clean/md5.images_000.txt``).
Tests use it to serve fixtures from 127.0.0.1.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import shutil
import socket
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from tqdm import tqdm

from dtop.data.revisited import R1M_SIZE, image_file_name, read_image_names, safe_relative
from dtop.errors import DataError
from dtop.utils.io import write_json

BASE_URL_ENV = "DTOP_DOWNLOAD_BASE_URL"
"""Environment variable naming a mirror that replaces the official hosts (see module docstring)."""

MARKER_NAME = ".dtop_download.json"
"""File written into a dataset folder once its download is complete and verified."""

USER_AGENT = "dtop-download/0.1 (+https://github.com/; research dataset download)"
CHUNK = 1 << 20
R1M_ARCHIVES = 100


class DownloadError(DataError):
    """A download failed: HTTP error, unreachable host, size or checksum mismatch, corrupt archive."""


class ChecksumError(DownloadError):
    """A downloaded file does not have its expected md5; the file was deleted."""


class CorruptArchiveError(DownloadError):
    """An archive cannot be read to its end (truncated, bad gzip CRC, not a tar file)."""


@dataclass(frozen=True)
class Resource:
    """One file of a dataset: its official URL, how to verify it and what it is."""

    filename: str
    url: str
    # "gnd" (ground-truth pickle), "list" (R1M image list), "sfm-db" (SfM-120k pickle),
    # "gldv2-csv" (train_clean.csv), "archive" (tar / tar.gz) or "md5" (a published md5 file)
    kind: str
    md5: str | None = None
    #: URL of a published md5 file (``md5sum`` format) holding this file's checksum.
    md5_url: str | None = None


@dataclass(frozen=True)
class DatasetSource:
    """A downloadable dataset: its resources and the number of images it must end up with."""

    name: str
    resources: tuple[Resource, ...]
    description: str = ""
    expected_images: int | None = None
    #: Folder under the root (default: ``name``) and the images' folder inside it.
    folder: str | None = None
    image_dir: str = "jpg"

    @property
    def directory(self) -> str:
        """The dataset's folder name under the download root."""
        return self.folder or self.name

    @property
    def archives(self) -> tuple[Resource, ...]:
        """The image archives, in download order."""
        return tuple(r for r in self.resources if r.kind == "archive")

    def resource(self, kind: str) -> Resource | None:
        """The first resource of ``kind`` (``gnd``, ``list``, ``sfm-db``, ``gldv2-csv``), or None."""
        return next((r for r in self.resources if r.kind == kind), None)


INDEX_KINDS: tuple[str, ...] = ("gnd", "list", "sfm-db", "gldv2-csv")
"""Resource kinds that name a dataset's images (one per dataset)."""


_GND_URL = "http://cmp.felk.cvut.cz/revisitop/data/datasets/{0}/gnd_{0}.pkl"
_R1M_URL = "http://ptak.felk.cvut.cz/revisitop/revisitop1m/"
_SFM_URL = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/train/"
_GLDV2_URL = "https://s3.amazonaws.com/google-landmark/"
GLDV2_ARCHIVES = 500
GLDV2_CLEAN_IMAGES = 1_580_470

CATALOGUE: dict[str, DatasetSource] = {
    "roxford5k": DatasetSource(
        name="roxford5k",
        description="Revisited Oxford: 4,993 database images + 70 queries (ground truth + 1 archive)",
        expected_images=4993 + 70,
        resources=(
            # md5 recorded from the official gnd file (the host publishes none).
            Resource("gnd_roxford5k.pkl", _GND_URL.format("roxford5k"), "gnd", "f2b67579f625a587b5b0828dbf2e8eb0"),
            Resource(
                "oxbuild_images-v1.tgz",
                "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz",
                "archive",
            ),
        ),
    ),
    "rparis6k": DatasetSource(
        name="rparis6k",
        description="Revisited Paris: 6,322 database images + 70 queries (ground truth + 2 archives)",
        expected_images=6322 + 70,
        resources=(
            Resource("gnd_rparis6k.pkl", _GND_URL.format("rparis6k"), "gnd", "2feae0a8257a5c6ca1b31b8eb73c8571"),
            Resource(
                "paris_1-v1.tgz", "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1-v1.tgz", "archive"
            ),
            Resource(
                "paris_2-v1.tgz", "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_2-v1.tgz", "archive"
            ),
        ),
    ),
    "revisitop1m": DatasetSource(
        name="revisitop1m",
        description="R1M distractors: 1,001,001 images (image list + 100 archives, large)",
        expected_images=R1M_SIZE,
        resources=(
            Resource("revisitop1m.txt", _R1M_URL + "revisitop1m.txt", "list"),
            *(
                Resource(f"revisitop1m.{i}.tar.gz", f"{_R1M_URL}jpg/revisitop1m.{i}.tar.gz", "archive")
                for i in range(1, R1M_ARCHIVES + 1)
            ),
        ),
    ),
    "sfm120k": DatasetSource(
        name="sfm120k",
        folder="retrieval-SfM-120k",
        image_dir="ims",
        description="SfM-120k training set (cirtorch): database pickle + ims.tar.gz",
        resources=(
            Resource("retrieval-SfM-120k.pkl", _SFM_URL + "dbs/retrieval-SfM-120k.pkl", "sfm-db"),
            Resource("ims.tar.gz", _SFM_URL + "ims/ims.tar.gz", "archive"),
        ),
    ),
    "gldv2-clean": DatasetSource(
        name="gldv2-clean",
        folder="gldv2",
        image_dir="train",
        description="GLDv2-clean training set: train_clean.csv + 500 tar files (~500 GB, md5-verified)",
        expected_images=GLDV2_CLEAN_IMAGES,
        resources=(
            Resource("train_clean.csv", _GLDV2_URL + "metadata/train_clean.csv", "gldv2-csv"),
            *(
                Resource(
                    f"images_{i:03d}.tar",
                    f"{_GLDV2_URL}train/images_{i:03d}.tar",
                    "archive",
                    md5_url=f"{_GLDV2_URL}md5sum/train/md5.images_{i:03d}.txt",
                )
                for i in range(GLDV2_ARCHIVES)
            ),
        ),
    ),
}
"""The official sources of every downloadable dataset (SPEC §7)."""


@dataclass
class DownloadReport:
    """What :func:`download_dataset` did."""

    name: str
    root: Path
    already_complete: bool = False
    downloaded: list[str] = field(default_factory=list)
    extracted: list[str] = field(default_factory=list)
    n_images: int = 0


# --------------------------------------------------------------------------------------------------
# URLs


def resolve_base_url(base_url: str | None = None) -> str | None:
    """The mirror to use: ``base_url`` if given, else ``$DTOP_DOWNLOAD_BASE_URL``, else None (official)."""
    value = base_url if base_url else os.environ.get(BASE_URL_ENV, "")
    value = (value or "").strip()
    if not value:
        return None
    if not value.startswith(("http://", "https://", "file://")):
        raise DownloadError(f"mirror URL must start with http://, https:// or file://, got {value!r}")
    return value.rstrip("/")


def resource_url(source: DatasetSource, resource: Resource, base_url: str | None = None) -> str:
    """URL of ``resource``: the official one, or ``<base_url>/<dataset>/<file name>`` on a mirror."""
    base = resolve_base_url(base_url)
    return resource.url if base is None else f"{base}/{source.name}/{resource.filename}"


def md5_resource(resource: Resource) -> Resource | None:
    """The published md5 file of ``resource`` as a resource of its own (None if none is published)."""
    if not resource.md5_url:
        return None
    return Resource(resource.md5_url.rsplit("/", 1)[-1], resource.md5_url, "md5")


def parse_md5_file(text: str, filename: str, source: str = "<md5 file>") -> str:
    """The md5 of ``filename`` in an ``md5sum``-style file (``<hex>  <name>`` lines, or a bare hash).

    A line naming ``filename`` wins; a file with a single hash is taken as that file's.
    """
    found: list[tuple[str, str]] = []
    for line in text.splitlines():
        parts = line.strip().split()
        if not parts:
            continue
        digest = parts[0].lower().lstrip("\\")
        if len(digest) != 32 or any(c not in "0123456789abcdef" for c in digest):
            continue
        name = parts[1].lstrip("*").rsplit("/", 1)[-1] if len(parts) > 1 else ""
        found.append((digest, name))
    for digest, name in found:
        if name == filename:
            return digest
    if len(found) == 1 and not found[0][1]:
        return found[0][0]
    if len(found) == 1:
        raise DownloadError(f"{source}: the md5 file is for {found[0][1]!r}, not {filename!r}")
    raise DownloadError(f"{source}: no md5 checksum for {filename} in the md5 file")


def _expected_images(kind: str, path: Path) -> list[str]:
    """Relative POSIX paths of the images named by an index file of ``kind`` (see :data:`INDEX_KINDS`)."""
    if kind == "gnd":
        from dtop.data.gnd import load_gnd

        gnd = load_gnd(path)
        return [image_file_name(n) for n in [*gnd.imlist, *gnd.qimlist]]
    if kind == "list":
        return read_image_names(path)
    if kind == "sfm-db":
        from dtop.data.training import read_sfm_db, sfm_relative_path

        db = read_sfm_db(path)
        return [sfm_relative_path(c) for split in db.values() for c in split["cids"]]
    if kind == "gldv2-csv":
        return _gldv2_csv_images(path)
    raise DataError(f"unknown index kind {kind!r}")


def _gldv2_csv_images(path: Path) -> list[str]:
    from dtop.data.training import gldv2_relative_path

    out: list[str] = []
    with open(path, encoding="utf-8", newline="") as f:
        header = [c.strip().strip('"') for c in f.readline().strip().split(",")]
        if header[:2] != ["landmark_id", "images"]:
            raise DataError(f"{path}: expected the header landmark_id,images, got {','.join(header)}")
        for lineno, line in enumerate(f, 2):
            line = line.strip()
            if not line:
                continue
            _, sep, ids = line.partition(",")
            if not sep:
                raise DataError(f"{path}:{lineno}: expected landmark_id,images")
            for image_id in ids.strip().strip('"').split():
                if len(image_id) < 3 or not image_id.isalnum():
                    raise DataError(f"{path}:{lineno}: {image_id!r} is not a GLDv2 image id")
                out.append(gldv2_relative_path(image_id))
    if not out:
        raise DataError(f"{path}: lists no images")
    return out


# --------------------------------------------------------------------------------------------------
# Fetching one file


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
    log: Callable[[str], None] = print,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming, verifying, renaming at the end.

    A ``.part`` left by an interrupted run is continued with ``Range: bytes=N-``. A 200 answer to a
    range request (the server ignores Range), a range that starts elsewhere, or a 416 for a part
    larger than the file restarts from zero. Dropped connections and 5xx answers are retried up to
    ``retries`` times in a row (waiting ``backoff`` × 2^k seconds; an attempt that received at least
    1 MiB resets the count). When complete, the length is checked
    against the announced total, the md5 against ``md5`` (if given) and ``validate(part)`` is
    called; any failure deletes the ``.part`` and raises :class:`DownloadError` (or
    :class:`ChecksumError`). If ``dest`` exists it is returned unchanged (only complete, verified
    files ever get the final name).
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = 0
    restarts = 0
    label = desc or dest.name
    h: Any | None = None  # md5 of the part file, fed while streaming (None: compute at the end)
    while True:
        h = None
        offset = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(url, headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as err:
            if err.code == 416 and offset:
                _, total = _parse_content_range(err.headers.get("Content-Range"))
                err.close()
                if total is not None and total == offset:
                    break  # the part already holds the whole file
                log(f"{label}: the partial file does not fit the server's file; restarting from zero")
                part.unlink(missing_ok=True)
                restarts += 1
                if restarts > 3:
                    raise DownloadError(f"{url}: the server keeps refusing the byte range; giving up") from err
                continue
            err.close()
            if 500 <= err.code < 600 and failures < retries:
                failures += 1
                log(f"{label}: HTTP {err.code} from the server; retry {failures}/{retries}")
                time.sleep(backoff * 2 ** (failures - 1))
                continue
            raise DownloadError(
                f"{url}: HTTP {err.code} {err.reason}. Check the URL (and --base-url / ${BASE_URL_ENV} if "
                "you use a mirror); if the official host moved the file, download it by hand and put it at "
                f"{dest}."
            ) from err
        except _TRANSIENT as err:
            if failures < retries:
                failures += 1
                log(f"{label}: {err}; retry {failures}/{retries}")
                time.sleep(backoff * 2 ** (failures - 1))
                continue
            raise DownloadError(
                f"{url}: cannot connect ({err}) after {retries} retries. Check the network, or use a mirror "
                f"with --base-url / ${BASE_URL_ENV}."
            ) from err

        with response:
            status = getattr(response, "status", 200)
            length = response.headers.get("Content-Length")
            length_i = int(length) if length and length.strip().isdigit() else None
            if offset and status == 206:
                start, total = _parse_content_range(response.headers.get("Content-Range"))
                if start != offset:
                    log(f"{label}: the server sent another byte range than asked; restarting from zero")
                    part.unlink(missing_ok=True)
                    restarts += 1
                    if restarts > 3:
                        raise DownloadError(f"{url}: the server answers range requests inconsistently")
                    continue
                if total is None and length_i is not None:
                    total = offset + length_i
                mode = "ab"
            else:
                if offset:
                    log(f"{label}: the server ignores HTTP Range; downloading again from the start")
                offset = 0
                total = length_i
                mode = "wb"
            if md5:
                h = _md5_of(part) if mode == "ab" else hashlib.md5()
            interrupted: BaseException | None = None
            with (
                open(part, mode) as out,
                tqdm(
                    total=total,
                    initial=offset,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=label,
                    disable=not progress,
                    leave=False,
                ) as bar,
            ):
                while True:
                    try:
                        chunk = response.read(CHUNK)
                    except (*_TRANSIENT, OSError) as err:  # network trouble only; write errors propagate
                        interrupted = err
                        break
                    if not chunk:
                        break
                    out.write(chunk)
                    if h is not None:
                        h.update(chunk)
                    bar.update(len(chunk))
        size = part.stat().st_size
        if interrupted is not None or (total is not None and size < total):
            if size - offset >= CHUNK:
                failures = 0  # this attempt made progress: count retries afresh
            if failures < retries:
                failures += 1
                why = interrupted or f"connection closed at {size} of {total} bytes"
                log(f"{label}: transfer interrupted ({why}); resuming, retry {failures}/{retries}")
                time.sleep(backoff * 2 ** (failures - 1))
                continue
            raise DownloadError(
                f"{url}: transfer interrupted {retries + 1} times; run the command again to resume from "
                f"{size} bytes (kept in {part})."
            )
        if total is not None and size > total:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{url}: got {size} bytes, more than the announced {total}; deleted {part}")
        break

    if md5:
        got = (h if h is not None else _md5_of(part)).hexdigest()
        if got.lower() != md5.lower():
            part.unlink(missing_ok=True)
            raise ChecksumError(
                f"{dest.name}: md5 mismatch (expected {md5}, got {got}); the corrupt download was deleted. "
                "Run the command again; if it fails again the server or mirror serves a different file (if "
                f"you trust it, place the file at {dest} by hand)."
            )
    if validate is not None:
        try:
            validate(part)
        except DataError as err:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{dest.name}: the downloaded file is not valid ({err}); it was deleted") from err
    os.replace(part, dest)
    return dest


# --------------------------------------------------------------------------------------------------
# Extraction


def _open_archive_stream(path: Path) -> tuple[BinaryIO, Any]:
    """Open ``path`` for sequential reading: (raw stream for tarfile, gzip object or None)."""
    raw = open(path, "rb")
    magic = raw.read(2)
    raw.seek(0)
    if magic == b"\x1f\x8b":
        gz = gzip.GzipFile(fileobj=raw, mode="rb")
        return gz, raw  # type: ignore[return-value]
    return raw, None


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
    written in ``staging_dir`` and renamed into place. The archive is read to its very end (gzip
    CRC and length included). Returns ``(written, skipped)``; raises :class:`CorruptArchiveError` if
    the archive is corrupt or truncated, :class:`DownloadError` if writing fails (e.g. disk full).
    """
    archive = Path(archive)
    dest_dir = Path(dest_dir)
    staging = Path(staging_dir) if staging_dir is not None else dest_dir.parent / ".download" / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    dest_dir.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    made_dirs: set[Path] = {dest_dir}
    stream, raw = _open_archive_stream(archive)
    try:
        with (
            tarfile.open(fileobj=stream, mode="r|") as tar,
            tqdm(desc=f"extract {archive.name}", unit=" files", disable=not progress, leave=False) as bar,
        ):
            for member in tar:
                if not member.isfile():
                    continue
                rel = safe_relative(member.name)
                match = None
                if rel is not None:
                    parts = rel.split("/")
                    for i in range(len(parts)):
                        cand = "/".join(parts[i:])
                        if cand in expected:
                            match = cand
                            break
                if match is None:
                    skipped += 1
                    continue
                src = tar.extractfile(member)
                if src is None:
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
                    raise CorruptArchiveError(f"{archive.name} is corrupt or truncated (member {member.name})")
                os.replace(tmp, target)
                written += 1
                bar.update(1)
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
    return written, skipped


# --------------------------------------------------------------------------------------------------
# Datasets


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
    log: Callable[[str], None] = print,
) -> DownloadReport:
    """Download, verify and extract dataset ``name`` (a :data:`CATALOGUE` key) into ``root/<name>``.

    Idempotent: when the dataset is already complete it only checks that the images are all there
    and returns a report with ``already_complete=True``. See the module docstring for the layout,
    the verification and how interrupted runs continue.
    """
    if isinstance(name, DatasetSource):
        source = name
    else:
        key = str(name).lower()
        if key not in CATALOGUE:
            raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(CATALOGUE)}")
        source = CATALOGUE[key]
    root = Path(root)
    ds_dir = root / source.directory
    dl_dir = ds_dir / ".download"
    jpg_dir = ds_dir / source.image_dir
    marker = ds_dir / MARKER_NAME
    state_path = dl_dir / "state.json"
    report = DownloadReport(name=source.name, root=root)

    def published_md5(resource: Resource) -> str | None:
        md5_res = md5_resource(resource)
        if md5_res is None:
            return resource.md5
        md5_path = dl_dir / md5_res.filename

        def check_md5(p: Path) -> None:
            parse_md5_file(p.read_text(errors="replace"), resource.filename, str(p))

        get(md5_res, md5_path, check_md5)
        return parse_md5_file(md5_path.read_text(errors="replace"), resource.filename, str(md5_path))

    def get(resource: Resource, dest: Path, validate: Callable[[Path], None] | None = None) -> Path:
        if not dest.exists():
            md5 = published_md5(resource) if resource.md5_url else resource.md5
            url = resource_url(source, resource, base_url)
            log(f"{source.name}: downloading {url}")
            fetch(
                url,
                dest,
                md5=md5,
                validate=validate,
                retries=retries,
                timeout=timeout,
                backoff=backoff,
                progress=progress,
                log=log,
            )
            report.downloaded.append(resource.filename)
        return dest

    # 1. The index of the images: ground truth, image list, SfM-120k pickle or train_clean.csv.
    index = next((r for r in source.resources if r.kind in INDEX_KINDS), None)
    if index is None:
        raise DataError(f"{source.name}: the catalogue entry has no ground truth or image list")
    index_path = ds_dir / index.filename

    def check_index(p: Path) -> None:
        found = _expected_images(index.kind, p)
        if index.kind == "list" and source.expected_images is not None and len(found) != source.expected_images:
            raise DataError(f"the list has {len(found)} images, expected {source.expected_images}")

    get(index, index_path, check_index)
    names = _expected_images(index.kind, index_path)
    expected = set(names)
    if source.expected_images is not None and len(expected) != source.expected_images:
        raise DataError(
            f"{index_path}: lists {len(expected)} distinct images, {source.name} has {source.expected_images}; "
            "delete the file and run the command again"
        )

    missing = expected - _present(jpg_dir)
    if marker.exists() and not missing:
        log(f"{source.name}: already complete in {ds_dir} ({len(expected)} images); nothing to do")
        report.already_complete = True
        report.n_images = len(expected)
        return report
    if marker.exists():
        log(f"{source.name}: {len(missing)} images went missing since the download; fetching them again")
        marker.unlink()

    # 2. Archives, unless every image is already there.
    state = _read_state(state_path)
    done: list[str] = list(state.get("extracted", []))
    archives = list(source.archives)

    def process(resource: Resource) -> None:
        archive_path = dl_dir / resource.filename
        get(resource, archive_path)
        log(f"{source.name}: extracting {resource.filename}")
        try:
            written, skipped = extract_archive(
                archive_path, jpg_dir, expected, staging_dir=dl_dir / "staging", progress=progress
            )
        except CorruptArchiveError as err:
            archive_path.unlink(missing_ok=True)
            raise DownloadError(f"{err}; deleted it, run the command again to download it afresh") from err
        note = f", skipped {skipped} not in the benchmark" if skipped else ""
        log(f"{source.name}: {resource.filename}: {written} images{note}")
        report.extracted.append(resource.filename)
        if resource.filename not in done:
            done.append(resource.filename)
        write_json(state_path, {"extracted": done})
        if not keep_archives:
            archive_path.unlink(missing_ok=True)
            md5_res = md5_resource(resource)
            if md5_res is not None:
                (dl_dir / md5_res.filename).unlink(missing_ok=True)

    if missing:
        skipped_archives = [a for a in archives if a.filename in done]
        for resource in archives:
            if resource.filename not in done:
                process(resource)
        missing = expected - _present(jpg_dir)
        if missing and skipped_archives:
            log(f"{source.name}: {len(missing)} images still missing; extracting the earlier archives again")
            done.clear()
            for resource in skipped_archives:
                process(resource)
            missing = expected - _present(jpg_dir)
    if missing:
        raise DownloadError(
            f"{source.name}: {len(missing)} of {len(expected)} images are missing after extraction "
            f"(first: {_first(missing)}); the archives do not match {index.filename}. Delete {ds_dir} and "
            "run the command again."
        )

    write_json(
        marker,
        {
            "dataset": source.name,
            "images": len(expected),
            "index": index.filename,
            "archives": [a.filename for a in archives],
            "completed": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    shutil.rmtree(dl_dir / "staging", ignore_errors=True)
    if not keep_archives:
        state_path.unlink(missing_ok=True)
        try:
            dl_dir.rmdir()
        except OSError:
            pass
    report.n_images = len(expected)
    log(f"{source.name}: complete, {len(expected)} images verified in {ds_dir}")
    return report
