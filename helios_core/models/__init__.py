"""Decoder models over Hugging Face checkpoints: config, our transformer, safetensors loading."""

from .checkpoint import Checkpoint, CheckpointError
from .config import SUPPORTED_MODEL_TYPES, ModelConfig, UnsupportedModelError
from .loader import load_layers, load_model, pack_weights, resolve_dtype, unload_layers
from .transformer import Transformer

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ModelConfig",
    "SUPPORTED_MODEL_TYPES",
    "Transformer",
    "UnsupportedModelError",
    "load_layers",
    "load_model",
    "pack_weights",
    "resolve_dtype",
    "unload_layers",
]
