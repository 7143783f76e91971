"""Models: DToP and its baselines, built by one factory, saved in one checkpoint format."""

from dtop.models.base import WHITENING_EXTRA, CheckpointExtra, RetrievalModel
from dtop.models.checkpoint import load_model, load_weights, read_checkpoint, save_checkpoint
from dtop.models.config import ModelConfig
from dtop.models.dtop import DToP
from dtop.models.factory import build_model, create_model, list_models, register_model_config, resolve_model_config
from dtop.models.identity import model_fingerprint

__all__ = [
    "WHITENING_EXTRA",
    "CheckpointExtra",
    "DToP",
    "ModelConfig",
    "RetrievalModel",
    "build_model",
    "create_model",
    "list_models",
    "load_model",
    "load_weights",
    "model_fingerprint",
    "read_checkpoint",
    "register_model_config",
    "resolve_model_config",
    "save_checkpoint",
]
