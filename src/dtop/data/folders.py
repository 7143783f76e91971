"""Image lists from folders and list files (for users' own photos), with what was skipped and why."""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from dtop.errors import DataError
from dtop.utils.paths import show_path

IMAGE_SUFFIXES: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm"
)
"""File suffixes (lower case) that mark an image: folder scans look for them, and an image name that
ends in one keeps it (a name without one gets ``.jpg``, see :func:`dtop.data.revisited.image_file_name`)."""


@dataclasses.dataclass(frozen=True)
class Skipped:
    """An entry of a folder that was not listed: an unreadable sub-folder, a dangling or looping link,
    a FIFO or device with an image suffix."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{show_path(self.path)}: {self.reason}"


class ImageList(list[Path]):
    """The images found (a plain list of paths) and :attr:`skipped`, the entries left out with a reason."""

    def __init__(self, paths: Iterable[Path] = (), skipped: Iterable[Skipped] = ()) -> None:
        super().__init__(paths)
        self.skipped: list[Skipped] = list(skipped)


def list_images(root: str | os.PathLike) -> ImageList:
    """All image files under ``root`` (recursively, by suffix; hidden files left out), sorted by path.

    Linked folders are followed, each real folder once (a link back up is no loop). Whatever cannot
    be listed (an unreadable sub-folder, a dangling or looping link, a FIFO or device named like an
    image) is never opened and is reported in :attr:`ImageList.skipped`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {show_path(root)}")
    found: list[Path] = []
    skipped: list[Skipped] = []
    seen: set[tuple[int, int]] = set()
    # Real folders first, linked ones after: a folder reached both ways is listed by its real path.
    folders: list[Path] = [root]
    links: list[Path] = []
    while folders or links:
        folder = folders.pop() if folders else links.pop(0)
        subfolders: list[Path] = []
        for entry in _folder_entries(folder, seen, skipped):
            path = Path(entry.path)
            if _is_dir(entry):
                (links if entry.is_symlink() else subfolders).append(path)
            elif path.suffix.lower() in IMAGE_SUFFIXES and not entry.name.startswith("."):
                problem = _not_a_file(entry)
                if problem:
                    skipped.append(Skipped(entry.path, problem))
                else:
                    found.append(path)
        folders.extend(reversed(subfolders))
    return ImageList(sorted(found), sorted(skipped, key=lambda s: s.path))


def _folder_entries(folder: Path, seen: set[tuple[int, int]], skipped: list[Skipped]) -> list[os.DirEntry[str]]:
    """The entries of ``folder`` by name; none if it was listed before (by device and inode) or cannot be."""
    try:
        st = folder.stat()
        key = (st.st_dev, st.st_ino)
        if key in seen:
            skipped.append(Skipped(str(folder), "a link to a folder listed already (each folder is listed once)"))
            return []
        seen.add(key)
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as err:
        skipped.append(Skipped(str(folder), f"cannot list the folder ({err.strerror or err}); make it readable "
                               "(chmod +rx) or move it out"))
        return []


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows links
    except OSError:
        return False


def _not_a_file(entry: os.DirEntry[str]) -> str | None:
    """Why an entry with an image suffix is not an image file to list, or None if it is one."""
    try:
        mode = os.stat(entry.path).st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symbolic link loop; fix or remove the link"
        if entry.is_symlink():
            return "a dangling symbolic link (its target does not exist); fix or remove the link"
        return f"cannot access it ({err.strerror or err})"
    if not stat.S_ISREG(mode):
        return "not a regular file (a FIFO, device or socket); only image files are read"
    return None


def read_image_list(source: str | os.PathLike) -> ImageList:
    """Images of a folder (see :func:`list_images`), or of a text file with one path per line.

    Paths in a list file are relative to the file; its bytes are taken as file-system bytes, so
    names that are not UTF-8 keep their bytes. Entries of a list file are not checked here: the
    loader reports a missing or unreadable one as that image's failure.
    """
    source = Path(source)
    if source.is_dir():
        images = list_images(source)
    elif source.is_file():
        if source.suffix.lower() in IMAGE_SUFFIXES:
            raise DataError(f"{show_path(source)} is an image, not a list of images; give its folder, or a text "
                            "file with one image path per line")
        try:
            raw = source.read_bytes()
        except OSError as err:
            raise DataError(f"cannot read the image list {show_path(source)} ({err.strerror or err})") from err
        lines = (os.fsdecode(line.strip()) for line in raw.split(b"\n"))
        images = ImageList(p if p.is_absolute() else source.parent / p for p in (Path(line) for line in lines if line))
    else:
        raise DataError(f"{show_path(source)} is neither an image folder nor a list file; check the path")
    if not images:
        skipped = "".join(f"; skipped {s}" for s in images.skipped[:3])
        raise DataError(f"no images found in {show_path(source)} (looked for {', '.join(IMAGE_SUFFIXES)}){skipped}")
    return images
