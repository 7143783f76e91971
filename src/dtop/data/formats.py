"""Names of the training-set formats (a light module: the CLI builds its parsers without torch)."""

from __future__ import annotations

#: ``data.format`` of a training config and ``dtop data check --format``.
TRAINING_FORMATS: tuple[str, ...] = ("sfm120k", "gldv2-clean", "gldv1", "folder", "csv")
