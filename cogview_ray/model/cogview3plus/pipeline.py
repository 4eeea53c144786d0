"""CogView3-Plus text-to-image pipeline: load, compile, warm up, generate (a `Pipeline` family).

The sampling math lives in `sampling.py` as plain functions; this class owns the loaded
models, the compiled callables, the attention backend and the size and token limits.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from .. import loading
from ..compiled import compile_module
from ..family import GenerateResult
from ..pipeline_base import PipelineBase, check_text_width, sync, use_float32_cpu_kernels
from ..text_encoder import TextEncoder
from ..vae import VAEConfig, VAEDecoder
from .sampling import decode, denoise, encode_negative, encode_prompts, get_noise
from .scheduler import SchedulerConfig
from .transformer import CogView3PlusTransformer, TransformerConfig

# the reference pipeline's default, used where the tokenizer declares no model_max_length
DEFAULT_MAX_SEQUENCE_LENGTH = 224
# Which kernels render, where they change output bytes (the runtime identity records it, so a
# resume never mixes two): 1, until 2026-12; 2, fused q/k/v projection and, in float32, the VAE
# convolutions channels-last (upsamplers as sub-pixel convolutions) and (on CPU) the transformer's
# GEMMs on oneDNN.
KERNELS = 2


class CogView3PlusPipeline(PipelineBase):
    class_name = "CogView3PlusPipeline"  # model_index.json `_class_name`
    components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")

    def __init__(self, transformer: CogView3PlusTransformer, vae: VAEDecoder, text_encoder: TextEncoder,
                 scheduler_config: SchedulerConfig, device: torch.device, dtype: torch.dtype,
                 path: str = "", compile: str = "none", attention: str = "auto",
                 compiler: Optional[Callable] = None):
        # attention timed at 4096 image tokens (1024 px) plus the text padded to its limit
        self.text_encoder = text_encoder  # max_sequence_length reads it
        self._prepare(transformer, vae, text_encoder, scheduler_config, device, dtype, path, compile, attention,
                      compiler, self.max_sequence_length, compile_module)
        self.identity["kernels"] = KERNELS

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], device=None, dtype=None, compile: str = "none",
                        attention: str = "auto"):
        root = Path(path)
        device = loading.resolve_device(device)
        dtype = loading.resolve_dtype(dtype or "auto", device)
        loading.read_model_index(root, cls.class_name, cls.components)  # every component folder is present
        t_cfg = TransformerConfig.from_dict(loading.load_component_config(root / "transformer"))
        transformer = loading.build_and_load(
            lambda: CogView3PlusTransformer(t_cfg), loading.open_safetensors_state(root / "transformer"),
            device, dtype, "transformer")
        v_cfg = VAEConfig.from_dict(loading.load_component_config(root / "vae"))
        vae = loading.build_and_load(
            lambda: VAEDecoder(v_cfg),
            loading.open_safetensors_state(root / "vae", drop_prefixes=VAEDecoder.unused_prefixes),
            device, dtype, "vae")
        use_float32_cpu_kernels(transformer, vae, dtype)
        text_encoder = TextEncoder.from_folders(root / "text_encoder", root / "tokenizer", device, dtype)
        s_cfg = SchedulerConfig.from_dict(loading.load_component_config(root / "scheduler"))
        check_text_width(text_encoder, t_cfg.text_embed_dim, root)
        return cls(transformer.eval(), vae.eval(), text_encoder, s_cfg, device, dtype, str(path), compile,
                   attention)

    # -- limits ------------------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        return self.transformer.config.patch_size * self.vae.downscale_factor

    @property
    def max_size_px(self) -> int:
        return self.transformer.config.pos_embed_max_size * self.size_multiple

    @property
    def max_sequence_length(self) -> int:
        return self.text_encoder.model_max_length or DEFAULT_MAX_SEQUENCE_LENGTH

    # -- generation --------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], height: int, width: int,
                 num_inference_steps: int = 50, guidance_scale: float = 5.0, negative_prompt=None,
                 max_sequence_length: Optional[int] = None) -> GenerateResult:
        prompts, max_len = self._arguments(prompts, seeds, height, width, max_sequence_length)
        n, dev = len(prompts), self.device
        timings = {}

        t0 = time.perf_counter()
        cond, counts = encode_prompts(self.text_encoder, prompts, max_len)
        use_cfg = guidance_scale > 1.0
        if use_cfg:
            neg = encode_negative(self.text_encoder, negative_prompt, cond, max_len)
            texts = [torch.stack([neg[i], cond[i]]) for i in range(n)]  # [2, L, D]: uncond, cond
        else:
            texts = [cond[i:i + 1] for i in range(n)]
        sync(dev)
        timings["text_encoding"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        latents = get_noise(seeds, self.latent_shape(height, width), self.dtype, dev)
        latents = denoise(self._denoise, latents, texts, self.scheduler_config, num_inference_steps,
                          guidance_scale, height, width)
        sync(dev)
        timings["denoising"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        images, finite = decode(self._decode, latents)
        timings["decoding"] = time.perf_counter() - t0
        return GenerateResult(images, timings, [c > max_len for c in counts], finite)

    def warmup(self, height: int, width: int, batch_size: int = 1, num_inference_steps: int = 2,
               guidance_scale: float = 5.0, max_sequence_length: Optional[int] = None) -> float:
        """Run one small generation (compiles when compiling); returns seconds spent."""
        t0 = time.perf_counter()
        self.generate(["warm-up"] * batch_size, list(range(batch_size)), height, width,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      max_sequence_length=max_sequence_length)
        return time.perf_counter() - t0
