"""jobs/benchmark.py for CogView4: the FLOP count split (meta device, full size) and one CPU run
of ours against diffusers' CogView4Pipeline (and of a random-init pipeline, nothing written)."""
import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[3] / "jobs" / "benchmark.py"
_spec = importlib.util.spec_from_file_location("benchmark_job_cv4", _PATH)
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)

pytestmark = pytest.mark.timeout(300)


def test_full_size_flops_split_at_1024_50_steps_with_guidance():
    r = benchmark.preset_flops("full-cogview4", 1024, 1024, 50, 5.0, text_tokens=128, negative_tokens=16)
    split = r["flops"]
    assert r["text_lens"] == [128, 16]
    # attention: QK^T and AV, 4 * L^2 * inner_dim per block, L = text + 64*64 image tokens
    inner, blocks = 32 * 128, 28
    assert split["transformer_attention"] == 50 * blocks * 4 * inner * ((128 + 4096) ** 2 + (16 + 4096) ** 2)
    assert split["total"] == sum(v for k, v in split.items() if k != "total")
    assert 4.5e15 < split["transformer_linear"] < 5.0e15 and 3.9e13 < split["vae_decode"] < 4.0e13
    # without guidance: the cond forward only
    no_cfg = benchmark.preset_flops("full-cogview4", 1024, 1024, 50, 1.0, 128, 16)["flops"]
    assert no_cfg["vae_decode"] == split["vae_decode"]
    assert no_cfg["transformer_linear"] < split["transformer_linear"] / 1.9
    # the CogView3-Plus count DESIGN.md quotes: about 2.65 PFLOP
    cogview3plus = benchmark.preset_flops("full", 1024, 1024, 50, 5.0, 0, 0)["flops"]
    assert cogview3plus["total"] == pytest.approx(2.652e15, rel=1e-3)


def test_cpu_run_against_diffusers_and_a_random_init_run(tmp_path):
    from cogview_ray.model.checkpoint import make_checkpoint

    ckpt = make_checkpoint("tiny-cogview4", tmp_path / "tiny")
    out = tmp_path / "bench.json"
    args = ["model", "--height", "64", "--width", "96", "--steps", "1", "--runs", "1", "--clock", "cpu"]
    assert benchmark.main([*args, "--checkpoint", str(ckpt), "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["family"] == "CogView4Pipeline" and r["clock"] == "cpu"
    assert [row["variant"] for row in r["rows"]] == ["ours[none,auto]", "diffusers[none]"]
    assert all("error" not in row and row["s_per_image_p50"] > 0 for row in r["rows"])
    assert r["text_lens"][1] == 16 and r["text_lens"][0] % 16 == 0  # the prompt, then "" padded to 16
    assert r["flops_split"]["transformer_attention"] > 0  # counted on meta copies, also on CPU
    assert benchmark.main([*args, "--random-init", "tiny-cogview4", "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["checkpoint"] == "random:tiny-cogview4" and [row["variant"] for row in r["rows"]] == ["ours[none,auto]"]
