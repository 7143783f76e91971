"""What can be downloaded: the official sources of each dataset, mirrors, and the images each must hold."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dtop.data.download.errors import DownloadError
from dtop.data.revisited import R1M_SIZE, image_file_name, read_image_names
from dtop.errors import DataError

BASE_URL_ENV = "DTOP_DOWNLOAD_BASE_URL"
"""Environment variable naming a mirror that serves ``<mirror>/<dataset>/<file name>`` instead of the official hosts."""

R1M_ARCHIVES = 100


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
"""The official sources of every downloadable dataset (the only place that names them)."""




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


def expected_images(kind: str, path: Path) -> list[str]:
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

