"""What every family's pipeline shares: size checks against its limits, the latent shape, the
argument checks of `generate`, the identity that names what changes bytes, and sealing compiled
calls after the warm-ups. A family adds loading, its limits, text encoding and sampling."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import loading
from .attention import resolve_attention
from .compiled import CompiledModule, compile_module


def sync(device: torch.device) -> None:
    """Wait for the device, so a phase's time is its own (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_text_width(text_encoder, text_embed_dim: int, root: Path) -> None:
    if text_encoder.hidden_size != text_embed_dim:
        raise loading.CheckpointError(
            f"text_encoder width {text_encoder.hidden_size} does not match transformer text_embed_dim "
            f"{text_embed_dim} in {root}")


def use_float32_cpu_kernels(transformer, vae, dtype: torch.dtype) -> None:
    """In float32: channels-last VAE convolutions (1.3-2x faster on CPU; within 1e-5 of the
    reference, but in bfloat16 the reordered sums drift up to 8/255, so not there) and oneDNN
    transformer GEMMs on CPU (about 1.2x MKL's here). Both change output bits: RENDER_SCHEME 2."""
    if dtype == torch.float32:
        vae.use_channels_last()
        transformer.use_onednn()


class PipelineBase:
    """Mixin for a family pipeline with `transformer`, `vae`, `device`, `dtype`, `_denoise`,
    `_decode`, and the `size_multiple` / `max_size_px` / `max_sequence_length` limits."""

    def _prepare(self, transformer, vae, text_encoder, scheduler_config, device: torch.device, dtype: torch.dtype,
                 path: str, compile: str, attention: str, compiler, text_tokens: int, compile_denoiser) -> None:
        """Hold the models; pin the attention backend ("auto" on CUDA is timed at the native image
        size plus `text_tokens`); compile the denoiser with `compile_denoiser(module, mode,
        compiler)` and the VAE decoder (`compiler(module, mode)` stands in for torch.compile in
        tests); set the identity."""
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.scheduler_config = scheduler_config
        self.device, self.dtype = device, dtype
        cfg = transformer.config
        native_tokens = (cfg.sample_size // cfg.patch_size) ** 2
        attention = resolve_attention(attention, device, dtype, cfg.num_attention_heads, cfg.attention_head_dim,
                                      native_tokens + text_tokens)
        transformer.set_attention(attention)
        self._denoise = compile_denoiser(transformer, compile, compiler)
        self._decode = compile_module(vae, compile, compiler)
        self.identity = self._identity(path, compile, attention)

    def validate_size(self, height: int, width: int) -> None:
        m, top = self.size_multiple, self.max_size_px
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or v <= 0 or v % m or v > top:
                raise ValueError(f"{name} {v} must be a positive multiple of {m} and at most {top} px")

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae.downscale_factor
        return (self.transformer.config.in_channels, height // f, width // f)

    def _arguments(self, prompts, seeds: Sequence[int], height: int, width: int,
                   max_sequence_length) -> tuple[list[str], int]:
        """`generate`'s checks: the prompts as a list, and the token limit in force."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        self.validate_size(height, width)
        return prompts, self.max_sequence_length if max_sequence_length is None else max_sequence_length

    def _identity(self, path: str, compile: str, attention: str) -> dict:
        """Everything here changes output bytes: the worker reports it as the run's runtime identity."""
        return {"family": self.class_name, "path": str(path),
                "config_hash": loading.config_hash(path) if path else "", "compile": compile,
                "attention": attention, "dtype": str(self.dtype).removeprefix("torch.")}

    def seal_compiled(self) -> None:
        """After the warm-ups: shapes not compiled by now run eagerly instead of compiling mid-shard,
        so which rows run compiled depends on the warmed-up sizes only."""
        for fn in (self._denoise, self._decode):
            if isinstance(fn, CompiledModule):
                fn.seal()
