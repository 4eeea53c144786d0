"""configs/cogview4.yaml is a valid run config for the real model, within CogView4's limits."""
from pathlib import Path

from cogview_ray.config import load_config

ROOT = Path(__file__).resolve().parents[3]


def test_cogview4_config_loads_with_the_family_limits():
    cfg = load_config(ROOT / "configs" / "cogview4.yaml")
    assert cfg.model.dtype == "bfloat16" and cfg.model.device == "cuda"
    assert cfg.render.max_sequence_length is None  # the pipeline's own limit: 1024 GLM tokens
    for side in (cfg.render.height, cfg.render.width):
        assert side % 32 == 0 and 512 <= side <= 2048
