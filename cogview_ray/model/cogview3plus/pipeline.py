"""CogView3-Plus text-to-image pipeline: load, compile, warm up, generate (a `Pipeline` family).

The sampling math lives in `sampling.py` as plain functions; this class owns the loaded
models, the compiled callables, the attention backend and the size and token limits.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .. import loading
from ..attention import resolve_attention
from ..compiled import CompiledModule, compile_module
from ..family import GenerateResult
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CogView3PlusPipeline:
    class_name = "CogView3PlusPipeline"  # model_index.json `_class_name`
    components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")

    def __init__(self, transformer: CogView3PlusTransformer, vae: VAEDecoder, text_encoder: TextEncoder,
                 scheduler_config: SchedulerConfig, device: torch.device, dtype: torch.dtype,
                 path: str = "", compile: str = "none", attention: str = "auto",
                 compiler: Optional[Callable] = None):
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.scheduler_config = scheduler_config
        self.device, self.dtype = device, dtype
        cfg = transformer.config
        # timed ("auto" on CUDA) at the native size: 4096 image tokens at 1024 px, plus the text
        native_tokens = (cfg.sample_size // cfg.patch_size) ** 2
        attention = resolve_attention(attention, device, dtype, cfg.num_attention_heads, cfg.attention_head_dim,
                                      native_tokens + self.max_sequence_length)
        transformer.set_attention(attention)
        # `compiler(module, mode)` stands in for torch.compile (a test fakes CUDA-graph buffers)
        self._denoise = compile_module(transformer, compile, compiler)
        self._decode = compile_module(vae, compile, compiler)
        # everything here changes output bytes: the worker reports it as the run's runtime identity
        self.identity = {"family": self.class_name, "path": str(path),
                         "config_hash": loading.config_hash(path) if path else "", "compile": compile,
                         "attention": attention, "dtype": str(dtype).removeprefix("torch."), "kernels": KERNELS}

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
        if dtype == torch.float32:
            # channels-last convolutions: 1.3-2x faster on CPU; within 1e-5 of the reference in
            # float32, but in bfloat16 the reordered sums drift up to 8/255 from it, so not there
            vae.use_channels_last()
            transformer.use_onednn()  # float32 on CPU: oneDNN GEMMs, about 1.2x MKL's here
        text_encoder = TextEncoder.from_folders(root / "text_encoder", root / "tokenizer", device, dtype)
        s_cfg = SchedulerConfig.from_dict(loading.load_component_config(root / "scheduler"))
        if text_encoder.hidden_size != t_cfg.text_embed_dim:
            raise loading.CheckpointError(
                f"text_encoder width {text_encoder.hidden_size} does not match transformer text_embed_dim "
                f"{t_cfg.text_embed_dim} in {root}")
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

    def validate_size(self, height: int, width: int) -> None:
        m, top = self.size_multiple, self.max_size_px
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or v <= 0 or v % m or v > top:
                raise ValueError(f"{name} {v} must be a positive multiple of {m} and at most {top} px")

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae.downscale_factor
        return (self.transformer.config.in_channels, height // f, width // f)

    # -- generation --------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], height: int, width: int,
                 num_inference_steps: int = 50, guidance_scale: float = 5.0, negative_prompt=None,
                 max_sequence_length: Optional[int] = None) -> GenerateResult:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        self.validate_size(height, width)
        max_len = self.max_sequence_length if max_sequence_length is None else max_sequence_length
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
        _sync(dev)
        timings["text_encoding"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        latents = get_noise(seeds, self.latent_shape(height, width), self.dtype, dev)
        latents = denoise(self._denoise, latents, texts, self.scheduler_config, num_inference_steps,
                          guidance_scale, height, width)
        _sync(dev)
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

    def seal_compiled(self) -> None:
        """After the warm-ups: shapes not compiled by now run eagerly instead of compiling mid-shard,
        so which rows run compiled depends on the warmed-up sizes only."""
        for fn in (self._denoise, self._decode):
            if isinstance(fn, CompiledModule):
                fn.seal()
