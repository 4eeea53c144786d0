"""CogView3-Plus text-to-image pipeline: load, compile, warm up, generate.

Numerically the reference (diffusers' CogView3PlusPipeline): zero negative embedding by
default, CFG in fp32, DDIM with float64 coefficients, noise from a CPU generator per item.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from . import loading
from .scheduler import SchedulerConfig, ddim_step, step_coefficients
from .text_encoder import TextEncoder
from .transformer import CogView3PlusTransformer, TransformerConfig
from .vae import VAEConfig, VAEDecoder

COMPILE_MODES = ("none", "default", "max-autotune")


@dataclass
class GenerateResult:
    images: torch.Tensor  # [N, 3, H, W] float32, CPU, in [0, 1]
    timings_s: dict = field(default_factory=dict)  # text_encoding, denoising, decoding
    truncated: list = field(default_factory=list)  # prompt longer than max_sequence_length
    finite: list = field(default_factory=list)  # False where latents or decoded pixels held NaN/Inf


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] float in [0, 1] -> [N, H, W, 3] uint8, rounded as the reference's PIL output."""
    arr = images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return (arr * 255).round().astype(np.uint8)


def resolve_device(device: Optional[Union[str, torch.device]]) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available on this machine")
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def config_hash(path: Union[str, Path]) -> str:
    """sha256 over the checkpoint's model_index.json and component configs: its architecture identity."""
    root = Path(path)
    h = hashlib.sha256()
    names = ["model_index.json", "transformer/config.json", "vae/config.json",
             "text_encoder/config.json", "scheduler/scheduler_config.json"]
    for name in names:
        f = root / name
        if f.exists():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


