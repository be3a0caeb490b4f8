"""The one sampling loop every diffusion policy runs: a sampler's steps from noise, recorded when asked."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mmalign.core.sampler import Sampler
from mmalign.core.types import Trajectory
from mmalign.objectives.diffusion import gaussian_logprob

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample_trajectory(
    predict: Predict,
    sampler: Sampler,
    initial: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    record: bool = True,
    start: int = 0,
) -> Trajectory:
    """Denoise `initial` through the sampler's steps `start` … num_steps − 1 without gradients.

    With `record`, every transition (x_i, x_{i+1}), its Gaussian's mean and its log-prob are kept; deterministic
    steps (σ = 0, e.g. DDIM's last step with `set_alpha_to_one`) get log-prob 0 and `stochastic[i] = False`.
    `start` = k continues a trajectory from its recorded x_k (`initial`).
    """
    timesteps = sampler.timesteps(initial.device)
    x = initial
    latents, nexts, logps, means, stochastic = [], [], [], [], []
    for i in range(start, sampler.num_steps):
        with torch.no_grad():
            output = predict(x, timesteps[i])
            is_stochastic = sampler.is_stochastic(i)
            noise = (
                torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
                if is_stochastic
                else None
            )
            out = sampler.step(output, i, x, noise)
        if record:
            latents.append(x)
            nexts.append(out.prev_sample)
            means.append(out.mean)
            stochastic.append(is_stochastic)
            logps.append(
                gaussian_logprob(out.prev_sample, out.mean, out.std)
                if is_stochastic
                else torch.zeros(x.shape[0], device=x.device)
            )
        x = out.prev_sample
    steps = timesteps[start:].clone()
    if not record:
        empty = torch.empty(0)
        return Trajectory(empty, empty, steps, empty, torch.zeros(0, dtype=torch.bool), final=x)
    return Trajectory(
        latents=torch.stack(latents, 1),
        next_latents=torch.stack(nexts, 1),
        timesteps=steps,
        logprobs=torch.stack(logps, 1),
        stochastic=torch.tensor(stochastic),
        final=x,
        means=torch.stack(means, 1),
    )
