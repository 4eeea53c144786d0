"""CogView3-Plus sampling as plain functions that take the models as arguments, so a tiny or
fake text encoder, transformer or VAE slots in.

Numerically the reference (diffusers' CogView3PlusPipeline): zero negative embedding by
default, CFG in fp32, DDIM with float64 coefficients, noise from a CPU generator per item.
Every model call sees one item (`[uncond, cond]` with CFG, else `[cond]`): kernels choose
blockings by shape, so a fixed per-item shape makes an image independent of its batch-mates
and gives compiled graphs one static shape for every batch size.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from .scheduler import SchedulerConfig, ddim_step, step_coefficients


def get_noise(seeds: Sequence[int], shape: tuple[int, ...], dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """[N, *shape]: item i drawn on a CPU generator seeded with seeds[i], the same on any device."""
    draws = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)), dtype=dtype)
             for s in seeds]
    return torch.stack(draws).to(device)


def encode_prompts(text_encoder, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, list[int]]:
    """Encode each distinct prompt once; return [N, L, D] in row order and token counts.

    Each prompt is encoded on its own: an embedding must not depend on its batch-mates.
    """
    unique = list(dict.fromkeys(prompts))
    encoded = [text_encoder.encode([p], max_sequence_length=max_sequence_length) for p in unique]
    pos = {p: i for i, p in enumerate(unique)}
    embeds = torch.cat([encoded[pos[p]][0] for p in prompts])
    return embeds, [encoded[pos[p]][1][0] for p in prompts]


def encode_negative(text_encoder, negative_prompt: Union[None, str, Sequence[Optional[str]]],
                    prompt_embeds: torch.Tensor, max_sequence_length: int) -> torch.Tensor:
    """[N, L, D] negative embeddings: zeros for None (the whole batch or one entry), else encoded."""
    n = prompt_embeds.shape[0]
    if negative_prompt is None:
        return torch.zeros_like(prompt_embeds)
    negs = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negs) != n:
        raise ValueError(f"negative_prompt has {len(negs)} entries for {n} prompts")
    out = torch.zeros_like(prompt_embeds)
    idx = [i for i, s in enumerate(negs) if s is not None]
    if idx:
        enc, _ = encode_prompts(text_encoder, [negs[i] for i in idx], max_sequence_length)
        out[idx] = enc
    return out


def denoise(transformer: Callable[..., torch.Tensor], latents: torch.Tensor, texts: list[torch.Tensor],
            scheduler_config: SchedulerConfig, num_inference_steps: int, guidance_scale: float,
            height: int, width: int) -> torch.Tensor:
    """Run DDIM from noise `latents` [N, C, h, w] to clean latents, in `latents.dtype`.

    texts[i]: [2, L, D] (uncond, cond) when guidance_scale > 1, else [1, L, D] (cond).
    """
    use_cfg = guidance_scale > 1.0
    rows = 2 if use_cfg else 1
    n, dtype, dev = latents.shape[0], latents.dtype, latents.device
    size = torch.tensor([[height, width]], dtype=texts[0].dtype, device=dev).repeat(rows, 1)
    crop = torch.tensor([[0, 0]], dtype=texts[0].dtype, device=dev).repeat(rows, 1)
    coeffs = step_coefficients(scheduler_config, num_inference_steps)
    # all timestep tensors are made up front: no host work depends on device values in the loop
    steps = [torch.full((rows,), c.timestep, dtype=torch.int64, device=dev) for c in coeffs]
    for c, t in zip(coeffs, steps):
        vs = []
        for i in range(n):
            x_i = latents[i:i + 1]
            v = transformer(x_i.repeat(rows, 1, 1, 1), texts[i], t, size, size, crop).float()
            if use_cfg:
                v = v[:1] + guidance_scale * (v[1:] - v[:1])
            vs.append(v)
        latents = ddim_step(scheduler_config, torch.cat(vs), latents, c).to(dtype)
    return latents


def decode(vae: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
    """Latents [N, C, h, w] -> images [N, 3, H, W] float32 on the CPU in [0, 1], and per item
    whether latents and pixels were all finite."""
    n = latents.shape[0]
    decoded = torch.cat([vae(latents[i:i + 1]) for i in range(n)])
    finite = (torch.isfinite(latents).flatten(1).all(1) & torch.isfinite(decoded).flatten(1).all(1)).cpu()
    # left on the device: the worker converts to uint8 there and copies a quarter of the bytes
    images = (decoded * 0.5 + 0.5).clamp(0, 1).float()
    return images, finite.tolist()
