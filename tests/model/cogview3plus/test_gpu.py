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
    assert (got - want).abs().max().item() <= 4 / 255


def test_compiled_matches_eager(pipes):
    eager, compiled = pipes
    a = eager.generate(["a red fox"], [3], 64, 64, num_inference_steps=4).images
    b = compiled.generate(["a red fox"], [3], 64, 64, num_inference_steps=4).images
    assert (a - b).abs().max().item() <= 4 / 255
