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


def test_fused_qkv_and_onednn_gemms_stay_within_parity(models, cogview4_reference_checkpoint):
    """The fused projection keeps the official keys; oneDNN GEMMs (float32 CPU) stay within 1e-5."""
    ref, _ = models
    folder = cogview4_reference_checkpoint / "transformer"
    cfg = TransformerConfig.from_dict(loading.load_component_config(folder))
    fast = loading.build_and_load(lambda: CogView4Transformer(cfg), loading.load_safetensors_state(folder),
                                  "cpu", torch.float32, "transformer")
    assert set(fast.state_dict()) == set(ref.state_dict())
    assert fast.use_onednn() and fast.transformer_blocks[0].attn1.onednn and fast.transformer_blocks[0].ff.onednn
    fast.set_attention("flash")
    g = torch.Generator().manual_seed(7)
    x, text = torch.randn(2, 4, 12, 8, generator=g), torch.randn(2, 32, 32, generator=g)
    t, size, crop = torch.tensor([667.0, 20.0]), torch.tensor([[96.0, 64.0]] * 2), torch.zeros(2, 2)
    with torch.no_grad():
        want = ref(x, text, t, size, size, crop, return_dict=False)[0]
        got = fast(x, text, t, size, size, crop)
    assert (got - want).abs().max().item() <= 1e-5
    assert not fast.to(torch.bfloat16).use_onednn()


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
