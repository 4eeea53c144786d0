"""Random-weight CogView3-Plus checkpoints in the official diffusers folder layout.

Tests and demos need a checkpoint that loads like the real one (in our loader and in
diffusers) without downloading 25 GB. Weights are seeded per key, so the same preset and seed
always give the same bytes.
"""
from __future__ import annotations

import json
import shutil
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import sentencepiece
import torch
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel

from cogview_ray.model.cogview3plus.transformer import CogView3PlusTransformer, TransformerConfig
from cogview_ray.model.vae import VAEConfig, VAEDecoder

DIFFUSERS_VERSION = "0.31.0.dev0"  # what the Hub checkpoint was written with
EXTRA_IDS = 100
MODEL_MAX_LENGTH = 224
SHARD_BYTES = 5_000_000_000

MODEL_INDEX = {
    "_class_name": "CogView3PlusPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"],
    "transformer": ["diffusers", "CogView3PlusTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

SCHEDULER_CONFIG = {
    "_class_name": "CogVideoXDDIMScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "snr_shift_scale": 4.0,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}

# The shipped VAE flags, kept in every preset.
_VAE_SHIPPED = dict(
    in_channels=3, out_channels=3, act_fn="silu", latent_channels=16, scaling_factor=1.0,
    shift_factor=None, latents_mean=None, latents_std=None, force_upcast=True,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
)


@dataclass(frozen=True)
class Preset:
    transformer: dict  # diffusers transformer config keys (no `_` keys)
    vae: dict  # diffusers AutoencoderKL config keys
    text_encoder: dict  # T5Config keyword arguments
    dtype: torch.dtype  # on disk, every component
    shard_bytes: int | None = None  # shard transformer and text encoder above this size
    notes: str = field(default="", compare=False)


def _transformer(heads: int, head_dim: int, layers: int, text_dim: int, time_dim: int, cond_dim: int,
                 pos_max: int, sample: int) -> dict:
    return {
        "attention_head_dim": head_dim, "condition_dim": cond_dim, "in_channels": 16,
        "num_attention_heads": heads, "num_layers": layers, "out_channels": 16, "patch_size": 2,
        "pooled_projection_dim": 6 * cond_dim, "pos_embed_max_size": pos_max, "sample_size": sample,
        "text_embed_dim": text_dim, "time_embed_dim": time_dim,
    }


def _vae(channels: list[int], layers: int, groups: int, sample: int) -> dict:
    n = len(channels)
    return {
        **_VAE_SHIPPED, "block_out_channels": channels, "layers_per_block": layers, "norm_num_groups": groups,
        "sample_size": sample, "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
    }


def _t5(d_model: int, layers: int, heads: int, d_kv: int, d_ff: int, vocab: int) -> dict:
    # google/t5-v1_1 family settings; only the sizes differ between presets
    return dict(
        vocab_size=vocab, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers, num_decoder_layers=layers,
        num_heads=heads, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.1, layer_norm_epsilon=1e-6, initializer_factor=1.0, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, is_encoder_decoder=True, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        transformer=_transformer(heads=2, head_dim=8, layers=2, text_dim=32, time_dim=32, cond_dim=8,
                                 pos_max=64, sample=32),
        vae=_vae([8, 16, 32, 32], layers=1, groups=4, sample=256),
        text_encoder=_t5(d_model=32, layers=2, heads=4, d_kv=8, d_ff=64, vocab=640),
        dtype=torch.float32,
        notes="renders 512 px in seconds on CPU; up to 1024 px",
    ),
    "small": Preset(
        transformer=_transformer(heads=4, head_dim=40, layers=4, text_dim=128, time_dim=64, cond_dim=32,
                                 pos_max=128, sample=128),
        vae=_vae([32, 64, 128, 128], layers=1, groups=32, sample=1024),
        text_encoder=_t5(d_model=128, layers=2, heads=4, d_kv=32, d_ff=256, vocab=640),
        dtype=torch.float32,
        notes="real head size, few heads and layers; CPU benchmarks",
    ),
    "full": Preset(
        transformer=_transformer(heads=64, head_dim=40, layers=30, text_dim=4096, time_dim=512, cond_dim=256,
                                 pos_max=128, sample=128),
        vae=_vae([128, 512, 1024, 1024], layers=3, groups=32, sample=1024),
        text_encoder=_t5(d_model=4096, layers=24, heads=64, d_kv=64, d_ff=10240, vocab=32128),
        dtype=torch.bfloat16,
        shard_bytes=SHARD_BYTES,
        notes="the real sizes (about 16 GB on disk in bfloat16)",
    ),
}


# names only: cogview4/checkpoint.py defines them (and imports this module)
COGVIEW4_PRESETS = ("tiny-cogview4", "small-cogview4", "full-cogview4")


def make_checkpoint(preset: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random-weight checkpoint of `preset` ("tiny", "small", "full") to `out_dir`.

    `out_dir` must be absent or empty. model_index.json is written last, so a folder that has
    it is complete.
    """
    if preset in COGVIEW4_PRESETS:  # the CogView4 family writes its own (GLM text encoder)
        from cogview_ray.model.cogview4.checkpoint import make_cogview4_checkpoint

        return make_cogview4_checkpoint(preset, out_dir, seed)
    if preset not in PRESETS:
        raise ValueError(f"Unknown checkpoint preset {preset!r}; choose one of "
                         f"{', '.join([*PRESETS, *COGVIEW4_PRESETS])}.")
    return write_layout(out_dir, PRESETS[preset], seed, write_transformer, write_text_encoder, write_tokenizer,
                        SCHEDULER_CONFIG, MODEL_INDEX)


def write_layout(out_dir: str | Path, spec: Preset, seed: int, write_transformer, write_text_encoder,
                 write_tokenizer, scheduler_config: dict, model_index: dict) -> Path:
    """A family's component writers fill the official layout (the VAE is shared) in `out_dir`,
    absent or empty; model_index.json is written last, so a folder that has it is complete."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"Checkpoint folder {out} already exists and is not empty.")
    out.mkdir(parents=True, exist_ok=True)
    write_transformer(out / "transformer", spec, seed)
    write_vae(out / "vae", spec, seed)
    write_text_encoder(out / "text_encoder", spec, seed)
    write_tokenizer(out / "tokenizer")
    _write_json(out / "scheduler" / "scheduler_config.json", scheduler_config)
    _write_json(out / "model_index.json", model_index)
    return out


# ---------------------------------------------------------------------------------------------
# Components


def write_module_weights(folder: Path, module: type, config, class_name: str, spec: Preset, seed: int) -> None:
    """Random weights for every state-dict key of `module(config)` (shapes from the meta device),
    with the diffusers config.json of `class_name`."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in module(config).state_dict().items()}
    state = {k: random_tensor(k, shape, seed, spec.dtype) for k, shape in shapes.items()}
    _write_json(folder / "config.json", _diffusers_config(class_name, spec.transformer))
    write_safetensors(state, folder, "diffusion_pytorch_model", spec.shard_bytes)


def write_transformer(folder: Path, spec: Preset, seed: int) -> None:
    write_module_weights(folder, CogView3PlusTransformer, TransformerConfig.from_dict(spec.transformer),
                         "CogView3PlusTransformer2DModel", spec, seed)


def write_vae(folder: Path, spec: Preset, seed: int) -> None:
    config = VAEConfig.from_dict(spec.vae)
    with torch.device("meta"):
        decoder = {k: tuple(v.shape) for k, v in VAEDecoder(config).state_dict().items()}
    shapes = {**vae_encoder_shapes(config), **decoder}
    state = {k: random_tensor(k, shape, seed, spec.dtype) for k, shape in shapes.items()}
    _write_json(folder / "config.json", _diffusers_config("AutoencoderKL", spec.vae))
    write_safetensors(state, folder, "diffusion_pytorch_model", None)


def write_text_encoder(folder: Path, spec: Preset, seed: int) -> None:
    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**spec.text_encoder))
    save_random_pretrained(model, folder, spec, seed, tie=True)


def save_random_pretrained(meta_model, folder: Path, spec: Preset, seed: int, tie: bool = False) -> None:
    """A transformers model made on the meta device, filled with seeded weights in the disk dtype
    (allocated in it directly: a full text encoder is 19-38 GB in float32) and saved."""
    model = meta_model.to(spec.dtype).to_empty(device="cpu")
    if tie:
        model.tie_weights()  # to_empty gives a shared embedding a second copy
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(random_tensor(name, tuple(param.shape), seed, spec.dtype))
    model.save_pretrained(str(folder), max_shard_size=spec.shard_bytes or "50GB")


def write_tokenizer(folder: Path) -> None:
    """spiece.model from the package assets plus the T5Tokenizer files the Hub ships."""
    folder.mkdir(parents=True, exist_ok=True)
    asset = resources.files("cogview_ray") / "assets" / "tokenizer" / "spiece.model"
    with resources.as_file(asset) as src:
        shutil.copyfile(src, folder / "spiece.model")
    pieces = _spiece_size(folder / "spiece.model")
    extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    # T5 puts extra ids after the SentencePiece vocabulary, in reverse: <extra_id_0> is the last id
    extra_ids = {tok: pieces + EXTRA_IDS - 1 - i for i, tok in enumerate(extra)}
    special = {"<pad>": 0, "</s>": 1, "<unk>": 2, **extra_ids}
    decoder = {
        str(i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for tok, i in sorted(special.items(), key=lambda kv: kv[1])
    }
    _write_json(folder / "added_tokens.json", extra_ids)
    _write_json(folder / "special_tokens_map.json", {
        "additional_special_tokens": extra, "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
    })
    _write_json(folder / "tokenizer_config.json", {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": EXTRA_IDS,
        "legacy": True,
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    })


def _spiece_size(path: Path) -> int:
    return sentencepiece.SentencePieceProcessor(model_file=str(path)).get_piece_size()


# ---------------------------------------------------------------------------------------------
# Weights


def vae_encoder_shapes(config: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of AutoencoderKL's encoding half (`encoder.*`, `quant_conv.*`) for `config`."""
    ch = list(config.block_out_channels)
    shapes: dict[str, tuple[int, ...]] = {}
    shapes.update(_conv("encoder.conv_in", config.in_channels, ch[0], 3))
    prev = ch[0]
    for i, co in enumerate(ch):
        for j in range(config.layers_per_block):
            shapes.update(_resnet(f"encoder.down_blocks.{i}.resnets.{j}", prev if j == 0 else co, co))
        if i < len(ch) - 1:
            shapes.update(_conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", co, co, 3))
        prev = co
    c = ch[-1]
    if config.mid_block_add_attention:
        base = "encoder.mid_block.attentions.0"
        shapes.update({f"{base}.group_norm.weight": (c,), f"{base}.group_norm.bias": (c,)})
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            shapes.update({f"{base}.{proj}.weight": (c, c), f"{base}.{proj}.bias": (c,)})
    for j in range(2):
        shapes.update(_resnet(f"encoder.mid_block.resnets.{j}", c, c))
    shapes.update({"encoder.conv_norm_out.weight": (c,), "encoder.conv_norm_out.bias": (c,)})
    z = 2 * config.latent_channels  # mean and log-variance
    shapes.update(_conv("encoder.conv_out", c, z, 3))
    if config.use_quant_conv:
        shapes.update(_conv("quant_conv", z, z, 1))
    return shapes


def _conv(prefix: str, ci: int, co: int, k: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (co, ci, k, k), f"{prefix}.bias": (co,)}


def _resnet(prefix: str, ci: int, co: int) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}.norm1.weight": (ci,), f"{prefix}.norm1.bias": (ci,)}
    shapes.update(_conv(f"{prefix}.conv1", ci, co, 3))
    shapes.update({f"{prefix}.norm2.weight": (co,), f"{prefix}.norm2.bias": (co,)})
    shapes.update(_conv(f"{prefix}.conv2", co, co, 3))
    if ci != co:
        shapes.update(_conv(f"{prefix}.conv_shortcut", ci, co, 1))
    return shapes


def random_tensor(key: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """A seeded random tensor for one weight; depends only on (key, shape, seed, dtype).

    Matrices and kernels get std 1/sqrt(fan_in) so activations keep unit scale; 1-D norm
    weights are near 1, other 1-D tensors (biases) near 0.
    """
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if len(shape) >= 2:
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        values = noise * fan_in**-0.5
    elif "norm" in key and key.endswith(".weight"):
        values = 1.0 + 0.02 * noise
    else:
        values = 0.02 * noise
    return values.to(dtype)


def write_safetensors(state: dict[str, torch.Tensor], folder: Path, stem: str, shard_bytes: int | None) -> None:
    """One `{stem}.safetensors`, or shards plus `{stem}.safetensors.index.json` above `shard_bytes`."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {k: v.numel() * v.element_size() for k, v in state.items()}
    total = sum(sizes.values())
    if shard_bytes is None or total <= shard_bytes:
        save_file(state, str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
        return
    shards: list[list[str]] = [[]]
    used = 0
    for key in state:  # module order, as diffusers shards
        if shards[-1] and used + sizes[key] > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += sizes[key]
    weight_map = {}
    for i, keys in enumerate(shards, start=1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k] for k in keys}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    _write_json(folder / f"{stem}.safetensors.index.json", {"metadata": {"total_size": total},
                                                            "weight_map": weight_map})


def _diffusers_config(class_name: str, values: dict) -> dict:
    return {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **values}


def _write_json(path: Path, data: dict) -> None:
    # diffusers' own format: sorted keys, two-space indent, trailing newline
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
