"""Datasets in the revisited format: ROxford5k, RParis6k, a user's own benchmark, the R1M list.

A dataset is ``<root>/<name>/jpg/`` with one ground-truth file ``gnd_<name>.pkl`` or ``.json``.
Queries are cropped to their bbx as the reference code does; database images never are. See
``docs/data.md``.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from dtop.data.folders import IMAGE_SUFFIXES
from dtop.data.gnd import GroundTruth, load_gnd
from dtop.errors import DataError

if TYPE_CHECKING:
    from dtop.data.images import ImageListDataset

BENCHMARKS: tuple[str, ...] = ("roxford5k", "rparis6k")
"""The revisited benchmarks that ``dtop download`` can fetch."""

R1M_NAME = "revisitop1m"
R1M_SIZE = 1_001_001
"""Number of images in ``revisitop1m.txt``."""

_SHOW = 5


def image_file_name(name: str) -> str:
    """File name of an image listed as ``name``: ``name`` if it ends in an image extension, else ``name.jpg``."""
    return name if PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES else name + ".jpg"


def safe_relative(name: str) -> str | None:
    """Normalised relative POSIX path, or None if ``name`` is empty, absolute or climbs with ``..``."""
    name = name.replace("\\", "/").strip()
    if not name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return "/".join(parts)


def read_image_names(path: str | os.PathLike) -> list[str]:
    """Read a list of image names (one relative path per line, like ``revisitop1m.txt``) as file names.

    Blank lines are ignored; each name goes through :func:`image_file_name`; an absolute name or one
    with ``..`` is refused with a :class:`~dtop.errors.DataError`.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(
            f"image list not found: {path}. Run `dtop download revisitop1m --root DIR` or fix the path."
        ) from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a UTF-8 text image list ({err})") from err
    names: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        rel = safe_relative(line)
        if rel is None:
            raise DataError(f"{path}:{lineno}: {line!r} is not a relative image path inside jpg/")
        names.append(image_file_name(rel))
    if not names:
        raise DataError(f"{path}: the image list is empty")
    return names


def _missing_error(what: str, missing: list[str], total: int, folder: Path, hint: str) -> DataError:
    shown = ", ".join(missing[:_SHOW]) + (", ..." if len(missing) > _SHOW else "")
    return DataError(f"{what}: {len(missing)} of {total} images are missing in {folder} (first: {shown}). {hint}")


def _find_gnd(folder: Path) -> Path:
    preferred = [folder / f"gnd_{folder.name}{ext}" for ext in (".pkl", ".json")]
    for p in preferred:
        if p.is_file():
            return p
    found = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.name.startswith("gnd_") and p.suffix.lower() in (".pkl", ".json")
    )
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(
            f"{folder}: no ground-truth file; a revisited-format dataset needs gnd_<name>.pkl or "
            "gnd_<name>.json next to its jpg/ folder"
        )
    raise DataError(
        f"{folder}: several ground-truth files ({', '.join(p.name for p in found)}); pass the one to use "
        "as the dataset path"
    )


