"""CogView4 pipeline parity with diffusers' CogView4Pipeline on a tiny checkpoint it saved itself;
the family seam, limits, batch invariance and truncation."""
import inspect

import pytest
import torch

from cogview_ray.model import Pipeline, config_hash, load_pipeline
from cogview_ray.model.cogview4 import CogView4Pipeline

pytestmark = pytest.mark.timeout(600)

LONG_PROMPT = " ".join(["an old lighthouse on a rocky cliff"] * 12)  # ~100 tokens: past a limit of 32


@pytest.fixture(scope="module")
def checkpoint(cogview4_reference_checkpoint):
    return cogview4_reference_checkpoint


@pytest.fixture(scope="module")
def reference(checkpoint):
    from diffusers import CogView4Pipeline as Ref

    ref = Ref.from_pretrained(str(checkpoint), dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture(scope="module")
def ours(checkpoint):
    return load_pipeline(checkpoint, device="cpu", dtype="float32")


def ref_images(ref, prompts, seeds, h, w, steps=3, guidance=5.0, negative=None, max_len=1024):
    """The reference renders each prompt alone: its batch pads prompts to the longest one, which
    would make an image depend on its batch-mates."""
    negs = negative if isinstance(negative, list) else [negative] * len(prompts)
    out = [ref(prompt=p, negative_prompt=n, height=h, width=w, num_inference_steps=steps, guidance_scale=guidance,
               generator=[torch.Generator("cpu").manual_seed(s)], output_type="pt",
               max_sequence_length=max_len).images.float().cpu()
           for p, s, n in zip(prompts, seeds, negs)]
    return torch.cat(out)


def test_load_pipeline_selects_cogview4(ours, checkpoint):
    assert type(ours) is CogView4Pipeline and isinstance(ours, Pipeline)
    assert ours.identity == {"family": "CogView4Pipeline", "path": str(checkpoint),
                             "config_hash": config_hash(checkpoint), "compile": "none", "attention": "flash",
                             "dtype": "float32"}
    # 32 px steps (two 2x2 patches of 8x latents); pos_embed_max_size 32 patches -> 512 px; GLM's 128k
    # declared limit is capped at the reference's 1024
    assert (ours.size_multiple, ours.max_size_px, ours.max_sequence_length) == (32, 512, 1024)
    # float32 on CPU: oneDNN GEMMs and channels-last VAE convolutions, as CogView3-Plus (parity below)
    assert ours.transformer.transformer_blocks[0].ff.onednn and ours.vae.channels_last
    for name in ("from_pretrained", "generate", "warmup", "validate_size"):
        want = list(inspect.signature(getattr(Pipeline, name)).parameters)
        assert list(inspect.signature(getattr(CogView4Pipeline, name)).parameters) == want, name


CASES = [
    # prompts, seeds, h, w, steps, guidance, negative
    (["a red fox in snow"], [1], 96, 64, 3, 5.0, None),
    (["two boats at dawn", "a red fox sleeping in the snow under a pine tree at dawn"], [2, 3], 64, 160, 4, 5.0, ""),
    (["a lighthouse", "a cat"], [7, 8], 64, 96, 2, 1.0, None),
    (["a lighthouse"], [7], 160, 96, 5, 6.0, "blurry, low quality, watercolor"),
    (["一只红色的狐狸 in the snow", "a cat"], [9, 10], 64, 64, 3, 4.0, ["ugly", None]),
]


@pytest.mark.parametrize("prompts,seeds,h,w,steps,guidance,negative", CASES)
def test_images_match_reference_fp32(ours, reference, prompts, seeds, h, w, steps, guidance, negative):
    ref_neg = [n or "" for n in negative] if isinstance(negative, list) else negative
    expected = ref_images(reference, prompts, seeds, h, w, steps, guidance, ref_neg)
    got = ours.generate(prompts, seeds, h, w, num_inference_steps=steps, guidance_scale=guidance,
                        negative_prompt=negative)
    assert got.images.shape == (len(prompts), 3, h, w) and got.images.dtype == torch.float32
    assert (got.images - expected).abs().max().item() <= 1e-4
    assert got.finite == [True] * len(prompts) and got.truncated == [False] * len(prompts)
    assert set(got.timings_s) == {"text_encoding", "denoising", "decoding"}


def test_prompt_past_the_token_limit_matches_reference(ours, reference):
    expected = ref_images(reference, [LONG_PROMPT], [4], 64, 96, steps=2, max_len=32)
    got = ours.generate(["a cat", LONG_PROMPT], [5, 4], 64, 96, num_inference_steps=2, max_sequence_length=32)
    assert (got.images[1:] - expected).abs().max().item() <= 1e-4
    assert got.truncated == [False, True]


def test_images_match_reference_bf16(checkpoint):
    """bf16: the same operations in the same dtypes; tolerance one uint8 level (1/255)."""
    from diffusers import CogView4Pipeline as Ref

    ref = Ref.from_pretrained(str(checkpoint), dtype=torch.bfloat16)
    ref.set_progress_bar_config(disable=True)
    ours = CogView4Pipeline.from_pretrained(checkpoint, device="cpu", dtype="bfloat16")
    expected = ref_images(ref, ["a red fox in snow"], [1], 96, 64)
    got = ours.generate(["a red fox in snow"], [1], 96, 64, num_inference_steps=3)
    assert (got.images - expected).abs().max().item() <= 1 / 255


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_item_identical_alone_and_in_batch(ours, guidance):
    kw = dict(num_inference_steps=2, guidance_scale=guidance)
    alone = ours.generate(["two boats at dawn"], [2], 64, 96, **kw)
    batch = ours.generate(["a cat", "two boats at dawn", LONG_PROMPT, "a dog"], [5, 2, 6, 7], 64, 96, **kw)
    assert torch.equal(alone.images[0], batch.images[1])


def test_distinct_prompts_encoded_once(ours, monkeypatch):
    seen = []
    real = ours.text_encoder.encode
    monkeypatch.setattr(ours.text_encoder, "encode", lambda p, n: seen.append(p) or real(p, n))
    ours.generate(["a cat", "a cat", "a dog"], [1, 2, 3], 64, 64, num_inference_steps=1, negative_prompt=None)
    assert seen == ["a cat", "a dog", ""]


@pytest.mark.parametrize("h,w", [(80, 64), (64, 0), (64, -32), (544, 64), (48, 64)])
def test_bad_sizes_refused(ours, h, w):
    with pytest.raises(ValueError, match="multiple of 32 and at most 512 px"):
        ours.generate(["a cat"], [1], h, w, num_inference_steps=1)


def test_nonzero_vae_shift_factor_refused(checkpoint, tmp_path):
    import json
    import shutil

    from cogview_ray.model import CheckpointError

    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    cfg_path = copy / "vae" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "shift_factor": 0.1}))
    with pytest.raises(CheckpointError, match="shift_factor 0.1"):
        load_pipeline(copy, device="cpu", dtype="float32")
