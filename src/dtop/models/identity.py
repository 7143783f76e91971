"""What makes two models the same model: their architecture and their weights."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from dtop.config import to_dict
from dtop.models.base import RetrievalModel
from dtop.models.config import ModelConfig

#: Config fields that do not change the shapes or meaning of a model's weights (ignored when loading
#: weights into a model): where the initial weights came from and the initial GeM exponent.
NON_ARCHITECTURAL: tuple[str, ...] = ("pretrained", "gem_p", "init_seed")
#: Config fields a model resolves when it is built (the backbone's statistics when left unset).
RESOLVED_AT_BUILD: tuple[str, ...] = ("mean", "std")


def config_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """Architectural fields on which two configs differ, as ``field: a vs b`` strings.

    ``mean``/``std`` are left out: a config may leave them unset and the model resolves them.
    """
    da, db = to_dict(a), to_dict(b)
    skip = (*NON_ARCHITECTURAL, *RESOLVED_AT_BUILD)
    return [f"{k}: {da[k]!r} vs {db[k]!r}" for k in da if k not in skip and da[k] != db[k]]


def identity_config(config: ModelConfig) -> dict[str, Any]:
    """The config as the fingerprint hashes it: ``pretrained`` cleared, as :func:`load_model` clears it."""
    return {**to_dict(config), "pretrained": None}


def model_fingerprint(model: RetrievalModel) -> str:
    """sha256 (16 hex digits) of the model's config (``pretrained`` cleared) and weights.

    It is what a descriptor store or an image index is tied to: equal for a model and the same
    model saved and loaded again, different when a weight or a config field changes. Checkpoint
    extras (a whitening) are not part of it: they do not change the descriptors. Why
    ``init_seed`` and ``gem_p`` stay in: docs/models.md.
    """
    digest = hashlib.sha256(json.dumps(identity_config(model.config), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