class RevisitedDataset:
    """A benchmark in the revisited format: image paths, query boxes, ground truth, datasets.

    ``RevisitedDataset(root, "roxford5k")`` reads ``root/roxford5k/``; ``RevisitedDataset(None,
    path)`` (or with ``root``, for a relative path) reads a user's dataset: a folder holding ``jpg/``
    and one ``gnd_*.pkl``/``gnd_*.json``, or the ground-truth file itself. With ``check_images``
    (default) every image must exist, else a :class:`~dtop.errors.DataError` says how many and which
    are missing.
    """

    def __init__(
        self,
        root: str | os.PathLike | None,
        name_or_path: str | os.PathLike,
        *,
        check_images: bool = True,
    ) -> None:
        key = str(name_or_path)
        self.is_benchmark = key.lower() in BENCHMARKS
        if self.is_benchmark:
            name = key.lower()
            if root is None:
                raise DataError(f"{name}: give the data root (the folder that holds {name}/)")
            folder = Path(root) / name
            gnd_path = next((p for p in (folder / f"gnd_{name}.pkl", folder / f"gnd_{name}.json") if p.is_file()), None)
            if gnd_path is None:
                raise DataError(
                    f"{name}: ground truth {folder / f'gnd_{name}.pkl'} not found. Run "
                    f"`dtop download {name} --root {root}`."
                )
            hint = f"Run `dtop download {name} --root {root}` (it resumes and fills in what is missing)."
        else:
            path = Path(name_or_path)
            if not path.is_absolute() and root is not None and not path.exists():
                path = Path(root) / path
            if path.is_file():
                folder, gnd_path = path.parent, path
            elif path.is_dir():
                folder, gnd_path = path, _find_gnd(path)
            else:
                raise DataError(
                    f"dataset {key!r} not found: it is neither one of {', '.join(BENCHMARKS)} nor an existing "
                    "folder (with jpg/ and gnd_<name>.pkl or .json) or ground-truth file"
                )
            hint = f"Put the images in {folder / 'jpg'} as <name>.jpg (or with their extension in the list)."
        self.folder: Path = folder
        self.gnd_path: Path = gnd_path
        self.gnd: GroundTruth = load_gnd(gnd_path)
        self.name: str = self.gnd.name or folder.name
        self.image_dir: Path = folder / "jpg"
        self.query_paths: list[Path] = [self.image_dir / image_file_name(n) for n in self.gnd.qimlist]
        self.query_bbxs: list[tuple[float, float, float, float] | None] = [
            None if q["bbx"] is None else tuple(float(v) for v in q["bbx"])  # type: ignore[misc]
            for q in self.gnd.gnd
        ]
        self.database_paths: list[Path] = [self.image_dir / image_file_name(n) for n in self.gnd.imlist]
        if check_images:
            if not self.image_dir.is_dir():
                raise DataError(f"{self.name}: image folder {self.image_dir} not found. {hint}")
            self._check_images(hint)

    def _check_images(self, hint: str) -> None:
        present = set(os.listdir(self.image_dir))
        names: list[str] = []
        seen: set[str] = set()
        for p in [*self.query_paths, *self.database_paths]:
            rel = p.relative_to(self.image_dir).as_posix()
            if rel in seen:
                continue
            seen.add(rel)
            ok = rel in present if "/" not in rel else p.is_file()
            if not ok:
                names.append(rel)
        if names:
            raise _missing_error(self.name, names, len(seen), self.image_dir, hint)

    @property
    def n_queries(self) -> int:
        """Number of queries."""
        return len(self.query_paths)

    @property
    def n_database(self) -> int:
        """Number of database images."""
        return len(self.database_paths)

    def query_dataset(self, transform: Any = None, *, crop: bool = True, **kwargs: Any) -> ImageListDataset:
        """The queries as an :class:`~dtop.data.images.ImageListDataset`, cropped to their bbx.

        ``crop=False`` gives the whole query images (an ablation; the protocol crops). Other keyword
        arguments (``on_error``, ``exif_transpose``, ...) go to the dataset.
        """
        from dtop.data.images import ImageListDataset

        bbxs = self.query_bbxs if crop else None
        return ImageListDataset(self.query_paths, bbxs=bbxs, transform=transform, **kwargs)

    def database_dataset(self, transform: Any = None, **kwargs: Any) -> ImageListDataset:
        """The database images as an :class:`~dtop.data.images.ImageListDataset`; never cropped."""
        from dtop.data.images import ImageListDataset

        return ImageListDataset(self.database_paths, bbxs=None, transform=transform, **kwargs)

    def __repr__(self) -> str:
        return (
            f"RevisitedDataset(name={self.name!r}, folder={str(self.folder)!r}, "
            f"queries={self.n_queries}, database={self.n_database})"
        )


def r1m_folder(root: str | os.PathLike) -> Path:
    """The R1M folder under ``root``: ``root/revisitop1m`` (or ``root`` itself if it holds the list)."""
    root = Path(root)
    if (root / f"{R1M_NAME}.txt").is_file() and not (root / R1M_NAME / f"{R1M_NAME}.txt").is_file():
        return root
    return root / R1M_NAME


def load_r1m_list(root: str | os.PathLike, *, check_count: bool = True, check_files: bool = False) -> list[Path]:
    """Paths of the R1M distractors: ``<root>/revisitop1m/jpg/<line>`` for each line of ``revisitop1m.txt``.

    ``check_count`` requires the official 1,001,001 entries (a shorter list is a truncated
    download). ``check_files`` checks that every image exists (a few seconds for 1M files) and
    reports how many and which are missing.
    """
    folder = r1m_folder(root)
    list_path = folder / f"{R1M_NAME}.txt"
    if not list_path.is_file():
        raise DataError(f"R1M image list {list_path} not found. Run `dtop download revisitop1m --root {root}`.")
    names = read_image_names(list_path)
    if check_count and len(names) != R1M_SIZE:
        raise DataError(
            f"{list_path}: {len(names)} images listed, the official list has {R1M_SIZE:,}; the file is "
            "truncated or not the official list. Delete it and run `dtop download revisitop1m`."
        )
    jpg = folder / "jpg"
    paths = [jpg / n for n in names]
    if check_files:
        missing = [n for n, p in zip(names, paths) if not p.is_file()]
        if missing:
            raise _missing_error(
                R1M_NAME,
                missing,
                len(names),
                jpg,
                f"Run `dtop download revisitop1m --root {root}` (it resumes and fills in what is missing).",
            )
    return paths
