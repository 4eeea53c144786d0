"""The compiled pipeline (fullgraph, static shapes) on the tiny preset matches eager and never recompiles."""
import pytest
import torch

from cogview_ray.model.cogview3plus import CogView3PlusPipeline

pytestmark = pytest.mark.timeout(900)


def test_compiled_generate_matches_eager_without_recompiles(tiny_checkpoint):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    eager = CogView3PlusPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32")
    compiled = CogView3PlusPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32",
                                                    compile="default")
    kw = dict(height=64, width=96, num_inference_steps=2, max_sequence_length=32)
    compiled.warmup(64, 96, batch_size=1, max_sequence_length=32)
    graphs_after_warmup = counters["stats"]["unique_graphs"]
    assert graphs_after_warmup == 2  # transformer and VAE decoder, one whole graph each

    prompts, seeds = ["a red fox in snow", "a lighthouse", "two boats"], [1, 2, 3]
    got = compiled.generate(prompts, seeds, **kw)
    # a batch of three after a warm-up with one: same per-item shapes, no new graph
    assert counters["stats"]["unique_graphs"] == graphs_after_warmup
    want = eager.generate(prompts, seeds, **kw)
    torch.testing.assert_close(got.images, want.images, atol=1e-4, rtol=0)
