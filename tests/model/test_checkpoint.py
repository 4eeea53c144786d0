"""Random-weight checkpoints: official layout, deterministic bytes, loadable by diffusers and by us."""
import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from cogview_ray.model.checkpoint import (
    PRESETS,
    make_checkpoint,
    random_tensor,
    vae_encoder_shapes,
    write_safetensors,
    write_transformer,
)
from cogview_ray.model.cogview3plus import CogView3PlusPipeline
from cogview_ray.model.cogview3plus.transformer import CogView3PlusTransformer, TransformerConfig
from cogview_ray.model.loading import (
    build_and_load,
    load_component_config,
    load_safetensors_state,
    read_model_index,
)
from cogview_ray.model.text_encoder import TextEncoder
from cogview_ray.model.vae import VAEConfig, VAEDecoder

pytestmark = pytest.mark.timeout(120)

EXPECTED_FILES = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/added_tokens.json",
    "tokenizer/special_tokens_map.json",
    "tokenizer/spiece.model",
    "tokenizer/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint("tiny", tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def diffusers_pipe(tiny):
    from diffusers import CogView3PlusPipeline

    return CogView3PlusPipeline.from_pretrained(str(tiny))


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_tiny_layout_matches_the_official_one(tiny):
    assert set(_files(tiny)) == EXPECTED_FILES
    index = json.loads((tiny / "model_index.json").read_text())
    assert index == {
        "_class_name": "CogView3PlusPipeline", "_diffusers_version": "0.31.0.dev0",
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "CogView3PlusTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    assert read_model_index(tiny, CogView3PlusPipeline.class_name, CogView3PlusPipeline.components) == index
    scheduler = load_component_config(tiny / "scheduler")
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["timestep_spacing"] == "trailing"
    assert scheduler["rescale_betas_zero_snr"] is True and scheduler["snr_shift_scale"] == 4.0
    vae = load_component_config(tiny / "vae")
    assert vae["_class_name"] == "AutoencoderKL" and vae["scaling_factor"] == 1.0
    assert (vae["use_quant_conv"], vae["use_post_quant_conv"], vae["mid_block_add_attention"]) == (False,) * 3
    assert load_component_config(tiny / "transformer")["_class_name"] == "CogView3PlusTransformer2DModel"


def test_same_seed_same_bytes_other_seed_other_weights(tiny, tmp_path):
    again = make_checkpoint("tiny", tmp_path / "again", seed=0)
    first, second = _files(tiny), _files(again)
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], name
    other = make_checkpoint("tiny", tmp_path / "other", seed=1)
    for name in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        assert _files(other)[name] != first[name], name


def test_diffusers_loads_every_weight_from_the_files(tiny, diffusers_pipe):
    for name, module, weights in [
        ("transformer", diffusers_pipe.transformer, "diffusion_pytorch_model.safetensors"),
        ("vae", diffusers_pipe.vae, "diffusion_pytorch_model.safetensors"),
        ("text_encoder", diffusers_pipe.text_encoder, "model.safetensors"),
    ]:
        on_disk = load_file(str(tiny / name / weights))
        state = module.state_dict()
        if name == "text_encoder":  # T5 stores the tied input embedding once
            assert "encoder.embed_tokens.weight" not in on_disk
            state.pop("encoder.embed_tokens.weight")
        assert state.keys() == on_disk.keys(), name
        for key, value in state.items():
            assert torch.equal(value, on_disk[key]), f"{name}: {key}"
    assert diffusers_pipe.vae_scale_factor == 8
    assert diffusers_pipe.scheduler.config.prediction_type == "v_prediction"
    assert len(diffusers_pipe.tokenizer) <= diffusers_pipe.text_encoder.config.vocab_size


def test_diffusers_renders_the_tiny_checkpoint(diffusers_pipe):
    out = diffusers_pipe("a red fox in the snow", num_inference_steps=2, height=64, width=64,
                         generator=torch.Generator().manual_seed(0), output_type="pt")
    images = out.images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all() and images.std() > 0


