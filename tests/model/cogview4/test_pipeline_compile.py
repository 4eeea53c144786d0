"""CogView4 under torch.compile(fullgraph=True): no graph breaks, one transformer graph per image
size serving every 16-token text length (dynamic), nothing recompiles after the warm-up, and the
compiled images match eager ones (within 1e-4: eager runs oneDNN GEMMs). Dynamo's "eager" backend
keeps it fast on CPU; tracing (where graph breaks and recompiles show) is the same as inductor's."""
import pytest
import torch

from cogview_ray.model.checkpoint import make_checkpoint
from cogview_ray.model.cogview4 import CogView4Pipeline

pytestmark = pytest.mark.timeout(600)

# 1..200 repeats: token counts over many 16-token buckets, the last one past the 1024 limit
PROMPTS = [" ".join(["red fox"] * k) for k in (1, 2, 6, 11, 40, 90, 200, 700)]


def eager_backend_compiler(module, mode):
    return torch.compile(module, fullgraph=True, dynamic=False, backend="eager")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    tiny = make_checkpoint("tiny-cogview4", tmp_path_factory.mktemp("cv4c") / "tiny")
    eager = CogView4Pipeline.from_pretrained(tiny, device="cpu", dtype="float32")
    return eager, tiny


def _compiled(eager, tiny):
    return CogView4Pipeline(eager.transformer, eager.vae, eager.text_encoder, eager.scheduler_config,
                            eager.device, eager.dtype, str(tiny), "default", "flash", eager_backend_compiler)


def test_text_lengths_of_every_bucket_reuse_the_warmed_graph(pipes):
    from torch._dynamo.utils import counters

    eager, tiny = pipes
    torch._dynamo.reset()
    counters.clear()
    compiled = _compiled(eager, tiny)
    assert compiled.identity["kernels"] == 2 and "kernels" not in eager.identity  # runtime identity
    compiled.warmup(64, 96, num_inference_steps=1)
    compiled.seal_compiled()
    # transformer (one graph, any text length) and VAE decoder, one whole graph each
    assert counters["stats"]["unique_graphs"] == 2
    lengths = {compiled.text_encoder.tokenize(p, 1024)[0].shape[1] for p in PROMPTS + [""]}
    assert len(lengths) >= 7 and max(lengths) == 1024
    kw = dict(num_inference_steps=1, guidance_scale=5.0)
    # a recompile from here on would fail loudly (fullgraph) rather than fall back to eager
    with torch._dynamo.config.patch(recompile_limit=1):
        got = compiled.generate(PROMPTS, list(range(len(PROMPTS))), 64, 96, **kw)
        short = compiled.generate(PROMPTS[-2:], [3, 4], 64, 96, max_sequence_length=48, **kw)  # truncated
    assert counters["stats"]["unique_graphs"] == 2 and compiled._denoise.eager_calls == 0
    assert got.truncated[-1] and short.truncated == [True, True]
    want = eager.generate(PROMPTS, list(range(len(PROMPTS))), 64, 96, **kw)
    # eager float32 on CPU runs oneDNN GEMMs, a compiled graph traces plain ones: same within 1e-4
    torch.testing.assert_close(got.images, want.images, atol=1e-4, rtol=0)


def test_graphs_grow_with_sizes_only_and_unwarmed_sizes_run_eagerly(pipes):
    from torch._dynamo.utils import counters

    eager, tiny = pipes
    torch._dynamo.reset()
    counters.clear()
    compiled = _compiled(eager, tiny)
    for h, w in ((64, 64), (96, 64)):
        compiled.warmup(h, w, num_inference_steps=1, max_sequence_length=64)
    compiled.seal_compiled()
    assert counters["stats"]["unique_graphs"] == 4  # a transformer and a VAE graph per size
    compiled.generate(PROMPTS[:3], [1, 2, 3], 96, 64, num_inference_steps=1)
    assert compiled._denoise.eager_calls == 0
    got = compiled.generate(PROMPTS[:2], [1, 2], 64, 96, num_inference_steps=1)  # not warmed
    assert compiled._denoise.eager_calls == 2 * 2 and counters["stats"]["unique_graphs"] == 4
    assert torch.equal(got.images, eager.generate(PROMPTS[:2], [1, 2], 64, 96, num_inference_steps=1).images)
