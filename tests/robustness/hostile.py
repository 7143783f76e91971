"""Hostile inputs for the robustness suite, generated in the test (fixtures in conftest.py).

:func:`broken_images` makes malformed files of every format PIL writes (truncated, bit-flipped,
zeroed header bytes), :func:`make_corpus` a folder of good images mixed with hostile entries
(zero-byte files, FIFOs, folders named ``*.jpg``, unreadable files, odd names, symlink loops).
Every test counts what it tried in :data:`TRIED` and :data:`COMMANDS` (printed at the end of the session).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

#: Formats PIL writes from an 8-bit RGB image (or the mode given), with the suffix they normally have.
FORMATS: dict[str, tuple[str, str]] = {
    "PNG": (".png", "RGB"), "JPEG": (".jpg", "RGB"), "GIF": (".gif", "RGB"), "BMP": (".bmp", "RGB"),
    "TIFF": (".tif", "RGB"), "WEBP": (".webp", "RGB"), "DDS": (".dds", "RGB"), "ICO": (".ico", "RGB"),
    "PPM": (".ppm", "RGB"), "TGA": (".tga", "RGB"), "PCX": (".pcx", "RGB"), "SGI": (".sgi", "RGB"),
    "QOI": (".qoi", "RGB"), "JPEG2000": (".jp2", "RGB"), "IM": (".im", "RGB"), "MSP": (".msp", "1"),
    "SPIDER": (".spi", "F"), "XBM": (".xbm", "1"), "DIB": (".dib", "RGB"), "AVIF": (".avif", "RGB"),
}

#: Corruptions applied to a valid file's bytes: name -> function(bytes, rng) -> bytes.
CORRUPTIONS: dict[str, Callable[[bytes, np.random.Generator], bytes]] = {
    "truncated-half": lambda b, rng: b[: len(b) // 2],
    "truncated-head": lambda b, rng: b[:24],
    "truncated-tail": lambda b, rng: b[:-8],
    "zeroed-80": lambda b, rng: b[:80] + bytes(4) + b[84:],  # the damaged-DDS reproduction of the issue
    "zeroed-header": lambda b, rng: b[:4] + bytes(min(60, len(b) - 4)) + b[64:],
    "bitflips": lambda b, rng: _flip_bits(b, rng, 8),
    "bitflips-header": lambda b, rng: _flip_bits(b, rng, 4, limit=64),
    "garbage-body": lambda b, rng: b[:32] + rng.integers(0, 256, max(0, len(b) - 32), dtype=np.uint8).tobytes(),
}

#: Every hostile input a test tried, by kind (printed in the terminal summary).
TRIED: Counter[str] = Counter()
#: Every command line run through :func:`run_cli`, by command (``dtop index build``).
COMMANDS: Counter[str] = Counter()

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _flip_bits(data: bytes, rng: np.random.Generator, n: int, limit: int | None = None) -> bytes:
    b = bytearray(data)
    top = min(len(b), limit or len(b))
    for pos in rng.integers(0, top, n):
        b[int(pos)] ^= 1 << int(rng.integers(0, 8))
    return bytes(b)


def texture(seed: int, size: tuple[int, int] = (40, 32)) -> Image.Image:
    """A random RGB image of ``size`` (W, H): coarse colours upsampled plus noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, (4, 5, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC), dtype=np.int64)
    noise = rng.integers(-30, 30, (size[1], size[0], 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str) -> bytes:
    """``img`` written in PIL format ``fmt`` (converted to the mode that format needs)."""
    mode = FORMATS[fmt][1]
    buf = io.BytesIO()
    with warnings.catch_warnings():  # IM is deprecated in Pillow 12 (still read, so still tried)
        warnings.simplefilter("ignore", DeprecationWarning)
        (img if img.mode == mode else img.convert(mode)).save(buf, format=fmt)
    return buf.getvalue()


@dataclasses.dataclass(frozen=True)
class Broken:
    """A malformed image file: its bytes and how they were made."""

    fmt: str
    corruption: str
    data: bytes

    @property
    def name(self) -> str:
        return f"broken-{self.fmt.lower()}-{self.corruption}"


def decodes(data: bytes) -> bool:
    """Whether PIL decodes ``data`` without an exception (a bit flip in pixel data often does)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                im.load()
    except Exception:
        return False
    return True


def broken_images(seed: int = 0) -> list[Broken]:
    """One file per (format, corruption) pair, deterministic for ``seed``; duplicates dropped."""
    img = texture(seed)
    out, seen = [], set()
    for fmt in FORMATS:
        try:
            good = encode(img, fmt)
        except (OSError, ValueError, KeyError):  # a codec missing in this PIL build
            continue
        for i, (name, corrupt) in enumerate(CORRUPTIONS.items()):
            data = corrupt(good, np.random.default_rng([seed, i, len(out)]))
            if data != good and data not in seen:
                seen.add(data)
                out.append(Broken(fmt, name, data))
    return out


@dataclasses.dataclass
class Corpus:
    """A folder of good images and hostile entries (all found by a folder scan: image suffixes)."""

    root: Path
    #: Good images (also those with odd names): each must produce a result.
    good: list[Path]
    #: Regular files that cannot be decoded: each must be a named failure, never the run's end.
    bad: list[Path]
    #: Entries that are not regular files or cannot be listed (FIFO, folder named *.jpg, loops,
    #: dangling links): never opened, reported or ignored, never fatal.
    odd: list[Path]

    @property
    def size(self) -> int:
        return len(self.good) + len(self.bad) + len(self.odd)


def fs_accepts(root: Path, name: bytes) -> bool:
    """Whether the file system at ``root`` accepts the file name ``name`` (bytes)."""
    probe = os.path.join(os.fsencode(root), name)
    try:
        with open(probe, "wb"):
            pass
    except OSError:
        return False
    os.unlink(probe)
    return True


def make_corpus(root: Path, *, n_good: int = 3, broken: int | None = 12, odd_names: bool = True,
                special: bool = True) -> Corpus:
    """Create a corpus under ``root``: ``n_good`` plain good images, ``broken`` malformed ones (None:
    every (format, corruption) pair), good images with odd names and the special entries."""
    root.mkdir(parents=True, exist_ok=True)
    corpus = Corpus(root, [], [], [])
    for i in range(n_good):
        path = root / f"good{i}.jpg"
        texture(i, (40 + 8 * i, 32)).save(path, quality=90)
        corpus.good.append(path)
    items = [b for b in broken_images() if not decodes(b.data)]
    if broken is not None:  # a spread over formats and corruptions
        step = max(1, len(items) // broken)
        items = items[::step][:broken]
    for item in items:
        path = root / f"{item.name}.jpg"
        path.write_bytes(item.data)
        corpus.bad.append(path)
    empty = root / "empty.jpg"
    empty.write_bytes(b"")
    corpus.bad.append(empty)
    text = root / "notes.png"
    text.write_text("not an image\n")
    corpus.bad.append(text)
    if odd_names:
        names = [b"-leading-dash.jpg", b"space name.jpg", "caf\u00e9 \u65e5\u672c.jpg".encode(),
                 b"bad\xffname.jpg", b"line\nbreak.jpg", b"tab\tname.jpg", b"x" * 240 + b".jpg"]
        for k, name in enumerate(names):
            if not fs_accepts(root, name):
                continue
            path = Path(os.fsdecode(os.path.join(os.fsencode(root), name)))
            texture(100 + k).save(path, format="JPEG", quality=90)
            corpus.good.append(path)
    if special:
        fifo = root / "fifo.jpg"
        os.mkfifo(fifo)
        corpus.odd.append(fifo)
        (root / "folder.jpg").mkdir()
        corpus.odd.append(root / "folder.jpg")
        (root / "dangling.jpg").symlink_to(root / "does-not-exist.jpg")
        corpus.odd.append(root / "dangling.jpg")
        (root / "loop").symlink_to(root, target_is_directory=True)  # a folder link back to the root
        (root / "self.jpg").symlink_to(root / "self.jpg")  # ELOOP
        corpus.odd.append(root / "self.jpg")
        (root / "devnull.jpg").symlink_to("/dev/zero")  # a character device: reading never ends
        corpus.odd.append(root / "devnull.jpg")
        if not IS_ROOT:  # root reads everything; tests simulate EACCES with deny_access() instead
            locked = root / "locked.jpg"
            texture(50).save(locked, quality=90)
            locked.chmod(0)
            corpus.bad.append(locked)
    return corpus


@dataclasses.dataclass
class CliResult:
    """Exit status and output of one ``dtop`` run."""

    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        """The ``dtop …: error:`` lines of stderr."""
        return [line for line in self.err.splitlines() if ": error: " in line]


def run_dtop(*argv: str | os.PathLike[str]) -> CliResult:
    """Run ``dtop argv`` in-process, its output written as to a terminal (UTF-8, strict on stdout, so
    printing a name that is not UTF-8 fails as it would); asserts that no traceback reached stderr."""
    from dtop.cli.main import main

    args = [os.fspath(a) for a in argv]
    COMMANDS[" ".join(["dtop", *args[:2 if args[:1] in (["index"], ["data"]) else 1]])] += 1
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", write_through=True)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exit_:  # argparse errors
            code = int(exit_.code or 0)
    result = CliResult(code, out.buffer.getvalue().decode(), err.buffer.getvalue().decode())  # type: ignore[attr-defined]
    assert "Traceback" not in result.err, result.err
    return result


#: Options of a fast extraction for the tests (dtop_tiny at 32 pixels, one scale, no worker processes).
OPTS = ["--image-size", "32", "--scales", "1", "--workers", "0", "--no-progress"]


def build_index(images: Path, out: Path, *extra: str) -> CliResult:
    """``dtop index build`` of ``images`` into ``out`` with dtop_tiny and :data:`OPTS`."""
    return run_dtop("index", "build", "--images", images, "--model", "dtop_tiny", "--out", out, *OPTS, *extra)


__all__ = ["FORMATS", "CORRUPTIONS", "TRIED", "COMMANDS", "IS_ROOT", "Broken", "Corpus", "broken_images",
           "make_corpus", "texture", "encode", "fs_accepts", "CliResult", "run_dtop", "OPTS", "build_index"]
