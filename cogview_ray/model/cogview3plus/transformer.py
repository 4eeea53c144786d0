"""CogView3-Plus diffusion transformer (MMDiT with joint text-image attention).

Parameter names equal the diffusers checkpoint keys, so a state dict loads with
strict=True and no renaming. `forward` has no host syncs and no branching on tensor
values, so it compiles with `torch.compile(fullgraph=True)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import attention_context, make_attend
from ..loading import config_fields

# Keys diffusers writes into config.json that do not shape the network.
_IGNORED_CONFIG_KEYS = {"pooled_projection_dim"}


@dataclass(frozen=True)
class TransformerConfig:
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 30
    attention_head_dim: int = 40
    num_attention_heads: int = 64
    out_channels: int = 16
    text_embed_dim: int = 4096
    time_embed_dim: int = 512
    condition_dim: int = 256
    pos_embed_max_size: int = 128
    sample_size: int = 128

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        return cls(**config_fields(cls, d, "transformer/config.json", _IGNORED_CONFIG_KEYS))


def sincos_table(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table [grid, grid, dim]; first half encodes the column, second the row."""
    quarter = dim // 4
    omega = torch.arange(quarter, dtype=torch.float64) / (dim / 4.0)
    omega = 1.0 / 10000**omega  # [dim/4]
    pos = torch.arange(grid, dtype=torch.float64)
    ang = torch.outer(pos, omega)  # [grid, dim/4]
    # rounded to float32 before the table is tiled: the same values, without a float64 [grid, grid, dim]
    one_d = torch.cat([ang.sin(), ang.cos()], dim=1).float()  # [grid, dim/2]
    col = one_d[None, :, :].expand(grid, grid, dim // 2)  # indexed [row, col]
    row = one_d[:, None, :].expand(grid, grid, dim // 2)
    return torch.cat([col, row], dim=-1)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, onednn: bool, gelu: bool = False) -> torch.Tensor:
    """x @ weight.T + bias (then tanh-GELU), by oneDNN when `onednn` (float32 on CPU only).

    oneDNN's GEMM runs 1.1-1.4x faster than MKL's sgemm on this project's AMD CPUs and fuses the
    GELU into the GEMM's output pass; it rounds differently (about 5e-6), so a model opts in
    (`DiffusionTransformer.use_onednn`) and the pipeline records it in its identity. Under
    torch.compile the plain path is traced: inductor lowers this op only with frozen weights.
    """
    if onednn and not torch.compiler.is_compiling():
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                                  "tanh" if gelu else "")
    y = F.linear(x, weight, bias)
    return F.gelu(y, approximate="tanh") if gelu else y


