"""CogView4 under torch.compile(fullgraph=True): no graph breaks, one graph per (size, text length)
with text lengths in steps of 16, and the compiled images equal eager ones. Dynamo's "eager"
backend keeps it fast on CPU; tracing (where graph breaks show) is the same as inductor's."""
import pytest
import torch

from cogview_ray.model.checkpoint import make_checkpoint
from cogview_ray.model.cogview4 import CogView4Pipeline

pytestmark = pytest.mark.timeout(600)


def eager_backend_compiler(module, mode):
    return torch.compile(module, fullgraph=True, dynamic=False, backend="eager")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint("tiny-cogview4", tmp_path_factory.mktemp("cv4c") / "tiny")


def test_compiled_graphs_are_bounded_by_text_length_buckets(tiny):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = CogView4Pipeline.from_pretrained(tiny, device="cpu", dtype="float32")
    compiled = CogView4Pipeline(eager.transformer, eager.vae, eager.text_encoder, eager.scheduler_config,
                                eager.device, eager.dtype, str(tiny), "default", "flash", eager_backend_compiler)
    # prompts of 1..40 repeats: token counts spread over several 16-token buckets
    prompts = [" ".join(["red fox"] * k) for k in (1, 2, 6, 11, 40)]
    lengths = {compiled.text_encoder.tokenize(p, 1024)[0].shape[1] for p in prompts + [""]}
    got = compiled.generate(prompts, list(range(len(prompts))), 64, 96, num_inference_steps=1)
    # transformer: one graph per text length (the empty negative included); VAE: one
    assert counters["stats"]["unique_graphs"] == len(lengths) + 1
    assert compiled._denoise.eager_calls == 0 and len(lengths) > 3
    want = eager.generate(prompts, list(range(len(prompts))), 64, 96, num_inference_steps=1)
    assert torch.equal(got.images, want.images)
