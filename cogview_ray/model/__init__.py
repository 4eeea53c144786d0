"""The model layer: one folder per model family behind the `Pipeline` protocol, plus the parts
families share (VAE, text encoder, checkpoint loading, random-weight checkpoints)."""
from .family import COMPILE_MODES, FAMILIES, GenerateResult, Pipeline, family_class, load_pipeline, to_uint8_hwc
from .loading import CheckpointError, config_hash, resolve_device, resolve_dtype

__all__ = ["COMPILE_MODES", "FAMILIES", "CheckpointError", "GenerateResult", "Pipeline", "config_hash",
           "family_class", "load_pipeline", "resolve_device", "resolve_dtype", "to_uint8_hwc"]
