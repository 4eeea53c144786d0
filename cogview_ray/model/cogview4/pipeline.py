"""CogView4 text-to-image pipeline: load, compile, warm up, generate (a `Pipeline` family).

The sampling math lives in `sampling.py` as plain functions; this class owns the loaded
models, the compiled callables, the attention backend and the size and token limits.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from .. import loading
from ..compiled import CompiledModule
from ..family import GenerateResult
from ..pipeline_base import PipelineBase, check_text_width, sync, use_float32_cpu_kernels
from ..vae import VAEConfig, VAEDecoder
from .dynamic_text import compile_transformer
from .sampling import decode, denoise, encode_prompts, get_noise, negative_prompts
from .scheduler import SchedulerConfig
from .text_encoder import PAD_MULTIPLE, GlmTextEncoder
from .transformer import CogView4Transformer, TransformerConfig

# the reference pipeline's default token limit (GLM's tokenizer itself declares 128k)
DEFAULT_MAX_SEQUENCE_LENGTH = 1024
# CogView4 was trained at sides that are multiples of 32 px (two latent patches); the
# reference only checks 16, but other sides are outside what the model card supports
PATCHES_PER_SIZE_STEP = 2
# the compiled kernels' generation (runtime identity; eager rendering has none): 2, the dynamic
# text length (dynamic_text.py)
COMPILED_KERNELS = 2


class CogView4Pipeline(PipelineBase):
    class_name = "CogView4Pipeline"  # model_index.json `_class_name`
    components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")

    def __init__(self, transformer: CogView4Transformer, vae: VAEDecoder, text_encoder: GlmTextEncoder,
                 scheduler_config: SchedulerConfig, device: torch.device, dtype: torch.dtype,
                 path: str = "", compile: str = "none", attention: str = "auto",
                 compiler: Optional[Callable] = None):
        # attention timed at the native size plus a typical prompt; the transformer compiles with a
        # dynamic text length
        self._prepare(transformer, vae, text_encoder, scheduler_config, device, dtype, path, compile, attention,
                      compiler, 128, compile_transformer)
        if compile != "none":
            # compiled bytes changed when the text length became dynamic (one graph for every
            # length, where unwarmed lengths used to run eagerly): a resume never mixes the two
            self.identity["kernels"] = COMPILED_KERNELS

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], device=None, dtype=None, compile: str = "none",
                        attention: str = "auto"):
        root = Path(path)
        device = loading.resolve_device(device)
        dtype = loading.resolve_dtype(dtype or "auto", device)
        loading.read_model_index(root, cls.class_name, cls.components)  # every component folder is present
        t_cfg = TransformerConfig.from_dict(loading.load_component_config(root / "transformer"))
        v_cfg = VAEConfig.from_dict(loading.load_component_config(root / "vae"))
        if v_cfg.shift_factor:
            # the reference decodes latents / scaling_factor and ignores shift_factor
            raise loading.CheckpointError(f"{root / 'vae' / 'config.json'} has shift_factor {v_cfg.shift_factor}; "
                                          "CogView4 decodes without a shift, so only 0 or null is supported.")
        s_cfg = SchedulerConfig.from_dict(loading.load_component_config(root / "scheduler"))
        transformer = loading.build_and_load(
            lambda: CogView4Transformer(t_cfg), loading.open_safetensors_state(root / "transformer"),
            device, dtype, "transformer")
        vae = loading.build_and_load(
            lambda: VAEDecoder(v_cfg),
            loading.open_safetensors_state(root / "vae", drop_prefixes=VAEDecoder.unused_prefixes),
            device, dtype, "vae")
        use_float32_cpu_kernels(transformer, vae, dtype)
        text_encoder = GlmTextEncoder.from_folders(root / "text_encoder", root / "tokenizer", device, dtype)
        check_text_width(text_encoder, t_cfg.text_embed_dim, root)
        return cls(transformer, vae, text_encoder, s_cfg, device, dtype, str(path), compile, attention)

    # -- limits ------------------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        return PATCHES_PER_SIZE_STEP * self.transformer.config.patch_size * self.vae.downscale_factor

    @property
    def max_size_px(self) -> int:
        # pos_embed_max_size latent patches per side (128 -> 2048 px); RoPE itself has no limit
        cfg = self.transformer.config
        return cfg.pos_embed_max_size * cfg.patch_size * self.vae.downscale_factor

    @property
    def max_sequence_length(self) -> int:
        declared = self.text_encoder.model_max_length
        return min(declared, DEFAULT_MAX_SEQUENCE_LENGTH) if declared else DEFAULT_MAX_SEQUENCE_LENGTH

    # -- generation --------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], height: int, width: int,
                 num_inference_steps: int = 50, guidance_scale: float = 5.0, negative_prompt=None,
                 max_sequence_length: Optional[int] = None) -> GenerateResult:
        prompts, max_len = self._arguments(prompts, seeds, height, width, max_sequence_length)
        n, dev = len(prompts), self.device
        timings = {}

        t0 = time.perf_counter()
        conds, counts = encode_prompts(self.text_encoder, prompts, max_len)
        unconds = None
        if guidance_scale > 1.0:
            unconds, _ = encode_prompts(self.text_encoder, negative_prompts(negative_prompt, n), max_len)
        sync(dev)
        timings["text_encoding"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        latents = get_noise(seeds, self.latent_shape(height, width), dev)
        latents = denoise(self._denoise, latents, conds, unconds, self.scheduler_config, num_inference_steps,
                          guidance_scale, height, width, self.transformer.config.patch_size, self.dtype)
        sync(dev)
        timings["denoising"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        images, finite = decode(self._decode, latents, self.dtype)
        timings["decoding"] = time.perf_counter() - t0
        return GenerateResult(images, timings, [c > max_len for c in counts], finite)

    def warmup(self, height: int, width: int, batch_size: int = 1, num_inference_steps: int = 2,
               guidance_scale: float = 5.0, max_sequence_length: Optional[int] = None) -> float:
        """Compile for one image size (when compiling); returns seconds spent.

        The transformer compiles first at the longest text length this limit allows (the size hint
        the compiler tunes its dynamic-length kernels for, the same on every worker), then a small
        generation runs a 16-token prompt through the same graph and compiles the VAE decode: a
        length that needed a recompile would do so here, never mid-shard (none does).
        """
        t0 = time.perf_counter()
        if isinstance(self._denoise, CompiledModule):
            max_len = self.max_sequence_length if max_sequence_length is None else max_sequence_length
            self._run_transformer(height, width, -(-max_len // PAD_MULTIPLE) * PAD_MULTIPLE)
        self.generate(["warm-up"] * batch_size, list(range(batch_size)), height, width,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      max_sequence_length=max_sequence_length)
        sync(self.device)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def _run_transformer(self, height: int, width: int, text_len: int) -> torch.Tensor:
        """One compiled transformer call on zeros with `text_len` text tokens, dtypes as in `denoise`."""
        cfg, dev, dt = self.transformer.config, self.device, self.dtype
        x = torch.zeros(1, *self.latent_shape(height, width), device=dev, dtype=dt)
        text = torch.zeros(1, text_len, cfg.text_embed_dim, device=dev, dtype=dt)
        sizes = torch.tensor([[height, width]], dtype=dt, device=dev)
        t = torch.full((1,), float(self.scheduler_config.num_train_timesteps), device=dev)
        return self._denoise(x, text, t, sizes, sizes, torch.zeros_like(sizes))
