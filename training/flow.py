"""Rectified-flow maths shared by the FLUX trainers (LoRWeB, Edit Transfer): timesteps, noising, target, sampler.

Convention (FLUX, diffusers' FlowMatchEulerDiscreteScheduler): t = 1 is pure noise, t = 0 the clean latent,

    x_t = (1 - t) · x0 + t · ε,        the model predicts the velocity v = ε - x0,

and sampling integrates dx/dt = v from t = 1 down to t = 0 with Euler steps x ← x + (t_next - t) · v.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

NUM_TRAIN_TIMESTEPS = 1000
TIMESTEP_SAMPLINGS = ("official", "logit_normal", "uniform")


def official_timestep_weights(num: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The loss weight of each of the ``num`` training timesteps in the official LoRWeB / ai-toolkit code.

    Index i is the i-th timestep of ``linspace(1000, 1, num)``. The curve is a bell around the middle,
    exp(-2 ((i - num/2) / num)^2), shifted so its minimum is 0 and scaled to mean 1 (what ai-toolkit's
    ``get_weights_for_timesteps`` returns for ``timestep_type: weighted``).
    """
    x = torch.arange(num, dtype=torch.float32)
    bell = torch.exp(-2 * ((x - num / 2) / num) ** 2)
    shifted = bell - bell.min()
    return shifted * (num / shifted.sum())


def sample_timesteps(kind: str, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(t in (0, 1] per sample, loss weight per sample).

    official: one of the 1000 training timesteps t = linspace(1, 0.001, 1000) drawn uniformly (indices 0..998, as
    the official sampler draws them), weighted by :func:`official_timestep_weights`; logit_normal: t = sigmoid(n),
    n ~ N(0, 1), weight 1; uniform: t ~ U(0.001, 0.999), weight 1.
    """
    if kind == "official":
        index = torch.randint(0, NUM_TRAIN_TIMESTEPS - 1, (batch,), generator=generator)
        t = torch.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS)[index]
        return t, official_timestep_weights()[index]
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(batch, generator=generator)), torch.ones(batch)
    if kind == "uniform":
        return torch.rand(batch, generator=generator).clamp(1e-3, 1 - 1e-3), torch.ones(batch)
    raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {kind!r}")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t ε with one t per sample (broadcast over the remaining dims)."""
    t = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def add_noise_masked(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Noise only where ``mask`` is 1 (Edit Transfer's bottom-right panel): x_t = ((1 - t) x0 + t ε)·m + x0·(1 - m),
    one t per sample; ``mask`` broadcasts like x0. Where m = 0, x_t is x0 exactly."""
    mask = mask.to(x0.dtype)
    return add_noise(x0, noise, t) * mask + x0 * (1 - mask)


def flux_mu(tokens: int, base_tokens: int = 256, max_tokens: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """FLUX.1's resolution-dependent shift mu (diffusers' ``calculate_shift`` with FLUX.1-dev's scheduler config):
    linear in the number of image tokens, 0.5 at 256 tokens, 1.15 at 4096 (a 1024-px image)."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (tokens - base_tokens)


def shifted_times(steps: int, mu: float) -> torch.Tensor:
    """The sampling times of FLUX.1-dev's pipelines: t = linspace(1, 1/steps, steps) shifted by
    exp(mu) / (exp(mu) + (1/t - 1)), then 0 (``steps + 1`` values from 1 down to 0)."""
    t = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))
    return torch.cat([shifted, torch.zeros(1, dtype=torch.float64)]).float()


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of weight_b · (pred - target)² over the (masked) elements; ``mask`` broadcasts like ``pred``."""
    err = (pred.float() - target.float()) ** 2 * weight.view(-1, *([1] * (pred.ndim - 1))).float()
    if mask is None:
        return err.mean()
    mask = mask.float().expand_as(err)
    return (err * mask).sum() / mask.sum().clamp_min(1.0)


@torch.no_grad()
def euler_sample(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, steps: int,
                 after_step: Callable[[torch.Tensor, float], torch.Tensor] | None = None,
                 times: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate from t = 1 (``noise``) to t = 0 in ``steps`` equal Euler steps; ``velocity(x, t[B])`` is the model.

    ``after_step(x, t_next)`` may replace parts of x after each step (inpainting resets the known region).
    ``times`` (``steps + 1`` values from 1 to 0, e.g. :func:`shifted_times`) replaces the equal steps.
    """
    x = noise
    if times is not None and len(times) != steps + 1:
        raise ValueError(f"times must hold steps + 1 = {steps + 1} values, got {len(times)}")
    times = (torch.linspace(1.0, 0.0, steps + 1) if times is None else times).tolist()
    for t_now, t_next in zip(times[:-1], times[1:]):
        t = torch.full((x.shape[0],), t_now, device=x.device)
        x = x + (t_next - t_now) * velocity(x, t)
        if after_step is not None:
            x = after_step(x, t_next)
    return x