def test_our_loader_loads_the_tiny_checkpoint(tiny, diffusers_pipe):
    config = TransformerConfig.from_dict(load_component_config(tiny / "transformer"))
    transformer = build_and_load(lambda: CogView3PlusTransformer(config), load_safetensors_state(tiny / "transformer"),
                                 "cpu", torch.float32, "transformer")
    vae_config = VAEConfig.from_dict(load_component_config(tiny / "vae"))
    state = load_safetensors_state(tiny / "vae", drop_prefixes=VAEDecoder.unused_prefixes)
    vae = build_and_load(lambda: VAEDecoder(vae_config), state, "cpu", torch.float32, "vae")
    assert vae.downscale_factor == 8 and transformer.config.pos_embed_max_size * 2 * 8 >= 512
    text = TextEncoder.from_folders(tiny / "text_encoder", tiny / "tokenizer", "cpu", torch.float32)
    embeds, counts = text.encode(["a red fox"])
    assert embeds.shape == (1, 224, config.text_embed_dim) and counts[0] > 1
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(vae(z), diffusers_pipe.vae.decode(z).sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flags", [
    dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4),
    dict(block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=8, use_quant_conv=True,
         mid_block_add_attention=True),
])
def test_vae_encoder_shapes_match_diffusers(flags):
    from diffusers import AutoencoderKL

    n = len(flags["block_out_channels"])
    flags = {"down_block_types": ("DownEncoderBlock2D",) * n, "up_block_types": ("UpDecoderBlock2D",) * n,
             "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
             "mid_block_add_attention": False, **flags}
    reference = {k: tuple(v.shape) for k, v in AutoencoderKL(**flags).state_dict().items()
                 if k.startswith(("encoder.", "quant_conv."))}
    assert vae_encoder_shapes(VAEConfig.from_dict(flags)) == reference


def test_sharded_transformer_loads_in_diffusers_and_ours(tmp_path):
    from diffusers import CogView3PlusTransformer2DModel

    spec = dataclasses.replace(PRESETS["tiny"], shard_bytes=20_000)
    write_transformer(tmp_path, spec, seed=0)
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    state = load_safetensors_state(tmp_path)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    reference = CogView3PlusTransformer2DModel.from_pretrained(str(tmp_path)).state_dict()
    assert reference.keys() == state.keys()
    assert all(torch.equal(reference[k], state[k]) for k in state)


def test_write_safetensors_keeps_small_components_in_one_file(tmp_path):
    state = {"a": torch.zeros(4), "b": torch.ones(2, 2)}
    write_safetensors(state, tmp_path, "model", shard_bytes=1000)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_full_preset_has_the_real_sizes_without_writing():
    spec = PRESETS["full"]
    # serialised like diffusers, the configs have the byte sizes of the Hub files (facts §1)
    from cogview_ray.model.checkpoint import SCHEDULER_CONFIG, _diffusers_config

    def size(d):
        return len(json.dumps(d, indent=2, sort_keys=True) + "\n")

    assert size(_diffusers_config("CogView3PlusTransformer2DModel", spec.transformer)) == 391
    assert size(_diffusers_config("AutoencoderKL", spec.vae)) == 772
    assert size(SCHEDULER_CONFIG) == 482
    with torch.device("meta"):
        transformer = CogView3PlusTransformer(TransformerConfig.from_dict(spec.transformer)).state_dict()
        decoder = VAEDecoder(VAEConfig.from_dict(spec.vae)).state_dict()
    assert len(transformer) == 436 and sum(v.numel() for v in transformer.values()) == 2_848_836_672
    encoder = vae_encoder_shapes(VAEConfig.from_dict(spec.vae))
    assert sum(v.numel() for v in decoder.values()) + sum(math.prod(s) for s in encoder.values()) == 406_100_643
    assert spec.dtype == torch.bfloat16 and spec.text_encoder["vocab_size"] == 32128


@pytest.mark.parametrize("name", ["tiny", "small", "full"])
def test_presets_keep_the_shipped_vae_flags_and_consistent_sizes(name):
    spec = PRESETS[name]
    vae = VAEConfig.from_dict(spec.vae)
    assert (vae.use_quant_conv, vae.use_post_quant_conv, vae.mid_block_add_attention) == (False, False, False)
    assert vae.scaling_factor == 1.0 and vae.downscale_factor == 8
    assert all(c % vae.norm_num_groups == 0 for c in vae.block_out_channels)
    assert spec.transformer["in_channels"] == vae.latent_channels
    assert spec.transformer["text_embed_dim"] == spec.text_encoder["d_model"]
    assert spec.text_encoder["vocab_size"] >= 512 + 100  # SentencePiece pieces + extra ids
    if name != "tiny":
        assert spec.transformer["attention_head_dim"] == 40


def test_random_tensor_is_seeded_per_key():
    a = random_tensor("x.weight", (4, 8), 0, torch.float32)
    assert torch.equal(a, random_tensor("x.weight", (4, 8), 0, torch.float32))
    assert not torch.equal(a, random_tensor("y.weight", (4, 8), 0, torch.float32))
    assert not torch.equal(a, random_tensor("x.weight", (4, 8), 1, torch.float32))
    assert 0.2 < a.std() < 0.6  # 1/sqrt(fan_in)
    norm = random_tensor("norm1.weight", (64,), 0, torch.float32)
    assert (norm - 1).abs().max() < 0.1


def test_bad_preset_or_occupied_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Unknown checkpoint preset 'huge'"):
        make_checkpoint("huge", tmp_path / "x")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        make_checkpoint("tiny", tmp_path / "taken")
