"""Checkpoint loading: diffusers-saved folders load through our loader; bad folders are refused clearly."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from cogview_ray.model.cogview3plus import CogView3PlusPipeline
from cogview_ray.model.cogview3plus.transformer import CogView3PlusTransformer, TransformerConfig
from cogview_ray.model.loading import (
    CheckpointError,
    build_and_load,
    check_weights_format,
    load_component_config,
    load_safetensors_state,
    read_model_index,
    resolve_dtype,
)
from cogview_ray.model.vae import VAEConfig, VAEDecoder

pytestmark = pytest.mark.timeout(120)

# diffusers' own tiny test transformer (facts §9), with two layers
TINY_TRANSFORMER = dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=2,
                        out_channels=4, text_embed_dim=8, time_embed_dim=8, condition_dim=2, pos_embed_max_size=8,
                        sample_size=8)
# what CogView3-Plus asks read_model_index to check
FAMILY = (CogView3PlusPipeline.class_name, CogView3PlusPipeline.components)
SHIPPED_VAE_FLAGS = dict(use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
                         scaling_factor=1.0)


def _jitter(model: nn.Module, seed: int) -> nn.Module:
    # zero-initialised weights (adaLN, biases) would hide wrongly mapped keys
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def reference_transformer():
    from diffusers import CogView3PlusTransformer2DModel

    torch.manual_seed(0)
    return _jitter(CogView3PlusTransformer2DModel(**TINY_TRANSFORMER), 1)


@pytest.fixture(scope="module")
def transformer_dir(tmp_path_factory, reference_transformer):
    path = tmp_path_factory.mktemp("transformer")
    reference_transformer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sharded_transformer_dir(tmp_path_factory, reference_transformer):
    path = tmp_path_factory.mktemp("transformer_sharded")
    reference_transformer.save_pretrained(path, max_shard_size="4KB")
    return path


@pytest.fixture(scope="module")
def reference_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return _jitter(AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                                 layers_per_block=1, sample_size=32, **SHIPPED_VAE_FLAGS), 2)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory, reference_vae):
    path = tmp_path_factory.mktemp("vae")
    reference_vae.save_pretrained(path)
    return path


def _load_transformer(folder, dtype=torch.float32):
    config = TransformerConfig.from_dict(load_component_config(folder))
    state = load_safetensors_state(folder)
    return build_and_load(lambda: CogView3PlusTransformer(config), state, "cpu", dtype, "transformer")


def _transformer_inputs():
    gen = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(2, 4, 8, 8, generator=gen),
        encoder_hidden_states=torch.randn(2, 8, 8, generator=gen),
        timestep=torch.randint(0, 1000, (2,), generator=gen),
        original_size=torch.tensor([[64, 64]] * 2),
        target_size=torch.tensor([[64, 64]] * 2),
        crop_coords=torch.tensor([[0, 0]] * 2),
    )


# ---------------------------------------------------------------------------------------------
# diffusers-saved folders


def test_diffusers_transformer_folder_loads_and_matches(transformer_dir, reference_transformer):
    ours = _load_transformer(transformer_dir)
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    expected = reference_transformer.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, expected[key]), key
    # the non-persistent position table was rebuilt by init_buffers, not left on meta
    pos = ours.patch_embed.pos_embed
    assert pos.device.type == "cpu" and pos.dtype == torch.float32 and pos.abs().sum() > 0
    inputs = _transformer_inputs()
    with torch.no_grad():
        got = ours(**inputs)
        want = reference_transformer(**inputs).sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sharded_folder_loads_same_tensors(transformer_dir, sharded_transformer_dir):
    index = list(sharded_transformer_dir.glob("*.safetensors.index.json"))
    shards = list(sharded_transformer_dir.glob("*-of-*.safetensors"))
    assert len(index) == 1 and len(shards) > 1
    single = load_safetensors_state(transformer_dir)
    sharded = load_safetensors_state(sharded_transformer_dir)
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)
    ours = _load_transformer(sharded_transformer_dir)
    assert torch.equal(ours.proj_out.weight, single["proj_out.weight"])


def test_build_and_load_casts_to_dtype(transformer_dir):
    ours = _load_transformer(transformer_dir, torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours.patch_embed.pos_embed.dtype == torch.float32  # recomputed, as the reference keeps it


def test_diffusers_vae_decoder_loads_and_matches(vae_dir, reference_vae):
    config = VAEConfig.from_dict(load_component_config(vae_dir))
    state = load_safetensors_state(vae_dir, drop_prefixes=VAEDecoder.unused_prefixes)
    assert state and not any(k.startswith("encoder.") for k in state)
    ours = build_and_load(lambda: VAEDecoder(config), state, "cpu", torch.float32, "vae")
    assert state == {}  # consumed while loading
    z = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(z), reference_vae.decode(z).sample, atol=1e-5, rtol=1e-5)


def test_integer_buffers_keep_their_dtype():
    class WithCounter(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))

    state = {"lin.weight": torch.ones(2, 2), "lin.bias": torch.ones(2), "steps": torch.arange(3)}
    module = build_and_load(WithCounter, state, "cpu", torch.bfloat16, "counter")
    assert module.lin.weight.dtype == torch.bfloat16 and module.steps.dtype == torch.int64
    assert module.steps.tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# refusals


def _tiny_state(reference_transformer):
    return {k: v.clone() for k, v in reference_transformer.state_dict().items()}


def _build(state):
    config = TransformerConfig(**TINY_TRANSFORMER)
    return build_and_load(lambda: CogView3PlusTransformer(config), state, "cpu", torch.float32, "transformer")


def test_wrong_weight_shape_names_component_key_and_shapes(reference_transformer):
    state = _tiny_state(reference_transformer)
    state["proj_out.weight"] = torch.zeros(16, 9)
    with pytest.raises(CheckpointError) as err:
        _build(state)
    msg = str(err.value)
    assert "transformer" in msg and "'proj_out.weight'" in msg and "[16, 9]" in msg and "[16, 8]" in msg


def test_missing_and_unexpected_keys_are_named(reference_transformer):
    state = _tiny_state(reference_transformer)
    del state["norm_out.linear.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing weight\(s\) 'norm_out.linear.bias'") as err:
        _build(state)
    assert "unexpected weight(s) 'extra.weight'" in str(err.value)


def test_buffer_left_on_meta_is_refused():
    class NoInit(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.ones(4), persistent=False)

    with pytest.raises(CheckpointError, match="'table'.*init_buffers"):
        build_and_load(NoInit, {}, "cpu", torch.float32, "toy")


def test_pickle_only_folder_is_refused_without_opening(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.bin.*pickle checkpoints can execute code"):
        load_safetensors_state(tmp_path)
    with pytest.raises(CheckpointError, match="pickle"):
        check_weights_format(tmp_path)


def test_folder_without_weights_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_safetensors_state(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_safetensors_state(tmp_path / "absent")


def test_index_naming_a_missing_shard_is_refused(tmp_path):
    save_file({"a": torch.zeros(1)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_safetensors_state(tmp_path)


def test_ambiguous_weight_files_are_refused_and_standard_name_wins(tmp_path):
    save_file({"a": torch.zeros(1)}, str(tmp_path / "one.safetensors"))
    save_file({"b": torch.zeros(1)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(CheckpointError, match="one.safetensors, two.safetensors"):
        load_safetensors_state(tmp_path)
    save_file({"c": torch.ones(1)}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert list(load_safetensors_state(tmp_path)) == ["c"]


def _write_index(root, **changes):
    index = {"_class_name": "CogView3PlusPipeline", "_diffusers_version": "0.31.0.dev0",
             "scheduler": ["diffusers", "CogVideoXDDIMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "CogView3PlusTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    index.update(changes)
    index = {k: v for k, v in index.items() if v is not None}
    (root / "model_index.json").write_text(json.dumps(index))
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        (root / name).mkdir(exist_ok=True)
    return index


def test_read_model_index_accepts_complete_folder(tmp_path):
    index = _write_index(tmp_path)
    assert read_model_index(tmp_path, *FAMILY) == index


def test_missing_component_is_named(tmp_path):
    _write_index(tmp_path, vae=None)
    with pytest.raises(CheckpointError, match="lists no 'vae' component"):
        read_model_index(tmp_path, *FAMILY)
    _write_index(tmp_path)
    (tmp_path / "scheduler").rmdir()
    with pytest.raises(CheckpointError, match="no 'scheduler' folder"):
        read_model_index(tmp_path, *FAMILY)


def test_not_a_checkpoint_or_wrong_pipeline_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no model_index.json"):
        read_model_index(tmp_path, *FAMILY)
    _write_index(tmp_path, _class_name="CogView4Pipeline")
    with pytest.raises(CheckpointError, match="CogView4Pipeline"):
        read_model_index(tmp_path, *FAMILY)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_model_index(tmp_path, *FAMILY)


def test_load_component_config_reads_model_and_scheduler_configs(tmp_path, transformer_dir):
    assert load_component_config(transformer_dir)["num_layers"] == 2
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    assert load_component_config(tmp_path) == {"prediction_type": "v_prediction"}
    with pytest.raises(CheckpointError, match="neither config.json nor scheduler_config.json"):
        load_component_config(tmp_path / "absent")


# ---------------------------------------------------------------------------------------------
# dtype


@pytest.mark.parametrize("name,device,expected", [
    ("auto", "cpu", torch.float32),
    ("auto", "cuda", torch.bfloat16),
    ("auto", torch.device("cuda", 1), torch.bfloat16),
    ("bfloat16", "cpu", torch.bfloat16),
    ("float32", "cuda", torch.float32),
    (torch.bfloat16, "cpu", torch.bfloat16),
])
def test_resolve_dtype(name, device, expected):
    assert resolve_dtype(name, device) == expected


@pytest.mark.parametrize("name", ["float16", "fp16", torch.float16])
def test_float16_is_refused_with_reason(name):
    with pytest.raises(CheckpointError, match="overflows in float16 and gives black images"):
        resolve_dtype(name, "cuda")


def test_unknown_dtype_is_refused():
    with pytest.raises(CheckpointError, match="Unknown dtype 'int8'"):
        resolve_dtype("int8", "cpu")


# ---------------------------------------------------------------------------------------------
# straight to the device, one copy in host memory

# Runs in a fresh process, so its peak RSS is the load's: a warm-up load of `tiny` pays the lazy
# imports, then VmHWM is reset (Linux >= 4.0) and `small` is loaded.
_RSS_SCRIPT = """
import json, sys
from pathlib import Path
from cogview_ray.model.cogview3plus import CogView3PlusPipeline
def rss():
    f = dict(l.split(':', 1) for l in Path('/proc/self/status').read_text().splitlines() if ':' in l)
    return int(f['VmRSS'].split()[0]) * 1024, int(f['VmHWM'].split()[0]) * 1024
