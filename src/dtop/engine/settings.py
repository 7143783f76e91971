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


def load_extract_settings(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> ExtractSettings:
    """Extraction settings from a YAML file (``_base_`` composes) and ``key=value`` overrides.

    Without ``path`` the overrides apply to the defaults. Keys are the fields of
    :class:`ExtractSettings` (``image_size: 512``, ``scales: [1.0]``).
    """
    data = load_config(Path(path), overrides) if path is not None else apply_overrides({}, overrides)
    return from_dict(ExtractSettings, data)
