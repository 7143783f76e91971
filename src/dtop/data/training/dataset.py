"""The training dataset (crop, resize, augmentation) and the collate functions that drop unreadable images.

:class:`TrainDataset` takes ``(index, (height, width))`` items from the batch samplers of
:mod:`dtop.data.sampler`. All randomness comes from ``torch``'s global RNG, so seeding it per item
(as the trainer does) makes the augmentation reproducible.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from dtop.data.images import RESAMPLE, load_image, to_tensor
from dtop.data.training.trainingset import TrainingSet
from dtop.errors import DataError

log = logging.getLogger(__name__)


class TrainDataset(Dataset):
    """Training images at the batch's common size: ``dataset[(index, (H, W))] -> (tensor, label) | None``.

    Without augmentation the image is centre-cropped to the aspect ratio ``W / H`` (the sampler's
    bucket is close to the image's own ratio, so little is cut) and resized to exactly ``H × W``.
    With augmentation (random-resized-crop style, aspect kept near the bucket's):

    - a crop of the target aspect ratio times a factor in ``[1/ratio_jitter, ratio_jitter]``,
      covering a fraction of ``scale`` of the largest such crop's area, at a random position;
      resized to ``H × W`` (so the content is stretched by at most ``ratio_jitter``);
    - a horizontal flip with probability ``flip`` (0.5);
    - colour jitter (brightness, contrast, saturation each ± ``color_jitter``).

    Then ``(x / 255 - mean) / std``. An image that cannot be loaded gives ``None`` (and a warning
    for the first ``max_warnings`` of a process); :func:`collate_skip_bad` drops it.
    """

    def __init__(
        self,
        training_set: TrainingSet,
        augment: bool,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio_jitter: float = 1.1,
        flip: float = 0.5,
        color_jitter: float = 0.2,
        max_warnings: int = 20,
    ) -> None:
        self.training_set = training_set
        self.augment = bool(augment)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if not (0 < scale[0] <= scale[1] <= 1):
            raise DataError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if ratio_jitter < 1:
            raise DataError(f"ratio_jitter must be >= 1, got {ratio_jitter}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio_jitter = float(ratio_jitter)
        self.flip = float(flip)
        self.color_jitter = float(color_jitter)
        self.max_warnings = int(max_warnings)
        self._warned = 0
        self._jitter = None
        if self.augment and self.color_jitter > 0:
            from torchvision.transforms import v2

            c = self.color_jitter
            self._jitter = v2.ColorJitter(brightness=c, contrast=c, saturation=c)

    def __len__(self) -> int:
        return len(self.training_set)

    def _crop_box(self, w: int, h: int, target: float) -> tuple[float, float, float, float]:
        if self.augment:
            lo = math.log(1.0 / self.ratio_jitter)
            ratio = target * math.exp(lo + (-2 * lo) * float(torch.rand(())))
        else:
            ratio = target
        # The largest crop of aspect `ratio` inside the image.
        if w / h > ratio:
            ch, cw = float(h), h * ratio
        else:
            cw, ch = float(w), w / ratio
        if self.augment:
            s0, s1 = self.scale
            area = s0 + (s1 - s0) * float(torch.rand(()))
            k = math.sqrt(area)
            cw, ch = cw * k, ch * k
            x0 = (w - cw) * float(torch.rand(()))
            y0 = (h - ch) * float(torch.rand(()))
        else:
            x0, y0 = (w - cw) / 2.0, (h - ch) / 2.0
        return x0, y0, x0 + cw, y0 + ch

    def load(self, index: int, size: tuple[int, int]) -> Image.Image:
        """The transformed PIL image (before normalisation) of ``index`` at ``size`` = (H, W); may raise."""
        height, width = int(size[0]), int(size[1])
        if height < 1 or width < 1:
            raise DataError(f"invalid training size {size!r}; expected (height, width)")
        path = self.training_set.paths[index]
        img = load_image(path, draft_long_side=max(height, width))
        w, h = img.size
        box = self._crop_box(w, h, width / height)
        out = img.resize((width, height), resample=RESAMPLE, box=box)
        if self.augment:
            if self.flip > 0 and float(torch.rand(())) < self.flip:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if self._jitter is not None:
                out = self._jitter(out)
        return out

    def __getitem__(self, item: Any) -> tuple[torch.Tensor, int] | None:
        if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[1], tuple | list)):
            raise DataError(
                "TrainDataset items are (index, (height, width)) from a batch sampler of dtop.data.sampler; "
                f"got {item!r}"
            )
        index = int(item[0])
        label = int(self.training_set.labels[index])
        try:
            img = self.load(index, (int(item[1][0]), int(item[1][1])))
        except (DataError, OSError, ValueError, Image.DecompressionBombError) as err:
            if self._warned < self.max_warnings:
                self._warned += 1
                more = " (further warnings of this worker are suppressed)" if self._warned == self.max_warnings else ""
                log.warning("skipping training image %d: %s%s", index, err, more)
            return None
        return to_tensor(img, self.mean, self.std), label


def collate_skip_bad(
    batch: Sequence[tuple[torch.Tensor, int] | None],
) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """DataLoader ``collate_fn`` for :class:`TrainDataset`: drop unreadable images (``None``).

    Returns ``(images (B, 3, H, W), labels int64 (B,), n_skipped)``; when every image of the batch
    was unreadable, ``(None, None, n_skipped)``.
    """
    good = [b for b in batch if b is not None]
    n_skipped = len(batch) - len(good)
    if not good:
        return None, None, n_skipped
    shapes = {tuple(g[0].shape) for g in good}
    if len(shapes) != 1:
        raise DataError(
            f"a training batch mixes image sizes {sorted(shapes)}; use a batch sampler of dtop.data.sampler"
        )
    images = torch.stack([g[0] for g in good])
    labels = torch.tensor([int(g[1]) for g in good], dtype=torch.int64)
    return images, labels, n_skipped


def collate_tuples(
    batch: Sequence[tuple[torch.Tensor, int] | None], tuple_size: int
) -> tuple[torch.Tensor | None, None, int]:
    """DataLoader ``collate_fn`` for batches of tuples ``(q, p, n1 … nk)`` laid out one after the other.

    A tuple with an unreadable image is dropped whole (its loss needs every image). Returns
    ``(images (T * tuple_size, 3, H, W), None, n_skipped)`` with ``n_skipped`` the images of the
    dropped tuples; ``(None, None, n_skipped)`` when no tuple is left.
    """
    if len(batch) % tuple_size:
        raise DataError(f"a batch of {len(batch)} images is not made of tuples of {tuple_size}")
    kept: list[tuple[torch.Tensor, int]] = []
    for start in range(0, len(batch), tuple_size):
        readable = [item for item in batch[start : start + tuple_size] if item is not None]
        if len(readable) == tuple_size:
            kept.extend(readable)
    images, _, _ = collate_skip_bad(kept) if kept else (None, None, 0)
    return images, None, len(batch) - len(kept)

