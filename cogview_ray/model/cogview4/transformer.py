"""CogView4 diffusion transformer (MMDiT, joint text-image attention, 2-D RoPE on image tokens).

Parameter names equal the diffusers checkpoint keys, so a state dict loads with strict=True.
`forward` has no host syncs and no branching on tensor values (fullgraph-compilable). The
time/size embedding, feed-forward, fused q/k/v projection and oneDNN switch are CogView3-Plus's,
reused from that family.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..cogview3plus.transformer import DiffusionTransformer, FeedForward, FusedQKV, linear
from ..loading import config_fields

ROPE_THETA = 10000.0


@dataclass(frozen=True)
class TransformerConfig:
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 30
    attention_head_dim: int = 40
    num_attention_heads: int = 64
    text_embed_dim: int = 4096
    time_embed_dim: int = 512
    condition_dim: int = 256
    pos_embed_max_size: int = 128
    sample_size: int = 128
    rope_axes_dim: tuple = (256, 256)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        kw = config_fields(cls, d, "transformer/config.json")
        if "rope_axes_dim" in kw:
            kw["rope_axes_dim"] = tuple(kw["rope_axes_dim"])
        cfg = cls(**kw)
        if cfg.attention_head_dim % 4:
            raise ValueError(f"transformer/config.json attention_head_dim {cfg.attention_head_dim} must be a "
                             "multiple of 4 (two rotary axes of cos/sin pairs)")
        return cfg


def rope_tables(head_dim: int, axes: tuple, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [h*w, head_dim] float32 for an h x w token grid.

    Each axis has `axes[i]` trained positions; a grid of any size samples them evenly
    (index * axes // size), so positions span the same range at every resolution.
    """
    half = head_dim // 2  # per axis
    inv = 1.0 / (ROPE_THETA ** (torch.arange(0, half, 2, dtype=torch.float32, device=device)[: half // 2] / half))
    rows = torch.arange(h, device=device) * axes[0] // h
    cols = torch.arange(w, device=device) * axes[1] // w
    fh = torch.outer(torch.arange(axes[0], device=device), inv)[rows]  # [h, half/2]
    fw = torch.outer(torch.arange(axes[1], device=device), inv)[cols]  # [w, half/2]
    freqs = torch.cat([fh[:, None].expand(h, w, -1), fw[None, :].expand(h, w, -1)], dim=-1)
    freqs = torch.cat([freqs, freqs], dim=-1).reshape(h * w, head_dim)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [N, H, L, d] by the tables [L, d]: halves (a, b) pair up as (a, b) -> (-b, a), in fp32."""
    a, b = x.unflatten(-1, (2, -1)).unbind(-2)
    rotated = torch.cat([-b, a], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class AdaNormZero(nn.Module):
    """Both streams' LayerNorm plus the 12 modulation vectors from the time embedding."""

    def __init__(self, time_dim: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(time_dim, 12 * dim)

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # 12 x [N, 1, D], interleaved image/text: shift, c_shift, scale, c_scale, gate, c_gate (msa, mlp)
        return tuple(m[:, None] for m in self.linear(emb).chunk(12, dim=1))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-5) * (1 + scale) + shift


class JointAttention(FusedQKV):
    """CogView4's joint attention: q/k layer norms (eps 1e-5), RoPE on the image tokens only; q, k, v
    from one fused GEMM as in CogView3-Plus (the official keys are views into it)."""

    def forward(self, s: torch.Tensor, lt: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # s: [N, Lt + Li, D], text first; q, k, v: [N, H, L, Dh] strided views of the fused output
        n, length, _ = s.shape
        heads, d = self.heads, self.head_dim
        qkv = linear(s, self.qkv_weight, self.qkv_bias, self.onednn).view(n, length, 3, heads, d)
        normed = F.layer_norm(qkv, (d,), eps=1e-5)  # v normalised too, and discarded: no copies
        q, k = normed[:, :, 0].transpose(1, 2), normed[:, :, 1].transpose(1, 2)
        v = qkv[:, :, 2].transpose(1, 2)
        # RoPE on image tokens only
        q = torch.cat([q[:, :, :lt], apply_rope(q[:, :, lt:], cos, sin)], dim=2)
        k = torch.cat([k[:, :, :lt], apply_rope(k[:, :, lt:], cos, sin)], dim=2)
        out = self.attend(q, k, v)
        proj = self.to_out[0]
        return linear(out.transpose(1, 2).reshape(n, length, heads * d), proj.weight, proj.bias, self.onednn)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.norm1 = AdaNormZero(cfg.time_embed_dim, dim)
        self.attn1 = JointAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim)
        self.ff = FeedForward(dim)

    def forward(self, x, c, emb, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        # x: image stream [N, Li, D]; c: text stream [N, Lt, D]
        (sh, c_sh, sc, c_sc, g, c_g, sh_mlp, c_sh_mlp, sc_mlp, c_sc_mlp, g_mlp, c_g_mlp) = self.norm1(emb)
        lt = c.shape[1]
        attn = self.attn1(torch.cat([_modulate(c, c_sh, c_sc), _modulate(x, sh, sc)], dim=1), lt, cos, sin)
        x = x + attn[:, lt:] * g
        c = c + attn[:, :lt] * c_g
        # the feed-forward runs on each stream apart, as the reference does (same matmul shapes)
        x = x + self.ff(_modulate(x, sh_mlp, sc_mlp)) * g_mlp
        c = c + self.ff(_modulate(c, c_sh_mlp, c_sc_mlp)) * c_g_mlp
        return x, c


class AdaNormOut(nn.Module):
    """Final LayerNorm modulated by the (already SiLU-activated) time embedding."""

    def __init__(self, time_dim: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(time_dim, 2 * dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(emb.to(x.dtype)).chunk(2, dim=1)
        return _modulate(x, shift[:, None], scale[:, None])


class PatchEmbed(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = nn.Linear(cfg.in_channels * cfg.patch_size**2, cfg.inner_dim)
        self.text_proj = nn.Linear(cfg.text_embed_dim, cfg.inner_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, hl, wl = x.shape
        p = self.patch_size
        h, w = hl // p, wl // p
        # tokens: [N, h*w, C*p*p], feature = c*p*p + dy*p + dx
        return self.proj(x.view(n, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w, c * p * p))


class CogView4Transformer(DiffusionTransformer):
    def __init__(self, config: TransformerConfig):
        super().__init__(config, PatchEmbed, TransformerBlock, AdaNormOut)

    def _forward(self, hidden_states, encoder_hidden_states, timestep, original_size, target_size, crop_coords):
        n, _, hl, wl = hidden_states.shape
        cfg = self.config
        p, co = cfg.patch_size, cfg.out_channels
        h, w = hl // p, wl // p
        cos, sin = rope_tables(cfg.attention_head_dim, cfg.rope_axes_dim, h, w, hidden_states.device)
        x = self.patch_embed(hidden_states)
        c = self.patch_embed.text_proj(encoder_hidden_states)
        emb = F.silu(self.time_condition_embed(timestep, original_size, target_size, crop_coords, x.dtype))
        for block in self.transformer_blocks:
            x, c = block(x, c, emb, cos, sin)
        x = self.proj_out(self.norm_out(x, emb))  # [N, h*w, p*p*C]
        x = x.view(n, h, w, co, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(n, co, h * p, w * p)
