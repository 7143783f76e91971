"""The one checkpoint format of dtop: a safetensors file that describes itself (see docs/models.md)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dtop.config import from_dict, to_dict
from dtop.errors import CheckpointError, ConfigError
from dtop.models.base import CheckpointExtra, RetrievalModel
from dtop.models.config import ModelConfig
from dtop.models.identity import config_differences
from dtop.models.weights import state_dict_mismatches
from dtop.utils.io import atomic_path

FORMAT = "dtop-model"
FORMAT_VERSION = "1"
EXTRA_PREFIX = "__extra__."
HEADER_KEY = "dtop"


@dataclass
class Checkpoint:
    """The content of a dtop checkpoint file."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    extras: dict[str, CheckpointExtra] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    model: RetrievalModel,
    path: str | os.PathLike,
    extras: Mapping[str, CheckpointExtra] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (weights + full config) and its extras to ``path`` atomically.

    ``extras`` default to the model's own :attr:`~RetrievalModel.checkpoint_extras`.
    """
    from safetensors.torch import save_file

    from dtop import __version__

    path = Path(path)
    extras = model.checkpoint_extras if extras is None else extras
    # clone: safetensors refuses tensors that share storage
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    for name, extra in extras.items():
        for key, value in extra.tensors.items():
            tensors[f"{EXTRA_PREFIX}{name}.{key}"] = value.detach().cpu().contiguous().clone()
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtop_version": __version__,
        "config": to_dict(model.config),
        "extras": {name: extra.metadata for name, extra in extras.items()},
        "metadata": metadata or {},
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})
    return path


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a dtop checkpoint (config, weights, extras) with clear errors for other files.

    The header is validated before any tensor is read.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = _read_header(path, (f.metadata() or {}).get(HEADER_KEY))
            config = _header_config(path, header)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a dtop checkpoint (not a readable safetensors file: {err}). "
            "Plain timm/torch weights go into model.pretrained instead."
        ) from err
    extras_metadata = header["extras"]
    extras: dict[str, CheckpointExtra] = {}
    state = {}
    for key, value in tensors.items():
        if key.startswith(EXTRA_PREFIX):
            name, _, sub = key[len(EXTRA_PREFIX):].partition(".")
            if name not in extras:
                extras[name] = CheckpointExtra({}, dict(extras_metadata.get(name, {})))
            extras[name].tensors[sub] = value
        else:
            state[key] = value
    return Checkpoint(config=config, state_dict=state, extras=extras, metadata=header["metadata"])


def _read_header(path: Path, raw: str | None) -> dict[str, Any]:
    """The checkpoint's JSON header, checked: an object of the right format and version whose
    ``extras`` (name → object) and ``metadata`` (object) have the right types."""
    try:
        header = json.loads(raw) if raw else {}
    except (json.JSONDecodeError, RecursionError):
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else "not a JSON object"
        raise CheckpointError(
            f"{path} is a safetensors file without a dtop configuration (format={found!r}). If it holds "
            f"backbone weights, give a model config or name and the file as its weights: --model NAME "
            f"model.pretrained={path}"
        )
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {header.get('format_version')!r}; this dtop reads {FORMAT_VERSION}"
        )
    header.setdefault("extras", {})
    header.setdefault("metadata", {})
    extras = header["extras"]
    if not isinstance(extras, dict) or not all(isinstance(v, dict) for v in extras.values()):
        raise CheckpointError(f"{path}: the header's 'extras' must map names to JSON objects; the file is damaged")
    if not isinstance(header["metadata"], dict):
        raise CheckpointError(f"{path}: the header's 'metadata' must be a JSON object; the file is damaged")
    return header


def _header_config(path: Path, header: dict[str, Any]) -> ModelConfig:
    """The model configuration of a checkpoint header."""
    if not isinstance(header.get("config"), dict):
        raise CheckpointError(f"{path} holds no model configuration (the header's 'config' is "
                              f"{type(header.get('config')).__name__}, not an object); the file is damaged")
    try:
        return from_dict(ModelConfig, header["config"], where="model")
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} holds an invalid model configuration: {err}") from err


def load_weights(model: RetrievalModel, checkpoint: str | os.PathLike | Checkpoint) -> Checkpoint:
    """Load a checkpoint's weights into ``model``; fail naming the mismatch if it is another model."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    source = "the checkpoint" if isinstance(checkpoint, Checkpoint) else str(checkpoint)
    diffs = config_differences(ckpt.config, model.config)
    own = model.state_dict()
    parts = state_dict_mismatches(own, ckpt.state_dict) + dtype_mismatches(own, ckpt.state_dict)
    if diffs:
        parts.insert(0, "config differs (checkpoint vs model): " + "; ".join(diffs[:6]))
    if parts:
        raise CheckpointError(
            f"{source} was saved from a different model: " + ". ".join(parts)
            + ". Use dtop.load_model(path) to rebuild the checkpoint's own model."
        )
    model.load_state_dict(ckpt.state_dict, strict=True)
    return ckpt


def dtype_mismatches(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    """Tensors whose kind differs (integer or bool vs floating point): ``load_state_dict`` would cast them
    silently. Floating-point precisions (float16 vs float32) may differ."""
    bad = [f"{k}: file {state[k].dtype} vs model {v.dtype}" for k, v in own.items()
           if k in state and (state[k].dtype.is_floating_point != v.dtype.is_floating_point
                              or (state[k].dtype == torch.bool) != (v.dtype == torch.bool))]
    return [f"{len(bad)} tensors of another kind (e.g. {'; '.join(bad[:3])})"] if bad else []


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> RetrievalModel:
    """Rebuild a model from a dtop checkpoint file alone (in eval mode).

    The checkpoint's extras (e.g. whitening) are in ``model.checkpoint_extras``.
    """
    from dtop.models.factory import build_model

    ckpt = read_checkpoint(path)
    # The weights come from the file: never fetch the pretrained backbone again.
    config = replace(ckpt.config, pretrained=None)
    # Compare shapes on a model without storage first: a header that declares a huge model next to
    # small tensors fails here instead of allocating it. Once they match, the model is as large as the file.
    with torch.device("meta"):
        skeleton = build_model(config)
    own = skeleton.state_dict()
    parts = state_dict_mismatches(own, ckpt.state_dict) + dtype_mismatches(own, ckpt.state_dict)
    if parts:
        raise CheckpointError(f"{path} is damaged: its tensors do not fit the model its header describes: "
                              + ", ".join(parts))
    del skeleton
    model = build_model(config)
    load_weights(model, ckpt)
    model.checkpoint_extras = dict(ckpt.extras)
    return model.to(device).eval()
