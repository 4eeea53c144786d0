"""Random-weight CogView4 checkpoints in the official diffusers folder layout (THUDM/CogView4-6B's).

The presets `tiny-cogview4`, `small-cogview4`, `full-cogview4`; `model.checkpoint.make_checkpoint`
hands those names here. The GLM tokenizer is the packaged asset (jobs/make_glm_tokenizer_asset.py).
"""
from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import torch
from transformers import GlmConfig, GlmModel

from ..checkpoint import (SHARD_BYTES, Preset, _vae, _write_json, save_random_pretrained, write_layout,
                          write_module_weights)
from .transformer import CogView4Transformer, TransformerConfig

DIFFUSERS_VERSION = "0.33.0.dev0"  # what the Hub checkpoint was written with
EOS = "<|endoftext|>"  # GLM's eos, also its pad token
GLM_MODEL_MAX_LENGTH = 128000

MODEL_INDEX = {
    "_class_name": "CogView4Pipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "GlmModel"],
    "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
    "transformer": ["diffusers", "CogView4Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "base_image_seq_len": 256,
    "base_shift": 0.25,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 0.75,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "time_shift_type": "linear",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def _transformer(heads: int, head_dim: int, layers: int, text_dim: int, time_dim: int, cond_dim: int,
                 pos_max: int, sample: int) -> dict:
    return {
        "attention_head_dim": head_dim, "condition_dim": cond_dim, "in_channels": 16, "num_attention_heads": heads,
        "num_layers": layers, "out_channels": 16, "patch_size": 2, "pos_embed_max_size": pos_max,
        "rope_axes_dim": [256, 256], "sample_size": sample, "text_embed_dim": text_dim, "time_embed_dim": time_dim,
    }


def _vae4(channels: list[int], layers: int, groups: int, sample: int) -> dict:
    # CogView3-Plus's VAE, except that CogView4's config says shift_factor 0.0 (not null)
    return {**_vae(channels, layers, groups, sample), "shift_factor": 0.0}


def _glm(hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, vocab: int) -> dict:
    # glm-4-9b-hf settings; only the sizes differ between presets
    return dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, partial_rotary_factor=0.5,
        attention_bias=True, attention_dropout=0.0, hidden_act="silu", max_position_embeddings=131072,
        rms_norm_eps=1.5625e-07, rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=151329 if vocab > 151329
        else None, eos_token_id=[151329, 151336, 151338] if vocab > 151338 else None,
    )


PRESETS: dict[str, Preset] = {
    "tiny-cogview4": Preset(
        transformer=_transformer(heads=2, head_dim=16, layers=2, text_dim=32, time_dim=32, cond_dim=8, pos_max=64,
                                 sample=32),
        vae=_vae4([8, 16, 32, 32], layers=1, groups=4, sample=256),
        text_encoder=_glm(hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, intermediate=64, vocab=1040),
        dtype=torch.float32,
        notes="renders 512 px in seconds on CPU; up to 1024 px",
    ),
    "small-cogview4": Preset(
        transformer=_transformer(heads=4, head_dim=128, layers=4, text_dim=256, time_dim=64, cond_dim=32,
                                 pos_max=128, sample=128),
        vae=_vae4([32, 64, 128, 128], layers=1, groups=32, sample=1024),
        text_encoder=_glm(hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, intermediate=512, vocab=1040),
        dtype=torch.float32,
        notes="real head size, few heads and layers; CPU benchmarks",
    ),
    "full-cogview4": Preset(
        transformer=_transformer(heads=32, head_dim=128, layers=28, text_dim=4096, time_dim=512, cond_dim=256,
                                 pos_max=128, sample=128),
        vae=_vae4([128, 512, 1024, 1024], layers=3, groups=32, sample=1024),
        text_encoder=_glm(hidden=4096, layers=40, heads=32, kv_heads=2, head_dim=128, intermediate=13696,
                          vocab=151552),
        dtype=torch.bfloat16,
        shard_bytes=SHARD_BYTES,
        notes="the real sizes (about 31 GB on disk in bfloat16)",
    ),
}


def make_cogview4_checkpoint(preset: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random-weight CogView4 checkpoint of `preset` to `out_dir` (absent or empty).
    model_index.json is written last, so a folder that has it is complete."""
    return write_layout(out_dir, PRESETS[preset], seed, write_transformer, write_text_encoder, write_tokenizer,
                        SCHEDULER_CONFIG, MODEL_INDEX)


def write_transformer(folder: Path, spec: Preset, seed: int) -> None:
    write_module_weights(folder, CogView4Transformer, TransformerConfig.from_dict(spec.transformer),
                         "CogView4Transformer2DModel", spec, seed)


def write_text_encoder(folder: Path, spec: Preset, seed: int) -> None:
    with torch.device("meta"):
        model = GlmModel(GlmConfig(**spec.text_encoder))
    save_random_pretrained(model, folder, spec, seed)


def write_tokenizer(folder: Path) -> None:
    """tokenizer.json from the package assets plus the config GLM-4's fast tokenizer ships with."""
    folder.mkdir(parents=True, exist_ok=True)
    asset = resources.files("cogview_ray") / "assets" / "glm_tokenizer" / "tokenizer.json"
    with resources.as_file(asset) as src:
        shutil.copyfile(src, folder / "tokenizer.json")
    _write_json(folder / "special_tokens_map.json", {"eos_token": EOS, "pad_token": EOS})
    _write_json(folder / "tokenizer_config.json", {
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": GLM_MODEL_MAX_LENGTH,
        "pad_token": EOS,
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
    })


def random_pipeline(preset: str, device, dtype: torch.dtype, compile: str = "none", attention: str = "auto"):
    """A CogView4Pipeline of `preset`'s sizes built on `device` with its modules' own random init,
    nothing written or read (the GPU benchmark: 31 GB of full-size weights would take minutes to
    write). Speed only: the images mean nothing and no reference has these weights."""
    from transformers import PreTrainedTokenizerFast

    from ..vae import VAEConfig, VAEDecoder
    from .pipeline import CogView4Pipeline
    from .scheduler import SchedulerConfig
    from .text_encoder import GlmTextEncoder

    spec = PRESETS[preset]
    device = torch.device(device)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are made in `dtype`: no float32 copy of 15B weights
    try:
        with torch.device(device):
            transformer = CogView4Transformer(TransformerConfig.from_dict(spec.transformer))
            vae = VAEDecoder(VAEConfig.from_dict(spec.vae))
            glm = GlmModel(GlmConfig(**spec.text_encoder))
    finally:
        torch.set_default_dtype(default)
    for m in (transformer, vae, glm):
        m.eval().requires_grad_(False)
    asset = resources.files("cogview_ray") / "assets" / "glm_tokenizer" / "tokenizer.json"
    with resources.as_file(asset) as src:
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(src), eos_token=EOS, pad_token=EOS,
                                            padding_side="left", model_max_length=GLM_MODEL_MAX_LENGTH)
    text_encoder = GlmTextEncoder(tokenizer, glm, device, dtype)
    scheduler = SchedulerConfig.from_dict(SCHEDULER_CONFIG)
    return CogView4Pipeline(transformer, vae, text_encoder, scheduler, device, dtype, f"random:{preset}", compile,
                            attention)
