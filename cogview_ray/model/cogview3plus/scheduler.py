"""CogVideoX-style DDIM sampling math (zero-terminal-SNR, SNR shift, v-prediction), as plain functions.

Coefficients stay float64 0-dim CPU tensors, as in the reference, so that PyTorch's type
promotion rounds the same intermediate products to the latent dtype and results match bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..loading import config_fields


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: Optional[list] = None
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "v_prediction"
    timestep_spacing: str = "trailing"
    rescale_betas_zero_snr: bool = True
    snr_shift_scale: float = 4.0

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        cfg = cls(**config_fields(cls, d, "scheduler/scheduler_config.json"))
        checks = {
            "beta_schedule": (cfg.beta_schedule, ("scaled_linear", "linear")),
            "prediction_type": (cfg.prediction_type, ("v_prediction", "epsilon", "sample")),
            "timestep_spacing": (cfg.timestep_spacing, ("trailing", "leading", "linspace")),
        }
        for key, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"scheduler_config.json {key}={value!r} is not supported (one of {allowed})")
        if cfg.trained_betas is not None or cfg.clip_sample:
            raise ValueError("scheduler_config.json trained_betas / clip_sample are not supported")
        return cfg


def alphas_cumprod(cfg: SchedulerConfig) -> torch.Tensor:
    """ᾱ[0..T-1], float64: SNR shift first, then the zero-terminal-SNR rescale."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float64)
    ac = torch.cumprod(1.0 - betas, dim=0)
    s = cfg.snr_shift_scale
    ac = ac / (s + (1 - s) * ac)
    if cfg.rescale_betas_zero_snr:
        a = ac.sqrt()
        a0, at = a[0].clone(), a[-1].clone()
        a = (a - at) * (a0 / (a0 - at))
        ac = a**2
    return ac


def timesteps(cfg: SchedulerConfig, steps: int) -> torch.Tensor:
    """Descending int64 timesteps for `steps` inference steps."""
    n = cfg.num_train_timesteps
    if not 1 <= steps <= n:
        raise ValueError(f"num_inference_steps must be in 1..{n}, got {steps}")
    if cfg.timestep_spacing == "trailing":
        ts = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
    elif cfg.timestep_spacing == "leading":
        ts = (np.arange(0, steps) * (n // steps)).round()[::-1].copy().astype(np.int64) + cfg.steps_offset
    else:
        ts = np.linspace(0, n - 1, steps).round()[::-1].copy().astype(np.int64)
    return torch.from_numpy(ts)


@dataclass(frozen=True)
class StepCoefficients:
    """Per-step DDIM coefficients (0-dim float64 CPU tensors), computed once before the loop."""

    timestep: int
    sqrt_alpha: torch.Tensor
    sqrt_one_minus_alpha: torch.Tensor
    a: torch.Tensor  # weight of x_t
    b: torch.Tensor  # weight of x0


def step_coefficients(cfg: SchedulerConfig, steps: int) -> list[StepCoefficients]:
    ac = alphas_cumprod(cfg)
    final = torch.tensor(1.0) if cfg.set_alpha_to_one else ac[0]
    out = []
    for t in timesteps(cfg, steps).tolist():
        # t_prev uses integer division even where it misses the next listed timestep
        prev = t - cfg.num_train_timesteps // steps
        alpha, alpha_prev = ac[t], (ac[prev] if prev >= 0 else final)
        beta = 1 - alpha
        a = ((1 - alpha_prev) / (1 - alpha)) ** 0.5
        b = alpha_prev**0.5 - alpha**0.5 * a
        out.append(StepCoefficients(t, alpha**0.5, beta**0.5, a, b))
    return out


def predict_x0(cfg: SchedulerConfig, model_output: torch.Tensor, x: torch.Tensor, c: StepCoefficients) -> torch.Tensor:
    if cfg.prediction_type == "v_prediction":
        return c.sqrt_alpha * x - c.sqrt_one_minus_alpha * model_output
    if cfg.prediction_type == "epsilon":
        return (x - c.sqrt_one_minus_alpha * model_output) / c.sqrt_alpha
    return model_output


def ddim_step(cfg: SchedulerConfig, model_output: torch.Tensor, x: torch.Tensor, c: StepCoefficients) -> torch.Tensor:
    """One deterministic DDIM step x_t -> x_{t_prev} (eta 0, no noise)."""
    return c.a * x + c.b * predict_x0(cfg, model_output, x, c)
