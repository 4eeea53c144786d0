"""Our CogView4 transformer loads diffusers' weights by name and computes the same outputs."""
import pytest
import torch

from cogview_ray.model import CheckpointError, loading
from cogview_ray.model.cogview4.transformer import CogView4Transformer, TransformerConfig, rope_tables

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def models(cogview4_reference_checkpoint):
    from diffusers import CogView4Transformer2DModel

    folder = cogview4_reference_checkpoint / "transformer"
    ref = CogView4Transformer2DModel.from_pretrained(str(folder)).eval()
    cfg = TransformerConfig.from_dict(loading.load_component_config(folder))
    ours = loading.build_and_load(lambda: CogView4Transformer(cfg), loading.load_safetensors_state(folder),
                                  "cpu", torch.float32, "transformer")
    ours.set_attention("flash")
    return ref, ours


@pytest.mark.parametrize("hl,wl,lt", [(8, 8, 16), (12, 8, 32), (8, 20, 16), (4, 6, 48)])
def test_forward_matches_reference(models, hl, wl, lt):
    ref, ours = models
    g = torch.Generator().manual_seed(hl * 100 + wl)
    x, text = torch.randn(1, 4, hl, wl, generator=g), torch.randn(1, lt, 32, generator=g)
    t, size, crop = torch.tensor([667.0]), torch.tensor([[hl * 8.0, wl * 8.0]]), torch.zeros(1, 2)
    with torch.no_grad():
        want = ref(x, text, t, size, size, crop, return_dict=False)[0]
        got = ours(x, text, t, size, size, crop)
    assert got.shape == (1, 4, hl, wl)
    assert (got - want).abs().max().item() <= 1e-5


def test_rope_matches_reference():
    from diffusers.models.transformers.transformer_cogview4 import CogView4RotaryPosEmbed

    ref = CogView4RotaryPosEmbed(128, 2, (256, 256))(torch.zeros(1, 16, 96, 40))
    got = rope_tables(128, (256, 256), 48, 20, "cpu")
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_config_refuses_unknown_keys_and_bad_head_dim():
    with pytest.raises(CheckpointError, match="unknown key"):
        TransformerConfig.from_dict({"num_layers": 2, "pos_embed_type": "x"})
    with pytest.raises(ValueError, match="multiple of 4"):
        TransformerConfig.from_dict({"attention_head_dim": 10})
