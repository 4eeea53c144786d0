"""CogView3-Plus (diffusers `CogView3PlusPipeline`): MMDiT transformer, zero-SNR DDIM, T5 text."""
from .pipeline import CogView3PlusPipeline

__all__ = ["CogView3PlusPipeline"]
