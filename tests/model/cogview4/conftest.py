"""A tiny CogView4Pipeline built and saved by diffusers itself (the parity reference)."""
import pytest
import torch

# CogView4-6B's shipped scheduler settings
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.25, max_shift=0.75,
                 base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="linear")


def glm_tokenizer():
    """The packaged GLM tokenizer asset as transformers' fast tokenizer, configured like GLM-4's."""
    from importlib.resources import files

    from transformers import PreTrainedTokenizerFast

    path = files("cogview_ray") / "assets" / "glm_tokenizer" / "tokenizer.json"
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   padding_side="left", model_max_length=128000)


def save_reference_checkpoint(out_dir, head_dim=8):
    from diffusers import AutoencoderKL, CogView4Pipeline as Ref, CogView4Transformer2DModel
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    tokenizer = glm_tokenizer()
    torch.manual_seed(0)
    text_encoder = GlmModel(GlmConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=8, partial_rotary_factor=0.5, attention_bias=True,
                                      pad_token_id=tokenizer.pad_token_id))
    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=head_dim,
        num_attention_heads=2, text_embed_dim=32, time_embed_dim=16, condition_dim=4, pos_embed_max_size=32,
        sample_size=8, rope_axes_dim=(16, 16))
    vae = AutoencoderKL(block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
                        mid_block_add_attention=False, scaling_factor=1.0, shift_factor=0.0)
    with torch.no_grad():
        # diffusers zero-initialises some output layers; random values make every weight matter
        for p in list(transformer.parameters()) + list(vae.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
    pipe = Ref(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
               scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER))
    pipe.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="session")
def cogview4_reference_checkpoint(tmp_path_factory):
    return save_reference_checkpoint(tmp_path_factory.mktemp("cogview4-ref") / "ckpt")
