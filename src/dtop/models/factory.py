"""The model factory: ``build_model(config)`` from a config file, a registered name or a mapping.

Registered names are the YAML files shipped in ``dtop/configs/models/`` (the repository's
``configs/models/``), e.g. ``dtop_hybrid`` or ``dtop_tiny``; :func:`register_model_config` adds
more at run time.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from dtop.config import apply_overrides, from_dict, load_config
from dtop.errors import ConfigError
from dtop.models.base import RetrievalModel
from dtop.models.baselines import ClsBaseline, GemCnnBaseline, GemTokensBaseline
from dtop.models.config import ModelConfig
from dtop.models.dtop import DToP

#: arch name → model class (timm-style registry).
ARCH_REGISTRY: dict[str, Callable[[ModelConfig], RetrievalModel]] = {
    "dtop": DToP,
    "cls": ClsBaseline,
    "gem-tokens": GemTokensBaseline,
    "gem-cnn": GemCnnBaseline,
}

_EXTRA_CONFIGS: dict[str, dict[str, Any]] = {}


def builtin_config_dir() -> Path:
    """The folder of the model configs that ship with dtop."""
    return Path(str(resources.files("dtop") / "configs" / "models"))


def list_models() -> list[str]:
    """Names of the registered model configs."""
    names = {p.stem for p in builtin_config_dir().glob("*.yaml")} | set(_EXTRA_CONFIGS)
    return sorted(names)


def register_model_config(name: str, config: Mapping[str, Any]) -> None:
    """Register a model config mapping (the ``model`` section) under ``name``."""
    _EXTRA_CONFIGS[name] = dict(config)


def resolve_model_config(
    config: str | os.PathLike | Mapping[str, Any] | ModelConfig, overrides: Sequence[str] = ()
) -> ModelConfig:
    """Turn a config file path, a registered name, a mapping or a ModelConfig into a ModelConfig.

    ``overrides`` are ``key=value`` strings relative to the model section (``dim=256``).
    """
    if isinstance(config, ModelConfig):
        if not overrides:
            return config
        from dtop.config import to_dict

        config = to_dict(config)
    if isinstance(config, Mapping):
        data = dict(config.get("model", config)) if "model" in config and isinstance(config["model"], Mapping) \
            else dict(config)
    else:
        text = str(config)
        path = Path(text)
        if text in _EXTRA_CONFIGS:
            data = dict(_EXTRA_CONFIGS[text])
        elif path.suffix in (".yaml", ".yml") or path.is_file():
            data = load_config(path)
            data = data["model"] if isinstance(data.get("model"), Mapping) else data
        elif (builtin_config_dir() / f"{text}.yaml").is_file():
            data = load_config(builtin_config_dir() / f"{text}.yaml")["model"]
        else:
            raise ConfigError(
                f"{text!r} is neither a config file nor a registered model; registered: {', '.join(list_models())}"
            )
    data = apply_overrides(data, overrides)
    return from_dict(ModelConfig, data, where="model")


def build_model(
    config: str | os.PathLike | Mapping[str, Any] | ModelConfig, overrides: Sequence[str] = ()
) -> RetrievalModel:
    """Build a model (in eval mode) from a config file, a registered name, a mapping or a ModelConfig.

    >>> model = build_model("dtop_tiny")            # doctest: +SKIP
    >>> model(torch.randn(2, 3, 128, 96)).shape      # doctest: +SKIP
    torch.Size([2, 64])
    """
    cfg = resolve_model_config(config, overrides)
    # Seeded in a forked RNG: reproducible initialisation without touching the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        model = ARCH_REGISTRY[cfg.arch](cfg)
    return model.eval()


def create_model(
    spec: str | os.PathLike | Mapping[str, Any] | ModelConfig, overrides: Sequence[str] = (), *, pretrained: bool = True
) -> RetrievalModel:
    """The one entry for "a model from a checkpoint, a config file or a registered name".

    A ``.safetensors`` file is loaded as a dtop checkpoint (no overrides apply); anything else is
    resolved as a config and built. With ``pretrained=False`` no backbone weights are fetched.
    """
    if isinstance(spec, str | os.PathLike):
        path = Path(spec)
        if path.suffix == ".safetensors" and path.is_file():
            if overrides:
                raise ConfigError("key=value overrides do not apply to a checkpoint")
            from dtop.models.checkpoint import load_model

            return load_model(path)
    config = resolve_model_config(spec, overrides)
    if not pretrained:
        config = dataclasses.replace(config, pretrained=None)
    return build_model(config)