def timestep_sinusoid(values: torch.Tensor, dim: int) -> torch.Tensor:
    """[N] -> [N, dim] float32 sinusoid, cosine half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    ang = values.float()[:, None] * freqs[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


class MLPEmbedder(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding / PixArt text projection)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeConditionEmbed(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.timestep_dim = cfg.inner_dim
        self.condition_dim = cfg.condition_dim
        self.timestep_embedder = MLPEmbedder(cfg.inner_dim, cfg.time_embed_dim)
        self.condition_embedder = MLPEmbedder(6 * cfg.condition_dim, cfg.time_embed_dim)

    def forward(self, timestep, original_size, target_size, crop_coords, dtype) -> torch.Tensor:
        n = timestep.shape[0]
        t = timestep_sinusoid(timestep, self.timestep_dim)
        # order is original size, crop coords, target size: [N, 6 * condition_dim]
        sizes = [original_size, crop_coords, target_size]
        cond = torch.cat([timestep_sinusoid(s.flatten(), self.condition_dim).view(n, -1) for s in sizes], dim=1)
        return self.timestep_embedder(t.to(dtype)) + self.condition_embedder(cond.to(dtype))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.grid = cfg.pos_embed_max_size
        self.dim = cfg.inner_dim
        self.proj = nn.Linear(cfg.in_channels * cfg.patch_size**2, cfg.inner_dim)
        self.text_proj = nn.Linear(cfg.text_embed_dim, cfg.inner_dim)
        self.register_buffer("pos_embed", sincos_table(self.dim, self.grid), persistent=False)

    def init_buffers(self, device) -> None:
        self.pos_embed = sincos_table(self.dim, self.grid).to(device)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        n, c, hl, wl = x.shape
        p = self.patch_size
        h, w = hl // p, wl // p
        # tokens: [N, h*w, C*p*p], feature = c*p*p + dy*p + dx
        tokens = x.view(n, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w, c * p * p)
        seq = torch.cat([self.text_proj(text), self.proj(tokens)], dim=1)
        img_pos = self.pos_embed[:h, :w].reshape(h * w, self.dim)
        pos = torch.cat([img_pos.new_zeros(text.shape[1], self.dim), img_pos], dim=0)
        # the add runs in the table's dtype (fp32), then rounds back, as the reference does
        return (seq + pos[None]).to(seq.dtype)


class AdaNormZeroTextImage(nn.Module):
    def __init__(self, time_dim: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(time_dim, 12 * dim)

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # 12 x [N, 1, D]: shift/scale/gate for msa and mlp, image stream then text stream
        return tuple(m[:, None] for m in self.linear(F.silu(emb)).chunk(12, dim=1))


class FusedQKV(nn.Module):
    """Joint attention's parameters with q, k, v as one fused projection (both families).

    The checkpoint keys stay the official `to_q` / `to_k` / `to_v`: their parameters are views
    into `qkv_weight` / `qkv_bias` (non-persistent buffers, [3 * H * Dh, D]), rebuilt after every
    load_state_dict and dtype/device move, so one GEMM reads the input once and no weight is
    held twice. On CPU the fused GEMM gives the same bits as three (checked by a test).
    """

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, heads * head_dim)
        self.to_k = nn.Linear(dim, heads * head_dim)
        self.to_v = nn.Linear(dim, heads * head_dim)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim), nn.Identity()])
        self.attend = F.scaled_dot_product_attention  # DiffusionTransformer.set_attention replaces it
        self.onednn = False  # DiffusionTransformer.use_onednn sets it
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)
        self.fuse_projections()
        # assign=True loads replace the parameters: fuse again afterwards
        self.register_load_state_dict_post_hook(lambda module, _keys: module.fuse_projections())

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Concatenate to_q, to_k, to_v into the fused buffers and make their parameters views of them."""
        parts = (self.to_q, self.to_k, self.to_v)
        self.qkv_weight = torch.cat([p.weight for p in parts])
        self.qkv_bias = torch.cat([p.bias for p in parts])
        rows = self.heads * self.head_dim
        for i, proj in enumerate(parts):
            grad = proj.weight.requires_grad
            proj.weight = nn.Parameter(self.qkv_weight[i * rows:(i + 1) * rows], requires_grad=grad)
            proj.bias = nn.Parameter(self.qkv_bias[i * rows:(i + 1) * rows], requires_grad=grad)

    def _apply(self, fn, recurse=True):
        # .to()/.half() convert parameters and buffers one by one, which would undo the sharing
        out = super()._apply(fn, recurse)
        self.fuse_projections()
        return out


class JointAttention(FusedQKV):
    def forward(self, s: torch.Tensor) -> torch.Tensor:
        n, length, _ = s.shape
        heads, d = self.heads, self.head_dim
        qkv = linear(s, self.qkv_weight, self.qkv_bias, self.onednn).view(n, length, 3, heads, d)
        # One layer norm over rows of d contiguous values: no copy to make q, k contiguous first.
        # It also normalises v (discarded): cheaper than copying q and k out of the fused output.
        normed = F.layer_norm(qkv, (d,), eps=1e-6)
        # q, k, v: [N, H, L, Dh] strided views; SDPA reads them in place
        q, k = normed[:, :, 0].transpose(1, 2), normed[:, :, 1].transpose(1, 2)
        v = qkv[:, :, 2].transpose(1, 2)
        out = self.attend(q, k, v)
        proj = self.to_out[0]
        return linear(out.transpose(1, 2).reshape(n, length, heads * d), proj.weight, proj.bias, self.onednn)


class GELUProj(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])
        self.onednn = False  # DiffusionTransformer.use_onednn sets it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.onednn:
            return self.net[2](self.net[0](x))
        up, down = self.net[0].proj, self.net[2]
        return linear(linear(x, up.weight, up.bias, True, gelu=True), down.weight, down.bias, True)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift


def _modulate_joint(h: torch.Tensor, lt: int, c_shift, c_scale, shift, scale) -> torch.Tensor:
    """LN(h) * (1 + scale) + shift with the text rows [:lt] and image rows [lt:] modulated apart.

    One layer norm over the joint stream (rows are independent, so the bits equal two calls),
    then the modulation in place on its fresh output: no concatenation, no temporaries.
    """
    out = F.layer_norm(h, (h.shape[-1],), eps=1e-5)
    out[:, :lt].mul_(1 + c_scale).add_(c_shift)
    out[:, lt:].mul_(1 + scale).add_(shift)
    return out


