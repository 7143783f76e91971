"""The one image loader of dtop, the model-input resize policy and an image-list dataset.

:func:`load_image` returns 8-bit RGB in the stored pixel layout (no EXIF rotation unless asked),
with transparency composited on white, and raises :class:`ImageLoadError` with the reason for
any unreadable file. :func:`resize_image` gives the model a size whose sides are multiples of 16,
rounded by :func:`round_to_multiple` (halves up). ``docs/data.md`` gives the conversion rules and
the reasons.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from dtop.errors import DataError
from dtop.utils.paths import show_path

log = logging.getLogger(__name__)

ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)
"""Background colour (white) on which images with transparency are composited."""

RESAMPLE = Image.Resampling.BICUBIC
"""Resampling filter of :func:`resize_image` (PIL bicubic, antialiased when downsampling)."""

MULTIPLE = 16
"""Both sides of a model input are multiples of this (the ViT patch size), so the model never pads."""

MAX_SIDE = 16384
"""Largest longer side of a model input (already 800 MB as uint8 RGB); larger requests are refused, not
attempted (an image size of 100000 used to grow until the process was killed)."""

DRAFT_MARGIN: float = 2.0
"""With ``draft_long_side``, a JPEG is decoded at a reduced DCT scale only while its longer side
stays at least this factor above the final size, so the final antialiased resize still dominates."""

_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageLoadError(DataError):
    """An image file is missing, empty, not an image, truncated or otherwise unreadable."""

    def __init__(self, path: str | bytes | os.PathLike, reason: str) -> None:
        self.path = os.fsdecode(path)
        self.reason = reason
        super().__init__(f"cannot load image {show_path(self.path)}: {reason}")


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Convert a loaded image of any PIL mode to 8-bit RGB (the rules are in docs/data.md)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        arr = np.asarray(img)
        if mode == "F":
            arr = arr.astype(np.float64)
            arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
            arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
            out = np.clip(np.floor(arr + 0.5), 0, 255).astype(np.uint8)
        else:
            arr = arr.astype(np.int64)
            if mode.startswith("I;16") or (arr.size and arr.max() > 255):
                arr = (np.clip(arr, 0, 65535) * 255 + 32767) // 65535  # round(v / 257)
            out = np.clip(arr, 0, 255).astype(np.uint8)
        return Image.fromarray(out, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode == "1":
        img = img.convert("L")
    return img.convert("RGB")


def _open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file; :class:`ImageLoadError` with the reason if not.

    The file is opened non-blocking and checked with ``fstat`` before a byte is read, so a FIFO, a
    device or a folder is refused without ever waiting on it.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if path.is_symlink():
            raise ImageLoadError(path, "dangling symbolic link (its target does not exist); fix or remove the link"
                                 ) from None
        raise ImageLoadError(path, "file not found (check the path, or download the dataset)") from None
    except PermissionError as err:
        raise ImageLoadError(path, f"permission denied ({err.strerror}); make the file readable (chmod +r) "
                             "or leave it out") from None
    except IsADirectoryError:
        raise ImageLoadError(path, "a folder, not an image file") from None
    except OSError as err:
        raise ImageLoadError(path, f"cannot open the file ({err.strerror or err})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO, device or socket"
            raise ImageLoadError(path, f"not a regular file ({kind}); give image files only")
        if st.st_size == 0:
            raise ImageLoadError(path, "empty file (0 bytes); the download or copy failed, fetch it again")
        if flags & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _decode_reason(err: BaseException, fp: BinaryIO) -> str:
    """Why decoding failed, for :class:`ImageLoadError` (any exception of PIL is the image's failure)."""
    if isinstance(err, UnidentifiedImageError):
        fp.seek(0)
        head = fp.read(8)
        return f"not an image file in a format PIL can read (the file starts with {head!r})"
    if isinstance(err, Image.DecompressionBombError):
        return f"image too large to decode safely ({err})"
    if isinstance(err, MemoryError):
        return "image too large to decode in the available memory"
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.errno is not None:  # an I/O error of the file system, not PIL's
        return f"read error ({err.strerror or text}); check the disk or copy the file again"
    if "truncated" in text.lower():
        return f"truncated image data ({text}); the file is incomplete, download or copy it again"
    return f"corrupt or unsupported image data ({type(err).__name__}: {text})"


def _report_warnings(path: Path, caught: list[warnings.WarningMessage]) -> None:
    """Log the distinct warnings PIL gave while decoding ``path``, once each, naming the file (they do not
    reach the ``warnings`` module, whose per-process registry repeats them in every DataLoader worker)."""
    for message in dict.fromkeys(str(w.message).strip() for w in caught):
        log.warning("%s: %s", show_path(path), message)


def _open_rgb(
    path: str | os.PathLike,
    draft_long_side: float | None = None,
    background: tuple[int, int, int] = ALPHA_BACKGROUND,
) -> tuple[Image.Image, int]:
    """Load ``path`` as RGB in its stored layout; return it and its EXIF orientation (1 if none)."""
    path = Path(path)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise DataError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (some code turned it on): truncated images "
            "would load silently with missing pixels. Set it back to False before loading images "
            "with dtop."
        )
    # We own the file object: closing it after load() keeps the decoded pixels, whereas closing a
    # PIL image that opened its own file discards them (and would force a copy).
    with _open_regular(path) as fp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            im = Image.open(fp)
            orientation = _orientation(im)
            if draft_long_side is not None and im.format == "JPEG" and draft_long_side > 0:
                w, h = im.size
                k = DRAFT_MARGIN * float(draft_long_side) / max(w, h)
                if k < 1.0:
                    im.draft(im.mode, (max(1, math.ceil(w * k)), max(1, math.ceil(h * k))))
            im.load()
            rgb = _to_rgb(im, background)
        except Exception as err:  # whatever PIL raises on a malformed file, it is this image's failure
            raise ImageLoadError(path, _decode_reason(err, fp)) from err
    _report_warnings(path, caught)  # of an image that loaded (a failure's reason says enough)
    return rgb, orientation


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation of ``im`` (1 if none or unreadable: a corrupt EXIF block must not make a
    readable image unreadable)."""
    try:
        return int(im.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:
        return 1


def _apply_orientation(img: Image.Image, orientation: int) -> Image.Image:
    method = _TRANSPOSE.get(orientation)
    return img.transpose(method) if method is not None else img


def load_image(
    path: str | os.PathLike,
    exif_transpose: bool = False,
    *,
    draft_long_side: float | None = None,
    background: tuple[int, int, int] = ALPHA_BACKGROUND,
) -> Image.Image:
    """Load an image file as 8-bit RGB; raise :class:`ImageLoadError` with the reason if it fails.

    ``exif_transpose`` applies the EXIF orientation (off by default: the benchmarks' bbx refer to
    the stored layout). ``draft_long_side``: the caller will downscale so that the longer side is at
    most this; a JPEG may then be decoded at 1/2, 1/4 or 1/8 scale (PIL ``draft``) as long as its
    longer side stays at least :data:`DRAFT_MARGIN` times that. ``background``: colour on which
    transparent images are composited (white by default).
    """
    img, orientation = _open_rgb(path, draft_long_side, background)
    return _apply_orientation(img, orientation) if exif_transpose else img


def crop_bbx(img: Image.Image, bbx: Sequence[float], path: str | os.PathLike = "<image>") -> Image.Image:
    """Crop ``img`` to ``bbx`` = [x1, y1, x2, y2] exactly like the revisited reference code.

    The reference calls PIL ``img.crop(bbx)``; PIL rounds each float coordinate with Python's
    ``round`` (half to even: 136.5 → 136, 648.5 → 648, 955.7 → 956) and pads a box reaching outside
    the image with black. This function calls ``img.crop`` the same way, and raises
    :class:`ImageLoadError` when the rounded box is empty.
    """
    box = tuple(float(v) for v in bbx)
    if len(box) != 4:
        raise ImageLoadError(path, f"bbx must be [x1, y1, x2, y2], got {list(bbx)!r}")
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ImageLoadError(path, f"bbx {list(box)} is empty after rounding to pixels ({x0},{y0},{x1},{y1})")
    return img.crop(box)


def round_to_multiple(x: float, multiple: int = MULTIPLE) -> int:
    """``x`` rounded to the nearest multiple of ``multiple``, halves up, and at least ``multiple``.

    Halves go up (40 → 48, 72 → 80), not to even as Python's ``round`` would (40 → 32). Every side
    length dtop computes (model inputs, training buckets, tuple batches) is rounded here.
    """
    return max(multiple, multiple * math.floor(x / multiple + 0.5))


def target_size(width: int, height: int, long_side: float, multiple: int = MULTIPLE) -> tuple[int, int]:
    """Model-input size ``(W, H)`` for an image of ``width`` × ``height`` (see :func:`resize_image`).

    Scale so that the longer side is ``floor(long_side + 0.5)``; each side is rounded half up to an
    integer, then by :func:`round_to_multiple` (halves up, at least ``multiple``).
    """
    if width <= 0 or height <= 0:
        raise DataError(f"cannot resize an empty image ({width}x{height})")
    if not (long_side > 0 and math.isfinite(long_side)):
        raise DataError(f"long_side must be a positive number, got {long_side!r}")
    if long_side > MAX_SIDE:
        raise DataError(f"a model input of {long_side:.0f} pixels is larger than {MAX_SIDE}; use a smaller image size "
                        "or scale")
    if multiple < 1:
        raise DataError(f"multiple must be a positive integer, got {multiple!r}")
    target_long = max(1, math.floor(long_side + 0.5))
    longer = max(width, height)
    scale = target_long / longer

    def side(n: int) -> int:
        s = target_long if n == longer else max(1, math.floor(n * scale + 0.5))
        return round_to_multiple(s, multiple)

    return side(width), side(height)


def resize_image(img: Image.Image, long_side: float, multiple: int = MULTIPLE) -> Image.Image:
    """Resize so the longer side is ``long_side`` and both sides are multiples of ``multiple``.

    ``long_side`` may be a float (``1024 / √2`` → 724 → 720 after rounding to 16). The size is
    :func:`target_size`; one bicubic PIL resize (antialiased when downsampling) goes directly to
    it, so the aspect ratio changes by at most half a multiple per side and the model never pads.
    """
    w, h = img.size
    size = target_size(w, h, long_side, multiple)
    if size == (w, h):
        return img
    return img.resize(size, resample=RESAMPLE)


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> None:
    if len(mean) != 3 or len(std) != 3:
        raise DataError(f"mean and std need 3 values (R, G, B), got mean={list(mean)} std={list(std)}")
    if any(not s > 0 for s in std):
        raise DataError(f"std values must be positive, got {list(std)}")


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """Convert an image to a uint8 tensor (3, H, W) of its RGB values (4× less to move than float32)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def channel_tensors(
    mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` as float32 (3, 1, 1) tensors on ``device``, for :func:`normalize`.

    Build them once per run: making a tensor from host values on CUDA is a blocking copy that waits
    for the whole stream, so doing it per batch would stall the GPU between batches.
    """
    _check_mean_std(mean, std)

    def as_tensor(values: Sequence[float]) -> torch.Tensor:
        return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device).view(3, 1, 1)

    return as_tensor(mean), as_tensor(std)


def normalize(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """uint8 RGB values (…, 3, H, W) → float32 ``(x / 255 - mean) / std``, on ``x``'s device.

    ``mean``/``std`` are 3 numbers each, or the tensors of :func:`channel_tensors` on ``x``'s device
    (no host-to-device copy). Extraction moves uint8 batches to the GPU and normalises there;
    :func:`to_tensor` runs the same arithmetic on the CPU.
    """
    if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor):
        mean_t, std_t = mean, std
    else:
        mean_t, std_t = channel_tensors([float(v) for v in mean], [float(v) for v in std], x.device)
    return x.to(torch.float32).div_(255.0).sub_(mean_t).div_(std_t)


def to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Convert an RGB image to a normalised float32 tensor (3, H, W): ``(x / 255 - mean) / std``."""
    return normalize(to_uint8_tensor(img), mean, std).contiguous()


class ResizeToTensor:
    """Transform: :func:`resize_image` to ``long_side`` then :func:`to_tensor` (picklable for workers)."""

    def __init__(self, long_side: float, mean: Sequence[float], std: Sequence[float], multiple: int = MULTIPLE
                 ) -> None:
        self.long_side = float(long_side)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.multiple = int(multiple)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Resize and normalise one image."""
        return to_tensor(resize_image(img, self.long_side, self.multiple), self.mean, self.std)

    def __repr__(self) -> str:
        return f"ResizeToTensor(long_side={self.long_side}, mean={self.mean}, std={self.std}, multiple={self.multiple})"


@dataclass(frozen=True)
class LoadFailure:
    """Sentinel returned by :class:`ImageListDataset` in ``on_error="skip"`` mode for a bad image."""

    index: int
    path: str
    reason: str


def collate_with_failures(
    batch: Sequence[tuple[Any, int]],
) -> tuple[list[Any], list[int], list[LoadFailure]]:
    """DataLoader ``collate_fn`` for ``on_error="skip"``: split loaded items from failures.

    Returns ``(images, indices, failures)``: the transformed images and their dataset indices (in
    batch order, failures left out) and the :class:`LoadFailure` records. Images are returned as a
    list because images of different aspect ratios have different sizes; stack them if they match.
    """
    images: list[Any] = []
    indices: list[int] = []
    failures: list[LoadFailure] = []
    for item, index in batch:
        if isinstance(item, LoadFailure):
            failures.append(item)
        else:
            images.append(item)
            indices.append(int(index))
    return images, indices, failures


class ImageListDataset(Dataset):
    """Images from a list of paths, optionally cropped to per-item bbx, then transformed.

    ``dataset[i]`` returns ``(transform(image), i)`` (the PIL image itself when ``transform`` is
    None). ``bbxs[i]`` is ``[x1, y1, x2, y2]`` in the stored pixel layout or None (whole image);
    the crop is :func:`crop_bbx` (PIL ``crop``, as the reference code), before any EXIF rotation.

    ``on_error``: ``"raise"`` (default) lets :class:`ImageLoadError` propagate (a DataLoader
    re-raises it in the main process); ``"skip"`` returns ``(LoadFailure(i, path, reason), i)``
    instead, so an extraction engine can record the failure and go on (use
    :func:`collate_with_failures` as ``collate_fn``). Only image-loading errors are caught;
    errors in ``transform`` propagate in both modes.

    ``draft_long_side``: the largest longer side the transform will resize to; JPEGs without a bbx
    may then be decoded at reduced DCT scale (see :func:`load_image`). Off (None) by default so that
    benchmark numbers do not depend on it; it only speeds up images far larger than the target.

    Paths are stored as one numpy bytes array, so a 1M-image list costs little memory and does not
    grow in forked DataLoader workers.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        bbxs: Sequence[Sequence[float] | None] | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        exif_transpose: bool = False,
        on_error: Literal["raise", "skip"] = "raise",
        draft_long_side: float | None = None,
        background: tuple[int, int, int] = ALPHA_BACKGROUND,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise DataError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        n = len(paths)
        self._paths = np.array([os.fsencode(os.fspath(p)) for p in paths], dtype=np.bytes_)
        if n == 0:
            self._paths = np.array([], dtype="S1")
        self._bbxs: np.ndarray | None = None
        if bbxs is not None:
            if len(bbxs) != n:
                raise DataError(f"got {len(bbxs)} bbxs for {n} paths; give one bbx (or None) per path")
            arr = np.full((n, 4), np.nan, dtype=np.float64)
            for i, b in enumerate(bbxs):
                if b is None:
                    continue
                if len(b) != 4:
                    raise DataError(f"bbxs[{i}] must be [x1, y1, x2, y2] or None, got {b!r}")
                arr[i] = [float(v) for v in b]
            self._bbxs = arr
        self.transform = transform
        self.exif_transpose = bool(exif_transpose)
        self.on_error = on_error
        self.draft_long_side = draft_long_side
        self.background = tuple(background)

    def __len__(self) -> int:
        return int(self._paths.shape[0])

    def path(self, index: int) -> str:
        """Path of item ``index``."""
        return os.fsdecode(bytes(self._paths[index]))

    def bbx(self, index: int) -> tuple[float, float, float, float] | None:
        """Crop box of item ``index`` or None."""
        if self._bbxs is None or np.isnan(self._bbxs[index]).any():
            return None
        return tuple(float(v) for v in self._bbxs[index])  # type: ignore[return-value]

    @property
    def paths(self) -> list[str]:
        """All paths, in order."""
        return [self.path(i) for i in range(len(self))]

    def load(self, index: int) -> Image.Image:
        """Load item ``index`` as RGB, cropped and oriented, without the transform."""
        path = self.path(index)
        bbx = self.bbx(index)
        draft = self.draft_long_side if bbx is None else None
        img, orientation = _open_rgb(path, draft, self.background)  # type: ignore[arg-type]
        if bbx is not None:
            img = crop_bbx(img, bbx, path)
        return _apply_orientation(img, orientation) if self.exif_transpose else img

    def __getitem__(self, index: int) -> tuple[Any, int]:
        index = int(index)
        if index < 0:
            index += len(self)
        try:
            img = self.load(index)
        except ImageLoadError as err:
            if self.on_error == "skip":
                return LoadFailure(index, err.path, err.reason), index
            raise
        return (self.transform(img) if self.transform is not None else img), index


_SIZE_THREADS = 16


def _read_one_size(path: str) -> tuple[int, int]:
    try:
        with _open_regular(Path(path)) as fp, Image.open(fp) as im:
            return int(im.size[0]), int(im.size[1])
    except Exception:  # missing, not a regular file, not an image, corrupt header: unknown, fails when loaded
        return 0, 0


def read_image_sizes(
    paths: Sequence[str], *, workers: int | None = None, progress: bool = True, desc: str = "image sizes"
) -> np.ndarray:
    """``(N, 2)`` int64 width, height from the image headers (PIL, no decoding; ``(0, 0)`` if unreadable).

    Only regular files are opened; PIL's warnings are left to the full load, which reports them.
    """
    with warnings.catch_warnings():  # once around the threads: catch_warnings is not thread-safe
        warnings.simplefilter("ignore")
        return _read_sizes(paths, workers, progress, desc)


def _read_sizes(paths: Sequence[str], workers: int | None, progress: bool, desc: str) -> np.ndarray:
    n = len(paths)
    out = np.zeros((n, 2), dtype=np.int64)
    workers = workers or min(_SIZE_THREADS, 4 * (os.cpu_count() or 1))
    chunk = 1024
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        if workers <= 1 or n < 64:
            for i, p in enumerate(paths):
                out[i] = _read_one_size(p)
                bar.update(1)
            return out
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for start in range(0, n, chunk * workers):
                stop = min(n, start + chunk * workers)
                for i, size in enumerate(pool.map(_read_one_size, paths[start:stop], chunksize=64), start):
                    out[i] = size
                bar.update(stop - start)
    return out
