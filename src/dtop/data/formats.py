"""Names of the training-set formats (a light module: the CLI builds its parsers without torch)."""

from __future__ import annotations

from typing import Literal, get_args

#: ``data.format`` of a training config and ``dtop data check --format``.
TrainingFormat = Literal["sfm120k", "gldv2-clean", "gldv1", "folder", "csv"]
TRAINING_FORMATS: tuple[str, ...] = get_args(TrainingFormat)