class CogView3PlusPipeline:
    def __init__(self, transformer: CogView3PlusTransformer, vae: VAEDecoder, text_encoder: TextEncoder,
                 scheduler_config: SchedulerConfig, device: torch.device, dtype: torch.dtype,
                 path: str = "", compile: str = "none"):
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.scheduler_config = scheduler_config
        self.device, self.dtype = device, dtype
        self.identity = {"path": str(path), "config_hash": config_hash(path) if path else ""}
        self.compile_s = 0.0
        self._denoise = transformer
        self._decode = vae
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        if compile != "none":
            mode = None if compile == "default" else compile
            # one graph per (height, width, text length): datasets with per-row sizes need more
            # than dynamo's default of 8 before it would fall back to eager
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            # static shapes: every forward is one item, so no batch size ever recompiles
            self._denoise = torch.compile(transformer, fullgraph=True, dynamic=False, mode=mode)
            self._decode = torch.compile(vae, fullgraph=True, dynamic=False, mode=mode)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], device=None, dtype=None, compile: str = "none"):
        root = Path(path)
        device = resolve_device(device)
        dtype = loading.resolve_dtype(dtype or "auto", device)
        loading.read_model_index(root)  # checks that every component folder is present
        t_cfg = TransformerConfig.from_dict(loading.load_component_config(root / "transformer"))
        transformer = loading.build_and_load(
            lambda: CogView3PlusTransformer(t_cfg), loading.load_safetensors_state(root / "transformer"),
            device, dtype, "transformer")
        v_cfg = VAEConfig.from_dict(loading.load_component_config(root / "vae"))
        vae = loading.build_and_load(
            lambda: VAEDecoder(v_cfg),
            loading.load_safetensors_state(root / "vae", drop_prefixes=VAEDecoder.unused_prefixes),
            device, dtype, "vae")
        text_encoder = TextEncoder.from_folders(root / "text_encoder", root / "tokenizer", device, dtype)
        s_cfg = SchedulerConfig.from_dict(loading.load_component_config(root / "scheduler"))
        if text_encoder.hidden_size != t_cfg.text_embed_dim:
            raise loading.CheckpointError(
                f"text_encoder width {text_encoder.hidden_size} does not match transformer text_embed_dim "
                f"{t_cfg.text_embed_dim} in {root}")
        return cls(transformer.eval(), vae.eval(), text_encoder, s_cfg, device, dtype, str(path), compile)

    # -- sizes -------------------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        return self.transformer.config.patch_size * self.vae.downscale_factor

    @property
    def max_size_px(self) -> int:
        return self.transformer.config.pos_embed_max_size * self.size_multiple

    def validate_size(self, height: int, width: int) -> None:
        m, top = self.size_multiple, self.max_size_px
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or v <= 0 or v % m or v > top:
                raise ValueError(f"{name} {v} must be a positive multiple of {m} and at most {top} px")

    # -- generation --------------------------------------------------------------------------

    def _noise(self, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
        f = self.vae.downscale_factor
        shape = (self.transformer.config.in_channels, height // f, width // f)
        draws = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)), dtype=self.dtype)
                 for s in seeds]
        return torch.stack(draws).to(self.device)

    def _encode(self, prompts: list[str], max_len: int) -> tuple[torch.Tensor, list[int]]:
        """Encode each distinct prompt once; return [N, L, D] in row order and token counts.

        Each prompt is encoded on its own: matmul kernels pick different blockings for
        different batch shapes, and an embedding must not depend on its batch-mates.
        """
        unique = list(dict.fromkeys(prompts))
        encoded = [self.text_encoder.encode([p], max_sequence_length=max_len) for p in unique]
        pos = {p: i for i, p in enumerate(unique)}
        embeds = torch.cat([encoded[pos[p]][0] for p in prompts])
        return embeds, [encoded[pos[p]][1][0] for p in prompts]

    def _negative(self, negative_prompt, prompt_embeds: torch.Tensor, n: int, max_len: int) -> torch.Tensor:
        if negative_prompt is None:
            return torch.zeros_like(prompt_embeds)
        negs = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negs) != n:
            raise ValueError(f"negative_prompt has {len(negs)} entries for {n} prompts")
        out = torch.zeros_like(prompt_embeds)
        idx = [i for i, s in enumerate(negs) if s is not None]
        if idx:
            enc, _ = self._encode([negs[i] for i in idx], max_len)
            out[idx] = enc
        return out

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], height: int, width: int,
                 num_inference_steps: int = 50, guidance_scale: float = 5.0, negative_prompt=None,
                 max_sequence_length: int = 224) -> GenerateResult:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        self.validate_size(height, width)
        n, dev = len(prompts), self.device
        timings = {}

        t0 = time.perf_counter()
        cond, counts = self._encode(prompts, max_sequence_length)
        use_cfg = guidance_scale > 1.0
        text = torch.cat([self._negative(negative_prompt, cond, n, max_sequence_length), cond]) if use_cfg else cond
        _sync(dev)
        timings["text_encoding"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        latents = self._noise(seeds, height, width)
        # One item per forward: [uncond, cond] with CFG, else [cond]. Kernels choose blockings
        # by shape, so a fixed per-item shape makes an image independent of its batch-mates
        # (the same bytes alone, in any batch size, on any worker) and gives compiled graphs
        # one static shape for every batch size.
        texts = [torch.stack([text[i], text[n + i]]) if use_cfg else text[i:i + 1] for i in range(n)]
        rows = 2 if use_cfg else 1
        size = torch.tensor([[height, width]], dtype=text.dtype, device=dev).repeat(rows, 1)
        crop = torch.tensor([[0, 0]], dtype=text.dtype, device=dev).repeat(rows, 1)
        coeffs = step_coefficients(self.scheduler_config, num_inference_steps)
        # all timestep tensors are made up front: no host work depends on device values in the loop
        steps = [torch.full((rows,), c.timestep, dtype=torch.int64, device=dev) for c in coeffs]
        for c, t in zip(coeffs, steps):
            vs = []
            for i in range(n):
                x_i = latents[i:i + 1]
                v = self._denoise(x_i.repeat(rows, 1, 1, 1), texts[i], t, size, size, crop).float()
                if use_cfg:
                    v = v[:1] + guidance_scale * (v[1:] - v[:1])
                vs.append(v)
            latents = ddim_step(self.scheduler_config, torch.cat(vs), latents, c).to(self.dtype)
        _sync(dev)
        timings["denoising"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        decoded = torch.cat([self._decode(latents[i:i + 1]) for i in range(n)])
        finite = (torch.isfinite(latents).flatten(1).all(1) & torch.isfinite(decoded).flatten(1).all(1)).cpu()
        images = (decoded * 0.5 + 0.5).clamp(0, 1).float().cpu()
        timings["decoding"] = time.perf_counter() - t0
        return GenerateResult(images, timings, [c > max_sequence_length for c in counts], finite.tolist())

    def warmup(self, height: int, width: int, batch_size: int = 1, num_inference_steps: int = 2,
               guidance_scale: float = 5.0, max_sequence_length: int = 224) -> float:
        """Run one small generation (compiles when compiling); returns seconds spent."""
        t0 = time.perf_counter()
        self.generate(["warm-up"] * batch_size, list(range(batch_size)), height, width,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      max_sequence_length=max_sequence_length)
        self.compile_s = time.perf_counter() - t0
        return self.compile_s

