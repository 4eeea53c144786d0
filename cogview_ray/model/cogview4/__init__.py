"""CogView4 (diffusers `CogView4Pipeline`): MMDiT with 2-D RoPE, flow matching, GLM text."""
from .pipeline import CogView4Pipeline

__all__ = ["CogView4Pipeline"]
