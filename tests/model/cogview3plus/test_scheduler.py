"""Scheduler parity with diffusers' CogVideoXDDIMScheduler under the shipped configuration."""
import pytest
import torch

from cogview_ray.model.cogview3plus import scheduler as S

pytestmark = pytest.mark.timeout(120)

SHIPPED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
               timestep_spacing="trailing", rescale_betas_zero_snr=True, snr_shift_scale=4.0)


def _reference(**over):
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(**{**SHIPPED, **over})


def test_alphas_cumprod_reference_values():
    ac = S.alphas_cumprod(S.SchedulerConfig.from_dict(SHIPPED))
    assert torch.equal(ac, _reference().alphas_cumprod)
    for t, v in [(0, 0.9966086479), (19, 0.9303357734), (500, 0.0730434236), (979, 2.02003283e-05)]:
        assert abs(ac[t].item() - v) < 1e-9 * max(1.0, v) + 1e-13
    assert ac[999].item() == 0.0


@pytest.mark.parametrize("steps", [1, 2, 7, 30, 50, 1000])
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_timesteps_match(steps, spacing):
    ref = _reference(timestep_spacing=spacing)
    ref.set_timesteps(steps)
    ours = S.timesteps(S.SchedulerConfig.from_dict({**SHIPPED, "timestep_spacing": spacing}), steps)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, ref.timesteps)


def test_fifty_steps_endpoints():
    ts = S.timesteps(S.SchedulerConfig(), 50)
    assert ts[0].item() == 999 and ts[1].item() == 979 and ts[-1].item() == 19


@pytest.mark.parametrize("steps", [2, 30, 50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prediction,zero_snr", [("v_prediction", True), ("epsilon", False)])
def test_steps_match_reference(steps, dtype, prediction, zero_snr):
    # epsilon prediction is undefined at zero terminal SNR (division by sqrt(0)), so pair it without
    over = {"prediction_type": prediction, "rescale_betas_zero_snr": zero_snr}
    cfg = S.SchedulerConfig.from_dict({**SHIPPED, **over})
    ref = _reference(**over)
    ref.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x_ref = x = torch.randn(2, 4, 6, 6, generator=g).to(dtype)
    for c, t in zip(S.step_coefficients(cfg, steps), ref.timesteps):
        assert c.timestep == int(t)
        v = torch.randn(2, 4, 6, 6, generator=g)  # model output in fp32, as the pipeline passes it
        x_ref = ref.step(v, t, x_ref, return_dict=False)[0].to(dtype)
        x = S.ddim_step(cfg, v, x, c).to(dtype)
        assert torch.equal(x, x_ref)


def test_thirty_steps_uses_integer_division_for_prev():
    coeffs = S.step_coefficients(S.SchedulerConfig(), 30)
    assert coeffs[1].timestep == 966  # next step prev = 966 - 33 = 933, not the listed 932
    ac = S.alphas_cumprod(S.SchedulerConfig())
    a_expected = ((1 - ac[933]) / (1 - ac[966])) ** 0.5
    assert torch.equal(coeffs[1].a, a_expected)


def test_last_step_returns_x0():
    c = S.step_coefficients(S.SchedulerConfig(), 50)[-1]
    assert c.timestep == 19 and c.a.item() == 0.0 and c.b.item() == 1.0


def test_unsupported_config_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        S.SchedulerConfig.from_dict({**SHIPPED, "prediction_type": "flow"})
    with pytest.raises(ValueError, match="unknown key"):
        S.SchedulerConfig.from_dict({**SHIPPED, "nonsense": 1})
