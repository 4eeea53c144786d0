"""CogView4 sampling as plain functions that take the models as arguments, so a tiny or fake
text encoder, transformer or VAE slots in.

Numerically the reference (diffusers' CogView4Pipeline) rendering one prompt at a time: noise
is float32 from a CPU generator per item, cond and uncond are two forwards (their text lengths
differ), CFG and the Euler step follow the reference's dtypes. Every model call sees one item,
so an image never depends on its batch-mates and compiled graphs see one shape per size.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from . import scheduler as sched
from .scheduler import SchedulerConfig


def get_noise(seeds: Sequence[int], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[N, *shape] float32: item i drawn on a CPU generator seeded with seeds[i], the same on any device."""
    draws = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32)
             for s in seeds]
    return torch.stack(draws).to(device)


def encode_prompts(text_encoder, prompts: Sequence[str], max_sequence_length: int) -> tuple[list[torch.Tensor], list[int]]:
    """Each distinct prompt encoded once, alone: [1, L_i, D] per row (L_i a multiple of 16) and token counts."""
    unique = {p: text_encoder.encode(p, max_sequence_length) for p in dict.fromkeys(prompts)}
    return [unique[p][0] for p in prompts], [unique[p][1] for p in prompts]


def negative_prompts(negative_prompt: Union[None, str, Sequence[Optional[str]]], n: int) -> list[str]:
    """One negative text per row; None (for all or one row) is the empty prompt, as in the reference."""
    if negative_prompt is None or isinstance(negative_prompt, str):
        return [negative_prompt or ""] * n
    negs = list(negative_prompt)
    if len(negs) != n:
        raise ValueError(f"negative_prompt has {len(negs)} entries for {n} prompts")
    return [s or "" for s in negs]


def image_seq_len(latent_hw: tuple[int, int], patch_size: int) -> int:
    return latent_hw[0] * latent_hw[1] // patch_size**2


def denoise(transformer: Callable[..., torch.Tensor], latents: torch.Tensor, conds: list[torch.Tensor],
            unconds: Optional[list[torch.Tensor]], scheduler_config: SchedulerConfig, num_inference_steps: int,
            guidance_scale: float, height: int, width: int, patch_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Euler flow matching from float32 noise `latents` [N, C, h, w] to clean latents (in `dtype`
    after the first step, as the reference's scheduler returns them).

    conds[i] / unconds[i]: [1, L, D] text embeddings; unconds is None without guidance.
    """
    n, dev = latents.shape[0], latents.device
    sizes = torch.tensor([[height, width]], dtype=dtype, device=dev)
    crop = torch.tensor([[0, 0]], dtype=dtype, device=dev)
    sigma = sched.sigmas(scheduler_config, num_inference_steps, image_seq_len(latents.shape[2:], patch_size))
    ts = sched.timesteps(scheduler_config, num_inference_steps)
    # every per-step tensor is made up front: nothing in the loop waits on device values
    steps = [(ts[i:i + 1].to(dev), (sigma[i + 1] - sigma[i]).to(dev)) for i in range(num_inference_steps)]
    for t, dt in steps:
        out = []
        for i in range(n):
            x = latents[i:i + 1]
            x_in = x.to(dtype)
            v = transformer(x_in, conds[i], t, sizes, sizes, crop)
            if unconds is not None:
                v_u = transformer(x_in, unconds[i], t, sizes, sizes, crop)
                v = v_u + guidance_scale * (v - v_u)
            out.append(sched.euler_step(v, x, dt))
        latents = torch.cat(out)
    return latents


def decode(vae: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, dtype: torch.dtype
           ) -> tuple[torch.Tensor, list[bool]]:
    """Latents [N, C, h, w] -> images [N, 3, H, W] float32 on the CPU in [0, 1], and per item
    whether latents and pixels were all finite."""
    decoded = torch.cat([vae(latents[i:i + 1].to(dtype)) for i in range(latents.shape[0])])
    finite = (torch.isfinite(latents).flatten(1).all(1) & torch.isfinite(decoded).flatten(1).all(1)).cpu()
    # left on the device: the worker converts to uint8 there and copies a quarter of the bytes
    images = (decoded * 0.5 + 0.5).clamp(0, 1).float()
    return images, finite.tolist()
