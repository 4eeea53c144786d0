"""CogView4's flow-matching schedule (diffusers' FlowMatchEulerDiscreteScheduler as its pipeline
drives it) and the Euler step, as plain functions.

Sigmas are computed in float32 numpy, in the reference's order of operations, so that the
timesteps the transformer sees are bit-identical to the reference's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..loading import config_fields


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = True
    base_shift: Optional[float] = 0.25
    max_shift: Optional[float] = 0.75
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False
    shift_terminal: Optional[float] = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    time_shift_type: str = "linear"
    stochastic_sampling: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        cfg = cls(**config_fields(cls, d, "scheduler/scheduler_config.json"))
        if cfg.time_shift_type not in ("linear", "exponential"):
            raise ValueError(f"scheduler_config.json time_shift_type={cfg.time_shift_type!r} is not supported "
                             "(one of ('linear', 'exponential'))")
        unsupported = [k for k in ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                                   "use_beta_sigmas", "stochastic_sampling") if getattr(cfg, k)]
        if unsupported:
            raise ValueError(f"scheduler_config.json {', '.join(unsupported)} are not supported by CogView4 rendering")
        return cfg


def calculate_shift(cfg: SchedulerConfig, image_seq_len: int) -> float:
    """mu = sqrt(image_seq_len / base_image_seq_len) * max_shift + base_shift (CogView4's rule)."""
    return (image_seq_len / cfg.base_image_seq_len) ** 0.5 * cfg.max_shift + cfg.base_shift


def sigmas(cfg: SchedulerConfig, steps: int, image_seq_len: int) -> torch.Tensor:
    """float32 [steps + 1]: shifted sigmas from ~1 down, then a final 0.

    Integer timesteps linspace(T, 1, steps) give sigmas = t / T before the shift.
    """
    s = (_integer_timesteps(cfg, steps) / cfg.num_train_timesteps).astype(np.float32)
    if cfg.use_dynamic_shifting:
        mu = calculate_shift(cfg, image_seq_len)
        if cfg.time_shift_type == "linear":
            s = mu / (mu + (1 / s - 1) ** 1.0)
        else:
            s = math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
    else:
        s = cfg.shift * s / (1 + (cfg.shift - 1) * s)
    s = torch.from_numpy(np.asarray(s, dtype=np.float32))
    return torch.cat([s, torch.zeros(1)])


def _integer_timesteps(cfg: SchedulerConfig, steps: int) -> np.ndarray:
    if not 1 <= steps <= cfg.num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in 1..{cfg.num_train_timesteps}, got {steps}")
    return np.linspace(cfg.num_train_timesteps, 1.0, steps).astype(np.int64).astype(np.float32)


def timesteps(cfg: SchedulerConfig, steps: int) -> torch.Tensor:
    """float32 [steps]: the transformer's timestep input. The reference pipeline hands the
    scheduler these integer timesteps and the sigmas both, so the model sees them unshifted
    while the Euler steps use the shifted sigmas."""
    return torch.from_numpy(_integer_timesteps(cfg, steps))


def euler_step(model_output: torch.Tensor, x: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """x_{next} = x + (sigma_next - sigma) * v, added in float32, returned in the model's dtype
    (so in bf16 the latents round to bf16 every step, as in the reference)."""
    return (x.float() + dt * model_output).to(model_output.dtype)
