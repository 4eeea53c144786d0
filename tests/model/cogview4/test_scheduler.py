"""The CogView4 flow-matching schedule equals diffusers' FlowMatchEulerDiscreteScheduler as the
CogView4 pipeline drives it, bit for bit."""
import numpy as np
import pytest
import torch

from cogview_ray.model.cogview4 import scheduler as sched

from .conftest import SCHEDULER

pytestmark = pytest.mark.timeout(60)


def _reference(steps, image_seq_len, **overrides):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.cogview4.pipeline_cogview4 import calculate_shift

    cfg = {**SCHEDULER, **overrides}
    ref = FlowMatchEulerDiscreteScheduler(**cfg)
    ts = np.linspace(1000, 1.0, steps).astype(np.int64).astype(np.float32)
    mu = calculate_shift(image_seq_len, cfg["base_image_seq_len"], cfg["base_shift"], cfg["max_shift"])
    ref.set_timesteps(steps, "cpu", sigmas=ts / 1000, mu=mu, timesteps=ts)  # as the pipeline calls it
    return ref


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 50])
@pytest.mark.parametrize("image_seq_len", [24, 256, 4096, 16384])
@pytest.mark.parametrize("time_shift_type", ["linear", "exponential"])
def test_schedule_matches_reference(steps, image_seq_len, time_shift_type):
    ref = _reference(steps, image_seq_len, time_shift_type=time_shift_type)
    cfg = sched.SchedulerConfig.from_dict({**SCHEDULER, "time_shift_type": time_shift_type})
    assert torch.equal(sched.sigmas(cfg, steps, image_seq_len), ref.sigmas)
    assert torch.equal(sched.timesteps(cfg, steps), ref.timesteps)


def test_known_values():
    cfg = sched.SchedulerConfig.from_dict(SCHEDULER)
    # 1024 px: 4096 image tokens -> mu = 4 * 0.75 + 0.25
    assert sched.calculate_shift(cfg, 4096) == 3.25
    assert sched.timesteps(cfg, 4).tolist() == [1000.0, 667.0, 334.0, 1.0]
    s = sched.sigmas(cfg, 4, 4096)
    assert s[0] == 1.0 and s[-1] == 0.0 and s.dtype == torch.float32
    assert s[1].item() == pytest.approx(3.25 / (3.25 + 1 / 0.667 - 1), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_euler_step_matches_reference(dtype):
    ref = _reference(3, 64)
    cfg = sched.SchedulerConfig.from_dict(SCHEDULER)
    s = sched.sigmas(cfg, 3, 64)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(i + 1)).to(dtype)
        want = ref.step(v, t, x, return_dict=False)[0]
        got = sched.euler_step(v, x, s[i + 1] - s[i])
        assert got.dtype == dtype and torch.equal(got, want)
        x = got


@pytest.mark.parametrize("key,value", [("use_karras_sigmas", True), ("invert_sigmas", True),
                                       ("stochastic_sampling", True), ("time_shift_type", "cosine")])
def test_unsupported_settings_refused(key, value):
    with pytest.raises(ValueError, match=key):
        sched.SchedulerConfig.from_dict({**SCHEDULER, key: value})


def test_unknown_key_refused():
    with pytest.raises(ValueError, match="unknown key"):
        sched.SchedulerConfig.from_dict({**SCHEDULER, "beta_start": 0.1})
