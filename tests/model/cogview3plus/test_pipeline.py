"""Full-pipeline parity with diffusers' CogView3PlusPipeline on a tiny checkpoint it saved itself."""
import numpy as np
import pytest
import torch

from cogview_ray.model import to_uint8_hwc
from cogview_ray.model.cogview3plus import CogView3PlusPipeline

pytestmark = pytest.mark.timeout(600)

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
                 timestep_spacing="trailing", rescale_betas_zero_snr=True, snr_shift_scale=4.0)
MAX_LEN = 16


def save_reference_checkpoint(out_dir, vae_flags=None):
    """A tiny CogView3PlusPipeline built and saved by diffusers itself."""
    from importlib.resources import files

    from diffusers import AutoencoderKL, CogVideoXDDIMScheduler, CogView3PlusPipeline as Ref
    from diffusers import CogView3PlusTransformer2DModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    spiece = files("cogview_ray") / "assets" / "tokenizer" / "spiece.model"
    tokenizer = T5Tokenizer(vocab_file=str(spiece), extra_ids=100)
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                           num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0))
    transformer = CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2, out_channels=4,
        text_embed_dim=32, time_embed_dim=16, condition_dim=4, pos_embed_max_size=16, sample_size=8)
    flags = vae_flags or dict(use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
                              scaling_factor=1.0)
    vae = AutoencoderKL(block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, sample_size=64, **flags)
    with torch.no_grad():
        for p in list(transformer.parameters()) + list(vae.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
    pipe = Ref(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
               scheduler=CogVideoXDDIMScheduler(**SCHEDULER))
    pipe.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_reference_checkpoint(tmp_path_factory.mktemp("ref") / "ckpt")


@pytest.fixture(scope="module")
def reference(checkpoint):
    from diffusers import CogView3PlusPipeline as Ref

    return Ref.from_pretrained(str(checkpoint), torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def ours(checkpoint):
    return CogView3PlusPipeline.from_pretrained(checkpoint, device="cpu", dtype="float32")


def _ref_images(ref, prompts, seeds, h, w, steps=3, guidance=5.0, negative=None, dtype=torch.float32):
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = ref(prompt=prompts, negative_prompt=negative, height=h, width=w, num_inference_steps=steps,
              guidance_scale=guidance, generator=gens, output_type="pt", max_sequence_length=MAX_LEN)
    return out.images.float().cpu()


CASES = [
    # prompts, seeds, h, w, guidance, negative
    (["a red fox in snow"], [1], 64, 64, 5.0, None),
    (["a red fox in snow", "two boats at dawn"], [1, 2], 64, 128, 5.0, None),
    (["a lighthouse", "a cat", "a dog"], [7, 8, 9], 128, 64, 1.0, None),
    (["a lighthouse", "a cat"], [7, 8], 64, 64, 6.0, ""),
    (["a lighthouse", "a cat"], [7, 8], 64, 64, 6.0, "blurry, low quality"),
]


@pytest.mark.parametrize("prompts,seeds,h,w,guidance,negative", CASES)
def test_images_match_reference_fp32(ours, reference, prompts, seeds, h, w, guidance, negative):
    expected = _ref_images(reference, prompts, seeds, h, w, guidance=guidance, negative=negative)
    got = ours.generate(prompts, seeds, h, w, num_inference_steps=3, guidance_scale=guidance,
                        negative_prompt=negative, max_sequence_length=MAX_LEN)
    assert got.images.shape == (len(prompts), 3, h, w) and got.images.dtype == torch.float32
    assert (got.images - expected).abs().max().item() <= 1e-4
    assert got.finite == [True] * len(prompts)
    assert set(got.timings_s) == {"text_encoding", "denoising", "decoding"}


def test_thirty_steps_match_reference(ours, reference):
    expected = _ref_images(reference, ["a quiet harbour"], [3], 64, 64, steps=30)
    got = ours.generate(["a quiet harbour"], [3], 64, 64, num_inference_steps=30, max_sequence_length=MAX_LEN)
    assert (got.images - expected).abs().max().item() <= 1e-4


def test_images_match_reference_bf16(checkpoint):
    """bf16: same operations, same order; tolerance 1/255 (one uint8 level) on [0, 1] images."""
    from diffusers import CogView3PlusPipeline as Ref

    ref = Ref.from_pretrained(str(checkpoint), torch_dtype=torch.bfloat16)
    ours = CogView3PlusPipeline.from_pretrained(checkpoint, device="cpu", dtype="bfloat16")
    prompts, seeds = ["a red fox in snow", "two boats at dawn"], [1, 2]
    expected = _ref_images(ref, prompts, seeds, 64, 64)
    got = ours.generate(prompts, seeds, 64, 64, num_inference_steps=3, max_sequence_length=MAX_LEN)
    assert (got.images - expected).abs().max().item() <= 1 / 255


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_item_identical_alone_and_in_batch(ours, guidance):
    kw = dict(num_inference_steps=2, guidance_scale=guidance, max_sequence_length=MAX_LEN)
    alone = ours.generate(["two boats at dawn"], [2], 64, 128, **kw)
    batch = ours.generate(["a cat", "two boats at dawn", "a dog", "a cow"], [5, 2, 6, 7], 64, 128, **kw)
    # the float images themselves, not only their uint8 rounding
    assert torch.equal(alone.images[0], batch.images[1])


def test_same_prompt_twice_in_batch_encoded_once(ours, monkeypatch):
    seen = []
    real = ours.text_encoder.encode
    monkeypatch.setattr(ours.text_encoder, "encode", lambda p, **k: seen.append(list(p)) or real(p, **k))
    ours.generate(["a cat", "a cat", "a dog"], [1, 2, 3], 64, 64, num_inference_steps=1, max_sequence_length=MAX_LEN)
    assert seen == [["a cat"], ["a dog"]]


def test_truncation_is_reported(ours):
    long_prompt = " ".join(["lighthouse"] * 40)
    got = ours.generate(["a cat", long_prompt], [1, 2], 64, 64, num_inference_steps=1, max_sequence_length=MAX_LEN)
    assert got.truncated == [False, True]


@pytest.mark.parametrize("h,w", [(60, 64), (64, 0), (64, -16), (64, 4096), (72, 64)])
def test_bad_sizes_refused(ours, h, w):
    with pytest.raises(ValueError, match="multiple of 16"):
        ours.generate(["a cat"], [1], h, w, num_inference_steps=1)


def test_to_uint8_rounds_like_reference(ours, reference):
    gens = [torch.Generator("cpu").manual_seed(4)]
    pil = reference(prompt="a cat", height=64, width=64, num_inference_steps=2, generator=gens,
                    max_sequence_length=MAX_LEN).images[0]
    got = ours.generate(["a cat"], [4], 64, 64, num_inference_steps=2, max_sequence_length=MAX_LEN)
    diff = np.abs(np.asarray(pil).astype(int) - to_uint8_hwc(got.images)[0].astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
