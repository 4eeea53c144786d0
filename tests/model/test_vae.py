"""VAE decoder parity with diffusers' AutoencoderKL.decode for the shipped flags and the variants."""
import pytest
import torch

from cogview_ray.model.vae import VAEConfig, VAEDecoder

pytestmark = pytest.mark.timeout(300)

SHIPPED_FLAGS = dict(use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
                     scaling_factor=1.0, shift_factor=None)
VARIANT_FLAGS = dict(use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
                     scaling_factor=0.18215, shift_factor=0.1)


def _reference(flags: dict, channels=(32, 64), layers=1, latent=4):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    n = len(channels)
    ref = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=channels,
                        layers_per_block=layers, latent_channels=latent, norm_num_groups=8,
                        sample_size=32, **flags).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return ref


def _ours(ref) -> VAEDecoder:
    ours = VAEDecoder(VAEConfig.from_dict(dict(ref.config))).eval()
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith(VAEDecoder.unused_prefixes)}
    ours.load_state_dict(state, strict=True)
    return ours


@pytest.mark.parametrize("flags", [SHIPPED_FLAGS, VARIANT_FLAGS], ids=["shipped", "variant"])
@pytest.mark.parametrize("channels,layers", [((32, 64), 1), ((16, 16, 32, 32), 2)])
def test_decode_matches_reference(flags, channels, layers):
    ref = _reference(flags, channels, layers)
    ours = _ours(ref)
    z = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(1))
    cfg = ref.config
    with torch.no_grad():
        zz = z / cfg.scaling_factor
        if cfg.shift_factor is not None:
            zz = zz + cfg.shift_factor
        expected = ref.decode(zz).sample
        got = ours(z)
    f = 2 ** (len(channels) - 1)
    assert got.shape == (2, 3, 6 * f, 8 * f) and ours.downscale_factor == f
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_decode_bf16_matches_reference():
    ref = _reference(SHIPPED_FLAGS, (16, 16, 32, 32), 2)
    ours = _ours(ref).to(torch.bfloat16)
    ref = ref.to(torch.bfloat16)
    z = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours(z), ref.decode(z).sample)


def test_encoder_keys_are_not_part_of_decoder():
    ref = _reference(VARIANT_FLAGS)
    ours = VAEDecoder(VAEConfig.from_dict(dict(ref.config)))
    ref_keys = set(ref.state_dict())
    ours_keys = set(ours.state_dict())
    assert ours_keys <= ref_keys
    assert ref_keys - ours_keys == {k for k in ref_keys if k.startswith(VAEDecoder.unused_prefixes)}


def test_unknown_config_key_is_refused():
    with pytest.raises(ValueError, match="vae/config.json has unknown key"):
        VAEConfig.from_dict({"block_out_channels": [32], "bogus_flag": 1})