def _add_gated(h: torch.Tensor, update: torch.Tensor, lt: int, c_gate, gate) -> None:
    """h += gate * update per stream, in place (update is a fresh output and is overwritten)."""
    update[:, :lt].mul_(c_gate)
    update[:, lt:].mul_(gate)
    h.add_(update)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.norm1 = AdaNormZeroTextImage(cfg.time_embed_dim, dim)
        self.attn1 = JointAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim)
        self.ff = FeedForward(dim)

    def forward(self, h: torch.Tensor, lt: int, emb: torch.Tensor) -> torch.Tensor:
        """h: the joint stream [N, Lt + Li, D], text rows first; updated in place and returned.

        The same operations in the same order as two separate streams (diffusers' layout), so the
        same bits, without concatenating the streams twice per block.
        """
        (sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp,
         c_sh_msa, c_sc_msa, c_g_msa, c_sh_mlp, c_sc_mlp, c_g_mlp) = self.norm1(emb)
        attn = self.attn1(_modulate_joint(h, lt, c_sh_msa, c_sc_msa, sh_msa, sc_msa))
        _add_gated(h, attn, lt, c_g_msa, g_msa)
        ff = self.ff(_modulate_joint(h, lt, c_sh_mlp, c_sc_mlp, sh_mlp, sc_mlp))
        _add_gated(h, ff, lt, c_g_mlp, g_mlp)
        return h


class AdaNormOut(nn.Module):
    def __init__(self, time_dim: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(time_dim, 2 * dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(emb).to(x.dtype)).chunk(2, dim=1)
        return _modulate(x, shift[:, None], scale[:, None], eps=1e-6)


class DiffusionTransformer(nn.Module):
    """Both families' outer shape: patch and time embeddings, the blocks, a modulated final norm
    and the un-patching projection (official key names); a family gives its parts and `_forward`.
    Every block attends through `block.attn1.attend` and has `onednn` switches on `attn1` and `ff`."""

    attention: Optional[str] = None  # the pinned SDPA backend; None: torch picks

    def __init__(self, config, patch_embed: type, block: type, norm_out: type):
        super().__init__()
        self.config = config
        self.patch_embed = patch_embed(config)
        self.time_condition_embed = TimeConditionEmbed(config)
        self.transformer_blocks = nn.ModuleList(block(config) for _ in range(config.num_layers))
        self.norm_out = norm_out(config.time_embed_dim, config.inner_dim)
        p = config.patch_size
        self.proj_out = nn.Linear(config.inner_dim, p * p * config.out_channels)

    def set_attention(self, name: str) -> None:
        """Pin every block's attention to backend `name` (resolved, not "auto")."""
        attend = make_attend(name)
        for block in self.transformer_blocks:
            block.attn1.attend = attend
        self.attention = name

    def use_onednn(self) -> bool:
        """Run the blocks' big GEMMs (q/k/v, out, feed-forward with its GELU) on oneDNN: float32 on
        CPU only, where it is faster; changes output bits (about 5e-6 per GEMM). False where the
        model is not float32 on CPU or this torch lacks the kernel."""
        p = self.proj_out.weight
        if not (p.device.type == "cpu" and p.dtype == torch.float32 and onednn_available()):
            return False
        for block in self.transformer_blocks:
            block.attn1.onednn = block.ff.onednn = True
        return True

    def forward(self, hidden_states, encoder_hidden_states, timestep, original_size, target_size, crop_coords):
        # the backend is pinned inside forward, so a compiled graph traces the pinned kernel
        with attention_context(self.attention):
            return self._forward(hidden_states, encoder_hidden_states, timestep, original_size, target_size,
                                 crop_coords)


class CogView3PlusTransformer(DiffusionTransformer):
    def __init__(self, config: TransformerConfig):
        super().__init__(config, PatchEmbed, TransformerBlock, AdaNormOut)

    def init_buffers(self, device) -> None:
        self.patch_embed.init_buffers(device)

    def _forward(self, hidden_states, encoder_hidden_states, timestep, original_size, target_size, crop_coords):
        n, _, hl, wl = hidden_states.shape
        p, co = self.config.patch_size, self.config.out_channels
        lt = encoder_hidden_states.shape[1]
        seq = self.patch_embed(hidden_states, encoder_hidden_states)
        emb = self.time_condition_embed(timestep, original_size, target_size, crop_coords, seq.dtype)
        for block in self.transformer_blocks:
            seq = block(seq, lt, emb)
        x = self.proj_out(self.norm_out(seq[:, lt:], emb))  # [N, h*w, p*p*C]
        h, w = hl // p, wl // p
        x = x.view(n, h, w, co, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(n, co, h * p, w * p)
