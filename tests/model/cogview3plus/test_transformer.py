"""Transformer parity with diffusers' CogView3PlusTransformer2DModel, and fullgraph compile."""
import pytest
import torch

from cogview_ray.model.cogview3plus.transformer import CogView3PlusTransformer, TransformerConfig

pytestmark = pytest.mark.timeout(300)

TINY = dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=2,
            out_channels=4, text_embed_dim=8, time_embed_dim=8, condition_dim=2, pos_embed_max_size=8,
            sample_size=8)


def _reference(cfg: dict, seed=0):
    from diffusers import CogView3PlusTransformer2DModel

    torch.manual_seed(seed)
    ref = CogView3PlusTransformer2DModel(**cfg).eval()
    # random adaLN weights would otherwise be default-initialised; perturb everything a bit
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref


def _ours_from(ref, cfg: dict, dtype=torch.float32):
    ours = CogView3PlusTransformer(TransformerConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.to(dtype)


def _inputs(n=2, c=4, h=8, w=12, lt=8, dim=8, dtype=torch.float32):
    g = torch.Generator("cpu").manual_seed(0)
    return dict(
        hidden_states=torch.randn(n, c, h, w, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(n, lt, dim, generator=g).to(dtype),
        timestep=torch.randint(0, 1000, (n,), generator=g),
        original_size=torch.tensor([[64.0, 96.0]] * n, dtype=dtype),
        target_size=torch.tensor([[64.0, 96.0]] * n, dtype=dtype),
        crop_coords=torch.tensor([[0.0, 0.0]] * n, dtype=dtype),
    )


def test_state_dict_keys_equal_reference():
    ref = _reference(TINY)
    ours = CogView3PlusTransformer(TransformerConfig(**TINY))
    assert set(ours.state_dict()) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k


@pytest.mark.parametrize("shape", [(8, 8), (8, 12), (16, 6)])
def test_forward_matches_reference_fp32(shape):
    ref = _reference(TINY)
    ours = _ours_from(ref, TINY)
    inp = _inputs(h=shape[0], w=shape[1])
    with torch.no_grad():
        expected = ref(**inp, return_dict=False)[0]
        got = ours(**inp)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_forward_matches_reference_bf16():
    ref = _reference(TINY)
    ours = _ours_from(ref, TINY, torch.bfloat16)
    ref = ref.to(torch.bfloat16)
    # diffusers >= 0.33 keeps the positional table in fp32 under a bf16 model; so do we
    ref.patch_embed.pos_embed = ref.patch_embed.pos_embed.float()
    ours.patch_embed.pos_embed = ours.patch_embed.pos_embed.float()
    inp = _inputs(dtype=torch.bfloat16)
    with torch.no_grad():
        expected = ref(**inp, return_dict=False)[0]
        got = ours(**inp)
    assert got.dtype == torch.bfloat16
    # bf16: the same operations in the same order give the same bits
    assert torch.equal(got, expected)


def test_pos_table_layout():
    from cogview_ray.model.cogview3plus.transformer import sincos_table

    t = sincos_table(16, 4)  # quarter = 4
    # row 0, column 3: column half is sin/cos(3 * w), row half is sin/cos(0) = 0/1
    assert torch.allclose(t[0, 3, 0], torch.tensor(3.0).sin())
    assert torch.allclose(t[0, 3, 8:12], torch.zeros(4))
    assert torch.allclose(t[0, 3, 12:16], torch.ones(4))
    assert torch.allclose(t[2, 0, 8], torch.tensor(2.0).sin())


def test_compiled_fullgraph_matches_eager():
    torch._dynamo.reset()
    ref = _reference(TINY)
    ours = _ours_from(ref, TINY)
    inp = _inputs()
    compiled = torch.compile(ours, fullgraph=True, dynamic=False)
    with torch.no_grad():
        eager = ours(**inp)
        got = compiled(**inp)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    # no graph breaks: explain() over the same call reports a single graph
    explanation = torch._dynamo.explain(ours)(**inp)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_fused_qkv_gives_the_bits_of_three_projections_and_keeps_official_keys():
    from cogview_ray.model.cogview3plus.transformer import JointAttention

    torch.manual_seed(0)
    attn = JointAttention(160, 4, 40).eval()  # the real head size
    official = {f"{p}.{w}" for p in ("to_q", "to_k", "to_v", "to_out.0") for w in ("weight", "bias")}
    assert set(attn.state_dict()) == official
    s = torch.randn(2, 100, 160)
    with torch.no_grad():
        fused = torch.nn.functional.linear(s, attn.qkv_weight, attn.qkv_bias)
        separate = torch.cat([attn.to_q(s), attn.to_k(s), attn.to_v(s)], dim=-1)
    assert torch.equal(fused, separate)
    # a load by copy or by assignment, and a dtype move, all keep the fused buffers in step
    new = {k: torch.randn_like(v) for k, v in attn.state_dict().items()}
    attn.load_state_dict(new, assign=True)
    assert torch.equal(attn.qkv_weight[160:320], new["to_k.weight"])
    attn.to(torch.bfloat16)
    assert attn.qkv_weight.dtype == torch.bfloat16
    assert attn.to_v.weight.data_ptr() == attn.qkv_weight[320:].data_ptr()


def test_attention_makes_no_hidden_copies():
    """q/k layer norm runs on views of the fused output: the only copies are the two GEMMs' bias fills."""
    from torch.profiler import ProfilerActivity, profile

    from cogview_ray.model.cogview3plus.transformer import JointAttention

    attn = JointAttention(160, 4, 40).eval()
    s = torch.randn(2, 50, 160)
    with torch.inference_mode():
        attn(s)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            attn(s)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("aten::addmm") == 2 and counts.get("aten::native_layer_norm") == 1
    assert counts.get("aten::copy_", 0) == 2 and "aten::clone" not in counts and "aten::contiguous" not in counts


def test_onednn_gemms_stay_within_parity_and_are_float32_cpu_only():
    cfg = dict(TINY, attention_head_dim=40, num_attention_heads=2, text_embed_dim=8)  # real head size
    ref = _reference(cfg)
    ours = _ours_from(ref, cfg)
    assert ours.use_onednn() and ours.transformer_blocks[0].ff.onednn
    inp = _inputs()
    with torch.no_grad():
        expected = ref(**inp, return_dict=False)[0]
        got = ours(**inp)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not _ours_from(ref, cfg, torch.bfloat16).use_onednn()
