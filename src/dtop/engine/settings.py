"""Typed extraction settings and autocast modes (light: the CLI builds its parsers without torch)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from dtop.config import AtLeast, PositiveFloat, apply_overrides, check_fields, from_dict, load_config
from dtop.errors import ConfigError

#: Autocast of extraction and training: ``auto`` (bf16 on CUDA, off on the CPU), none, bf16, fp16.
Amp = Literal["auto", "none", "bf16", "fp16"]
#: Storage precision of descriptors.
StorageDtype = Literal["float32", "float16"]
#: The longer side of a model input in pixels (16: one token).
ImageSize = Annotated[int, AtLeast(16)]
#: Largest longer side of a model input (image size × scale): refused before any work, not attempted
#: (an image size of 100000 grew until the process was killed). The loader has the same bound
#: (``dtop.data.images.MAX_SIDE``; this module stays light, without torch).
MAX_INPUT_SIDE = 16384
#: Ranges of the runtime options of an extraction (a batch of 4096 images at 1024 px already needs ~40 GB).
RUNTIME_RANGES: dict[str, tuple[int, int]] = {"batch_size": (1, 4096), "num_workers": (0, 256),
                                              "shard_size": (1, 10**7)}


def check_runtime(values: dict[str, int | None], names: dict[str, str] | None = None) -> None:
    """Refuse a runtime option (``batch_size``, ``num_workers``, ``shard_size``) out of :data:`RUNTIME_RANGES`.

    ``names`` maps a key to the name the user gave it (``{"num_workers": "--workers"}``); None values
    are not checked.
    """
    for key, value in values.items():
        low, high = RUNTIME_RANGES[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
            name = (names or {}).get(key, key)
            raise ConfigError(f"{name} must be an integer from {low} to {high}, got {value!r}")
#: How the descriptors of the scales are combined: ``mean`` (their mean), ``power`` (cirtorch's
#: power mean with the model's GeM exponent p, ``(Σ_s v_s^p / n)^(1/p)``: GeM models without a
#: projection only), ``auto`` (power for such a model, as cirtorch does; mean for every other).
ScalePool = Literal["auto", "mean", "power"]

DEFAULT_SCALES: tuple[float, ...] = (1 / math.sqrt(2), 1.0, math.sqrt(2))


@dataclass
class ExtractSettings:
    """Everything that changes descriptor values (stored in the store's manifest)."""

    #: Longer side of the image at scale 1.
    image_size: ImageSize = 1024
    #: Scales; the descriptor is the L2-normalised mean (or power mean, ``scale_pool``) over them.
    scales: list[PositiveFloat] = field(default_factory=lambda: list(DEFAULT_SCALES))
    #: Storage precision of the descriptors: float32 | float16.
    dtype: StorageDtype = "float32"
    #: Apply EXIF orientation (off for the benchmarks, whose bbx refer to the stored layout).
    exif_transpose: bool = False
    #: How the scales are combined: auto | mean | power (GeM models without a projection).
    scale_pool: ScalePool = "auto"

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.scales:
            raise ConfigError("scales must list at least one positive number (e.g. [1.0]), got []")
        if self.image_size * max(self.scales) > MAX_INPUT_SIDE:
            raise ConfigError(
                f"image_size {self.image_size} at scale {max(self.scales):.3g} makes model inputs of "
                f"{self.image_size * max(self.scales):.0f} pixels; the largest is {MAX_INPUT_SIDE}: use a smaller "
                "image size or scale"
            )


def load_extract_settings(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> ExtractSettings:
    """Extraction settings from a YAML file (``_base_`` composes) and ``key=value`` overrides.

    Without ``path`` the overrides apply to the defaults. Keys are the fields of
    :class:`ExtractSettings` (``image_size: 512``, ``scales: [1.0]``).
    """
    data = load_config(Path(path), overrides) if path is not None else apply_overrides({}, overrides)
    return from_dict(ExtractSettings, data)
