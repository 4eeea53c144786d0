"""AutoencoderKL decoder for CogView3-Plus latents (decode only; encoder weights are not loaded).

Submodule names follow the diffusers checkpoint (`decoder.*`, `post_quant_conv`), so the
decoder part of the official state dict loads with strict=True.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .loading import config_fields


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple = (128, 512, 1024, 1024)
    layers_per_block: int = 3
    act_fn: str = "silu"
    latent_channels: int = 16
    norm_num_groups: int = 32
    sample_size: int = 1024
    scaling_factor: float = 1.0
    shift_factor: Optional[float] = None
    latents_mean: Optional[tuple] = None
    latents_std: Optional[tuple] = None
    force_upcast: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = False

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        kw = {k: (tuple(v) if isinstance(v, list) else v)
              for k, v in config_fields(cls, d, "vae/config.json").items()}
        cfg = cls(**kw)
        if cfg.act_fn != "silu":
            raise ValueError(f"vae/config.json act_fn {cfg.act_fn!r} is not supported (only 'silu')")
        bad = [t for t in cfg.up_block_types if t != "UpDecoderBlock2D"]
        if bad:
            raise ValueError(f"vae/config.json up_block_types {bad} are not supported (only UpDecoderBlock2D)")
        return cfg


class ResnetBlock(nn.Module):
    def __init__(self, ci: int, co: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, ci, eps=1e-6)
        self.conv1 = nn.Conv2d(ci, co, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, co, eps=1e-6)
        self.conv2 = nn.Conv2d(co, co, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(ci, co, 1) if ci != co else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class SpatialSelfAttention(nn.Module):
    """One-head self-attention over pixels, with a residual (diffusers' mid-block attention)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Identity()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        s = self.group_norm(x).view(n, c, h * w).transpose(1, 2)  # [N, HW, C]
        q, k, v = (f(s)[:, None] for f in (self.to_q, self.to_k, self.to_v))  # [N, 1, HW, C]
        out = self.to_out[0](F.scaled_dot_product_attention(q, k, v)[:, 0])
        return x + out.transpose(1, 2).reshape(n, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)] if add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Upsampler(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpBlock(nn.Module):
    def __init__(self, ci: int, co: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(ci if i == 0 else co, co, groups) for i in range(layers))
        self.upsamplers = nn.ModuleList([Upsampler(co)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        for u in self.upsamplers:
            x = u(x)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = list(reversed(cfg.block_out_channels))
        g = cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, upsample=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAEDecoder(nn.Module):
    """Latents [N, C, h, w] -> images [N, 3, h*f, w*f] in roughly [-1, 1]."""

    # checkpoint keys that belong to the encoding half and are not loaded
    unused_prefixes = ("encoder.", "quant_conv.")

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.decoder = Decoder(config)
        c = config.latent_channels
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None

    @property
    def downscale_factor(self) -> int:
        return self.config.downscale_factor

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.config.scaling_factor
        if self.config.shift_factor is not None:
            z = z + self.config.shift_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
