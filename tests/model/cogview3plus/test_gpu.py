"""On CUDA: bf16 parity with the reference, compiled equals eager, and seeds mean the same as on CPU."""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint):
    from cogview_ray.model.cogview3plus import CogView3PlusPipeline

    eager = CogView3PlusPipeline.from_pretrained(tiny_checkpoint, device="cuda")
    compiled = CogView3PlusPipeline.from_pretrained(tiny_checkpoint, device="cuda", compile="default")
    return eager, compiled


def test_default_dtype_on_cuda_is_bf16(pipes):
    assert pipes[0].dtype == torch.bfloat16


def test_noise_is_drawn_on_cpu(pipes):
    from cogview_ray.model.cogview3plus.sampling import get_noise

    pipe = pipes[0]
    noise = get_noise([5], pipe.latent_shape(64, 64), pipe.dtype, pipe.device)
    expected = torch.randn((16, 8, 8), generator=torch.Generator("cpu").manual_seed(5), dtype=torch.bfloat16)
    assert noise.device.type == "cuda" and torch.equal(noise[0].cpu(), expected)


def test_matches_reference_bf16(pipes, tiny_checkpoint):
    from diffusers import CogView3PlusPipeline as Reference

    ref = Reference.from_pretrained(tiny_checkpoint, torch_dtype=torch.bfloat16).to("cuda")
    gens = [torch.Generator("cpu").manual_seed(s) for s in (1, 2)]
    want = ref(prompt=["a red fox", "a boat"], height=64, width=96, num_inference_steps=4, generator=gens,
               output_type="pt").images.float().cpu()
    got = pipes[0].generate(["a red fox", "a boat"], [1, 2], 64, 96, num_inference_steps=4).images
    assert got.device.type == "cuda"  # left on the device for the worker's uint8 conversion
    assert (got.cpu() - want).abs().max().item() <= 4 / 255


def test_compiled_matches_eager(pipes):
    eager, compiled = pipes
    a = eager.generate(["a red fox"], [3], 64, 64, num_inference_steps=4).images
    b = compiled.generate(["a red fox"], [3], 64, 64, num_inference_steps=4).images
    assert (a - b).abs().max().item() <= 4 / 255


@pytest.mark.parametrize("mode", ["default", "max-autotune", "max-autotune-no-cudagraphs"])
def test_every_compile_mode_renders_batches_of_1_and_4(pipes, tiny_checkpoint, mode):
    from cogview_ray.model.cogview3plus import CogView3PlusPipeline

    eager = pipes[0]
    pipe = pipes[1] if mode == "default" else CogView3PlusPipeline.from_pretrained(
        tiny_checkpoint, device="cuda", compile=mode)
    prompts, seeds = ["a red fox", "a boat", "two cats", "a lighthouse"], [1, 2, 3, 4]
    kw = dict(height=64, width=64, num_inference_steps=3)
    one = pipe.generate(prompts[:1], seeds[:1], **kw).images
    four = pipe.generate(prompts, seeds, **kw).images
    # CUDA-graph replays must not overwrite earlier items, and an image never depends on its batch
    assert torch.equal(four[0], one[0])
    assert all(not torch.equal(four[i], four[i + 1]) for i in range(3))
    want = eager.generate(prompts, seeds, **kw).images
    assert (four - want).abs().max().item() <= 4 / 255


@pytest.mark.parametrize("backend", ["flash", "cudnn", "efficient", "math", "fa3"])
def test_every_attention_backend_renders_close_to_math(tiny_checkpoint, backend):
    from cogview_ray.model.attention import fa3_available
    from cogview_ray.model.cogview3plus import CogView3PlusPipeline

    if backend == "fa3" and not fa3_available():
        pytest.skip("flash_attn_interface is not installed")
    ref = CogView3PlusPipeline.from_pretrained(tiny_checkpoint, device="cuda", attention="math")
    try:
        pipe = CogView3PlusPipeline.from_pretrained(tiny_checkpoint, device="cuda", attention=backend)
        got = pipe.generate(["a red fox"], [1], 64, 64, num_inference_steps=3).images
    except RuntimeError as e:  # e.g. no cuDNN attention kernel on this GPU or build
        pytest.skip(f"{backend} does not run here: {e}")
    assert pipe.identity["attention"] == backend
    want = ref.generate(["a red fox"], [1], 64, 64, num_inference_steps=3).images
    assert (got - want).abs().max().item() <= 4 / 255


def test_auto_attention_times_and_records_a_cuda_backend(pipes):
    assert pipes[0].identity["attention"] in ("fa3", "cudnn", "flash", "efficient")
