"""The attention backend on CPU: 40 -> 64 zero padding is exact, "auto" resolves to the kernel the
golden bytes were made with, a pinned backend is used and recorded."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cogview_ray.model.attention import (
    ATTENTION_BACKENDS,
    fa3_available,
    padded_attention,
    padded_head_dim,
    resolve_attention,
)
from cogview_ray.model.cogview3plus import CogView3PlusPipeline

pytestmark = pytest.mark.timeout(300)


def test_zero_padding_40_to_64_is_exact():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 77, 40, generator=g, dtype=torch.float64) for _ in range(3))

    def math_sdpa(q, k, v, scale):
        assert q.shape[-1] == 64 and scale == 1 / math.sqrt(40)
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    got = padded_attention(q, k, v, padded_head_dim(40), math_sdpa)
    with sdpa_kernel(SDPBackend.MATH):
        want = F.scaled_dot_product_attention(q, k, v)
    assert got.shape == (2, 4, 77, 40)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the scale matters: the padded width's default 1/sqrt(64) would not match
    with sdpa_kernel(SDPBackend.MATH):
        wrong = F.scaled_dot_product_attention(*(F.pad(t, (0, 24)) for t in (q, k, v)))[..., :40]
    assert (wrong - want).abs().max() > 1e-3


def test_padded_head_dims():
    assert [padded_head_dim(d) for d in (40, 64, 65, 128)] == [64, 64, 96, 128]
    with pytest.raises(ValueError):
        padded_head_dim(300)


def test_auto_on_cpu_and_pinned_names():
    cpu = torch.device("cpu")
    assert resolve_attention("auto", cpu, torch.float32, 4, 40, 100) == "flash"
    assert resolve_attention("math", cpu, torch.float32, 4, 40, 100) == "math"
    assert ATTENTION_BACKENDS == ("auto", "flash", "cudnn", "efficient", "math", "fa3")
    with pytest.raises(ValueError, match="one of"):
        resolve_attention("sage", cpu, torch.float32, 4, 40, 100)
    if not fa3_available():
        with pytest.raises(ValueError, match="flash_attn_interface"):
            resolve_attention("fa3", cpu, torch.float32, 4, 40, 100)


def test_pinned_backend_is_used_and_recorded(tiny_checkpoint):
    auto = CogView3PlusPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32")
    math_pipe = CogView3PlusPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32",
                                                     attention="math")
    assert (auto.identity["attention"], math_pipe.identity["attention"]) == ("flash", "math")
    kw = dict(height=64, width=64, num_inference_steps=2, max_sequence_length=16)
    a = auto.generate(["a red fox"], [1], **kw).images
    m = math_pipe.generate(["a red fox"], [1], **kw).images
    # the CPU kernels differ in the last bits: the pin is real, and the backend is output-defining
    assert not torch.equal(a, m) and (a - m).abs().max() < 1e-4
    # the transformer's forward pins math; unpinned, it follows torch's choice or the caller's context
    t, g = math_pipe.transformer, torch.Generator().manual_seed(0)
    c = t.config
    size = torch.tensor([[64.0, 64.0]] * 2)
    args = (torch.randn(2, c.in_channels, 8, 8, generator=g), torch.randn(2, 16, c.text_embed_dim, generator=g),
            torch.tensor([999, 999]), size, size, torch.zeros_like(size))
    with torch.inference_mode():
        pinned = t(*args)
        t.attention = None
        assert not torch.equal(t(*args), pinned)
        with sdpa_kernel(SDPBackend.MATH):
            assert torch.equal(t(*args), pinned)
