"""dtop: DToP vision-transformer global descriptors for instance-level image retrieval.

The public API is re-exported here and imported lazily, so ``import dtop.retrieval.metrics``
does not pay for importing timm:

- :func:`build_model` / :func:`create_model` / :func:`load_model` / :func:`list_models`: models;
- :func:`describe`: one image's descriptor; :func:`extract`: descriptors of many images;
- :func:`evaluate`: the revisited evaluation of models on a benchmark, written to a folder.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

#: Public name → (module, attribute).
_EXPORTS: dict[str, tuple[str, str]] = {
    "build_model": ("dtop.models", "build_model"),
    "create_model": ("dtop.models", "create_model"),
    "list_models": ("dtop.models", "list_models"),
    "load_model": ("dtop.models", "load_model"),
    "describe": ("dtop.engine.extract", "describe"),
    "extract": ("dtop.engine.extract", "extract"),
    "evaluate": ("dtop.engine.evaluate", "run_evaluation"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        return getattr(import_module(module), attribute)
    raise AttributeError(f"module 'dtop' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
