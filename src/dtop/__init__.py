"""dtop: DToP vision-transformer global descriptors for instance-level image retrieval.

The model API is re-exported here and imported lazily, so ``import dtop.retrieval.metrics``
does not pay for importing timm.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "build_model", "list_models", "load_model"]


def __getattr__(name: str) -> Any:
    if name in ("build_model", "list_models", "load_model"):
        from dtop import models

        return getattr(models, name)
    raise AttributeError(f"module 'dtop' has no attribute {name!r}")
