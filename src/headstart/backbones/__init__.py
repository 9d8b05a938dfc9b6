"""Backbones: the registry of specs with their preprocessing (`registry`), weights as safetensors files
(`weights`), and the torch module whose pooled features are trained and exported (`pooled`, imports torch)."""

from headstart.backbones.registry import DEFAULT_BACKBONE, REGISTRY, BackboneSpec, available_offline, resolve
from headstart.backbones.weights import (
    create_model,
    pretrained_weights_path,
    read_state_dict,
    save_state_dict,
    weights_fingerprint,
)
from headstart.errors import WeightsError

__all__ = [
    "DEFAULT_BACKBONE", "REGISTRY", "BackboneSpec", "WeightsError", "available_offline", "create_model",
    "pretrained_weights_path", "read_state_dict", "resolve", "save_state_dict", "weights_fingerprint",
]
