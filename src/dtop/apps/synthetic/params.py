"""Parameters and constants of the built-in benchmark generator."""

from __future__ import annotations

import re
from dataclasses import dataclass

from dtop.errors import DataError

GENERATOR_VERSION = 1
"""Bumped whenever the generated pixels or layout change (part of the idempotence marker)."""

GENERATOR_ID = "dtop.data.synthetic"
"""The generator's name in the marker file: an on-disk identifier, kept as earlier versions wrote it."""

MARKER = "synthetic.json"
"""File in the benchmark and training folders that records the generation parameters."""

DEFAULT_NAME = "dtop-mini"

# One shared palette for objects, clutter and backgrounds, so that colour alone does not identify
# an instance: instances differ in the arrangement of colours, shapes, patterns and glyphs.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (200, 40, 40), (230, 120, 30), (235, 200, 50), (60, 150, 60), (30, 110, 170), (80, 60, 160),
    (170, 60, 140), (240, 240, 230), (30, 30, 35), (120, 120, 125), (150, 100, 60), (200, 170, 130),
    (90, 170, 190), (170, 200, 90), (120, 30, 40), (40, 70, 60),
)
_WALLS = (7, 9, 10, 11, 14, 15, 0, 4, 2)
_ASPECTS = ((4, 3), (3, 4), (1, 1), (3, 2), (2, 3))
_KINDS = ("facade", "emblem", "panel")

# Seed-stream tags: every image / object has its own stream [seed, tag, index, ...].
_T_OBJECT, _T_TRAIN, _T_QUERY, _T_DB, _T_DISTRACTOR, _T_ORDER = 1, 2, 3, 4, 5, 6
# Object index spaces: training instances 0.., test instances from _TEST_BASE, distractor objects from
# _DISTRACTOR_OBJECT_BASE, so the test split does not change with the size of the training split.
_TEST_BASE = 500_000
_DISTRACTOR_OBJECT_BASE = 1_000_000


@dataclass(frozen=True)
class SyntheticParams:
    """Everything that determines a generated benchmark (recorded in the marker file)."""

    name: str = DEFAULT_NAME
    seed: int = 0
    n_train_instances: int = 150
    n_test_instances: int = 35
    train_views: int = 6
    queries_per_instance: int = 2
    n_easy: int = 3
    n_hard: int = 2
    n_junk: int = 1
    n_distractors: int = 150
    image_size: int = 192
    jpeg_quality: int = 90

    def validate(self) -> None:
        """Raise :class:`~dtop.errors.DataError` for values that cannot make a benchmark."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise DataError(f"benchmark name {self.name!r} must be a plain folder name (letters, digits, _ . -)")
        if self.name.lower() in ("roxford5k", "rparis6k", "revisitop1m"):
            raise DataError(f"benchmark name {self.name!r} is an official dataset's name; choose another")
        positive = {
            "n_train_instances": self.n_train_instances, "n_test_instances": self.n_test_instances,
            "train_views": self.train_views, "queries_per_instance": self.queries_per_instance,
        }
        for key, value in positive.items():
            if int(value) < 1:
                raise DataError(f"{key} must be at least 1, got {value}")
        for key in ("n_easy", "n_hard", "n_junk", "n_distractors"):
            if int(getattr(self, key)) < 0:
                raise DataError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.n_easy + self.n_hard < 1:
            raise DataError("each query needs a positive: n_easy + n_hard must be at least 1")
        if self.n_train_instances > _TEST_BASE or self.n_test_instances > _DISTRACTOR_OBJECT_BASE - _TEST_BASE:
            raise DataError(f"at most {_TEST_BASE} training and test instances each")
        if not 64 <= self.image_size <= 1024:
            raise DataError(f"image_size (longer side in pixels) must be in 64..1024, got {self.image_size}")
        if not 50 <= self.jpeg_quality <= 100:
            raise DataError(f"jpeg_quality must be in 50..100, got {self.jpeg_quality}")

