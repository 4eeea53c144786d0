"""CompiledModule on CPU: outputs survive a compiler that reuses its output buffer (as a CUDA-graph
replay does), shapes beyond the compiled set run eagerly, and sealing freezes the set."""
import pytest
import torch

from cogview_ray.model.cogview3plus import CogView3PlusPipeline
from cogview_ray.model.compiled import COMPILE_MODES, CompiledModule, compile_module

pytestmark = pytest.mark.timeout(600)


class BufferReusingCompiler:
    """Stands in for torch.compile(mode="max-autotune"): every call returns the same tensor,
    overwritten in place, like the static output of a replayed CUDA graph."""

    def __init__(self):
        self.calls = 0

    def __call__(self, module, mode):
        buffers = {}

        def compiled(*args):
            self.calls += 1
            out = module(*args)
            buf = buffers.setdefault(tuple(out.shape), torch.empty_like(out))
            return buf.copy_(out)

        return compiled


def test_every_mode_is_offered_and_none_is_the_module_itself():
    assert COMPILE_MODES == ("none", "default", "max-autotune", "max-autotune-no-cudagraphs")
    module = torch.nn.Identity()
    assert compile_module(module, "none") is module
    with pytest.raises(ValueError, match="reduce-overhead"):
        compile_module(module, "reduce-overhead")


def test_outputs_kept_across_calls_are_not_overwritten():
    fn = compile_module(lambda x: x * 2, "max-autotune-no-cudagraphs", compiler=BufferReusingCompiler())
    a = fn(torch.ones(2))
    b = fn(torch.full((2,), 5.0))
    assert a.tolist() == [2.0, 2.0] and b.tolist() == [10.0, 10.0]


def test_shapes_beyond_the_limit_and_after_sealing_run_eagerly():
    compiler = BufferReusingCompiler()
    fn = CompiledModule(lambda x: x + 1, compiler(lambda x: x + 1, "default"), "default", max_shapes=2)
    for n in (1, 2, 3, 1):
        assert fn(torch.zeros(n)).tolist() == [1.0] * n
    assert (compiler.calls, fn.eager_calls, len(fn.shapes)) == (3, 1, 2)  # shape 3 was the third
    fn = CompiledModule(lambda x: x + 1, compiler(lambda x: x + 1, "default"), "default")
    fn(torch.zeros(4))
    fn.seal()
    fn(torch.zeros(4)), fn(torch.zeros(5))
    assert fn.shapes == {((4,),)} and fn.eager_calls == 1


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_generate_with_a_buffer_reusing_compiler_matches_eager(tiny_checkpoint, guidance):
    eager = CogView3PlusPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32")
    compiler = BufferReusingCompiler()
    reusing = CogView3PlusPipeline(eager.transformer, eager.vae, eager.text_encoder, eager.scheduler_config,
                                   eager.device, eager.dtype, compile="max-autotune", compiler=compiler)
    prompts, seeds = ["a red fox", "a lighthouse", "two boats"], [1, 2, 3]
    kw = dict(height=64, width=64, num_inference_steps=2, guidance_scale=guidance, max_sequence_length=16)
    got = reusing.generate(prompts, seeds, **kw).images
    want = eager.generate(prompts, seeds, **kw).images
    assert compiler.calls == 3 * 2 + 3  # the clone path ran: every forward and decode went through it
    assert torch.equal(got, want)
    assert not torch.equal(got[0], got[1])  # three images, not three views of one buffer


def test_sealed_pipeline_renders_an_unwarmed_size_eagerly(tiny_checkpoint):
    eager = CogView3PlusPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32")
    compiler = BufferReusingCompiler()
    pipe = CogView3PlusPipeline(eager.transformer, eager.vae, eager.text_encoder, eager.scheduler_config,
                                eager.device, eager.dtype, compile="default", compiler=compiler)
    pipe.warmup(64, 64, num_inference_steps=1, max_sequence_length=16)
    pipe.seal_compiled()
    warm_calls = compiler.calls
    kw = dict(num_inference_steps=2, max_sequence_length=16)
    got = pipe.generate(["a boat"], [4], 64, 96, **kw).images
    assert compiler.calls == warm_calls and pipe._denoise.eager_calls == 2 and pipe._decode.eager_calls == 1
    assert torch.equal(got, eager.generate(["a boat"], [4], 64, 96, **kw).images)
    pipe.generate(["a boat"], [4], 64, 64, **kw)
    assert compiler.calls == warm_calls + 3  # the warmed-up size still runs compiled
