"""make-checkpoint presets for CogView4: the official diffusers layout, loadable by our pipeline
and by diffusers itself, rendering the same image."""
import json

import pytest
import torch

from cogview_ray.model import load_pipeline
from cogview_ray.model.checkpoint import make_checkpoint
from cogview_ray.model.cogview4 import CogView4Pipeline
from cogview_ray.model.cogview4.checkpoint import PRESETS
from cogview_ray.model.cogview4.transformer import CogView4Transformer, TransformerConfig

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Written through the command line: `cogview-ray make-checkpoint --preset tiny-cogview4 OUT`."""
    from cogview_ray.cli import main

    out = tmp_path_factory.mktemp("cv4") / "tiny"
    assert main(["make-checkpoint", "--preset", "tiny-cogview4", str(out)]) == 0
    return out


def test_tiny_preset_writes_the_official_layout(tiny):
    index = json.loads((tiny / "model_index.json").read_text())
    assert index["_class_name"] == "CogView4Pipeline"
    assert index["text_encoder"] == ["transformers", "GlmModel"]
    assert index["transformer"] == ["diffusers", "CogView4Transformer2DModel"]
    for name in ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/tokenizer.json",
                 "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json"):
        assert (tiny / name).is_file(), name


def test_tiny_preset_renders_through_our_pipeline_as_diffusers_does(tiny):
    from diffusers import CogView4Pipeline as Ref

    ours = load_pipeline(tiny, device="cpu", dtype="float32")
    assert type(ours) is CogView4Pipeline and ours.max_size_px == 1024
    got = ours.generate(["a red fox in snow"], [3], 96, 64, num_inference_steps=2)
    assert got.finite == [True] and got.images.std().item() > 0.01  # not a constant image
    ref = Ref.from_pretrained(str(tiny), dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    want = ref(prompt="a red fox in snow", height=96, width=64, num_inference_steps=2,
               generator=[torch.Generator().manual_seed(3)], output_type="pt").images.float()
    assert (got.images - want).abs().max().item() <= 1e-4


def test_same_seed_same_bytes(tiny, tmp_path):
    again = make_checkpoint("tiny-cogview4", tmp_path / "again")
    for name in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (again / name).read_bytes() == (tiny / name).read_bytes(), name


def test_full_preset_has_the_real_sizes():
    """Counted on the meta device (nothing written): CogView4-6B's ~6.4B transformer parameters."""
    cfg = TransformerConfig.from_dict(PRESETS["full-cogview4"].transformer)
    with torch.device("meta"):
        n = sum(p.numel() for p in CogView4Transformer(cfg).parameters())
    assert cfg.inner_dim == 4096 and 6.0e9 < n < 6.6e9
    assert PRESETS["full-cogview4"].text_encoder["hidden_size"] == cfg.text_embed_dim