CogView3PlusPipeline.from_pretrained(sys.argv[1], device='cpu', dtype='float32')
before, _ = rss()
Path('/proc/self/clear_refs').write_text('5')
pipe = CogView3PlusPipeline.from_pretrained(sys.argv[2], device='cpu', dtype='float32')
after, peak = rss()
print(json.dumps({'before': before, 'after': after, 'peak': peak}))
"""


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    from cogview_ray.model.checkpoint import make_checkpoint

    return make_checkpoint("small", tmp_path_factory.mktemp("small") / "ckpt")


def test_pipeline_loads_every_component_off_meta_with_shared_storage(small_checkpoint):
    pipe = CogView3PlusPipeline.from_pretrained(small_checkpoint, device="cpu", dtype="bfloat16")
    t5 = pipe.text_encoder.model
    for name, module in (("transformer", pipe.transformer), ("vae", pipe.vae), ("text_encoder", t5)):
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        assert not [n for n, t in tensors.items() if t.is_meta], name
        assert {t.device.type for t in tensors.values()} == {"cpu"}, name
        assert {t.dtype for n, t in tensors.items() if n != "patch_embed.pos_embed"} == {torch.bfloat16}, name
    # T5's token embedding is the shared table, held once
    assert t5.encoder.embed_tokens.weight.data_ptr() == t5.shared.weight.data_ptr()
    # q, k, v are views into the fused projection, which holds the checkpoint's values
    attn = pipe.transformer.transformer_blocks[0].attn1
    d = attn.heads * attn.head_dim
    assert attn.to_k.weight.data_ptr() == attn.qkv_weight[d:].data_ptr()
    disk = load_safetensors_state(small_checkpoint / "transformer")
    assert torch.equal(attn.qkv_weight[d:2 * d], disk["transformer_blocks.0.attn1.to_k.weight"].bfloat16())
    assert set(pipe.transformer.state_dict()) == set(disk)


def test_pipeline_load_holds_one_copy_of_the_weights(tiny_checkpoint, small_checkpoint):
    import json
    import subprocess
    import sys

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset the peak RSS")
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tiny_checkpoint), str(small_checkpoint)],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rss = json.loads(out.strip().splitlines()[-1])
    weights = sum(p.stat().st_size for c in ("transformer", "vae", "text_encoder")
                  for p in (small_checkpoint / c).glob("*.safetensors"))
    cfg = json.loads((small_checkpoint / "transformer" / "config.json").read_text())
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    table = cfg["pos_embed_max_size"] ** 2 * inner * 4  # the float32 position table, computed at load
    # float32 on disk and in memory: one copy is `weights` (less the unread VAE encoder) + the table;
    # a loader holding a second copy would grow by about 2x
    growth = rss["peak"] - rss["before"]
    assert growth <= 1.3 * (weights + table), (growth, weights, table)
    assert rss["after"] - rss["before"] >= 0.5 * weights  # the measurement saw the load at all
