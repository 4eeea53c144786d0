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
        # SiLU in place on the fresh norm output, the residual added into the fresh conv output:
        # the same values as out-of-place (IEEE addition commutes), without two allocations
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(skip)


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
        s = self.group_norm(x).reshape(n, c, h * w).transpose(1, 2)  # [N, HW, C] (a view unless channels-last)
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


# Nearest x2 upsampling then a 3x3 convolution, per output phase a (row or column parity): the
# three taps fall on two input pixels, the kernel rows summed as _PHASE_TAPS[a] says ([phase, tap, k]).
_PHASE_TAPS = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))


class Upsampler(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.subpixel = False  # VAEDecoder.use_channels_last sets it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.subpixel:
            return self._subpixel(x)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    def _subpixel(self, x: torch.Tensor) -> torch.Tensor:
        """The same map as upsample + conv, as one 2x2 convolution at the input resolution with
        4x the output channels (one set per output phase): 16 taps per 2x2 output block instead
        of 36. Sums the kernel taps first, so it rounds differently (float32 only)."""
        n, c, h, w = x.shape
        w3, co = self.conv.weight, self.conv.out_channels
        taps = torch.tensor(_PHASE_TAPS, dtype=w3.dtype, device=w3.device)  # [2, 2, 3]
        # kernel [a, b, o, i, u, v]: phase (a, b), input tap (u, v) of a 2x2 window
        k = torch.einsum("auk,oikl,bvl->aboiuv", taps, w3, taps).reshape(4 * co, c, 2, 2)
        y = F.conv2d(x, k.contiguous(memory_format=torch.channels_last), self.conv.bias.repeat(4), padding=1)
        # y: [N, 4*co, h+1, w+1]; phase (a, b) is y[:, (2a+b)*co : ..., a:a+h, b:b+w]
        out = torch.empty(n, h, 2, w, 2, co, dtype=y.dtype, device=y.device)  # NHWC storage
        for a in range(2):
            for b in range(2):
                i = 2 * a + b
                out[:, :, a, :, b, :] = y[:, i * co:(i + 1) * co, a:a + h, b:b + w].permute(0, 2, 3, 1)
        return out.view(n, 2 * h, 2 * w, co).permute(0, 3, 1, 2)


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
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))


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
        self.channels_last = False

    def use_channels_last(self) -> "VAEDecoder":
        """Run the convolutions in channels-last (NHWC) layout: on CPU oneDNN then skips its
        per-convolution layout reorders (about 1.3-2x faster convolutions). Different kernels
        round differently, so this changes output bits: a family opts in and records it."""
        self.to(memory_format=torch.channels_last)
        self.channels_last = True
        for module in self.modules():
            if isinstance(module, Upsampler):
                module.subpixel = True  # 2.25x fewer FLOPs in the upsamplers
        return self

    @property
    def downscale_factor(self) -> int:
        return self.config.downscale_factor

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.config.scaling_factor
        if self.config.shift_factor is not None:
            z = z + self.config.shift_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        if not self.channels_last:
            return self.decoder(z)
        # images come back in the standard layout: callers index and hash them as NCHW
        return self.decoder(z.contiguous(memory_format=torch.channels_last)).contiguous()
