"""Exceptions that dtop raises for bad input.

Every error a user can cause (a wrong path, a corrupt file, a bad config, a checkpoint of another
model) is a :class:`DtopError` whose message says what is wrong and how to fix it. The CLI prints
these messages without a traceback and exits with status 2.
"""


class DtopError(Exception):
    """Base class of all user-facing dtop errors."""


class ConfigError(DtopError, ValueError):
    """A configuration file, key or value is invalid."""


class CheckpointError(DtopError):
    """A checkpoint or weights file cannot be read or does not fit the model."""


class PretrainedWeightsUnavailable(DtopError):
    """Pretrained weights were requested but cannot be obtained (e.g. no network)."""


class DataError(DtopError):
    """A dataset, ground-truth file or image is missing or unreadable."""


class TrainingError(DtopError):
    """Training cannot go on: the loss or the weights are not finite, or no step could be made."""
