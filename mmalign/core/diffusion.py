"""Modality-free diffusion math: the Gaussian of one sampler step, trajectory recording, denoising loss.

Any adapter (images, speech) supplies `predict(x_t, t) -> model output` (with its own conditioning and
classifier-free guidance) and a diffusers scheduler; this module turns them into recorded trajectories with
per-step log-probs, re-scores a recorded step under new weights, and computes the ε-prediction loss.

The per-step distribution is the scheduler's own: for DDIM (any η > 0) the mean is `scheduler.step` with zero
noise and σ = η·sqrt(scheduler._get_variance(t, t_prev)); for DDPM ("fixed_small") the mean is what
`scheduler.step` adds its noise to, and σ² is its posterior variance. Log-probs are averaged over the
non-batch dimensions, as in DDPO's reference implementation (Black et al. 2023), so PPO ratios do not scale with
the resolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from mmalign.core.types import Trajectory

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


def make_scheduler(name: str, config: dict[str, Any]) -> DDIMScheduler | DDPMScheduler:
    """A sampling scheduler by name from a pipeline's scheduler config; unknown names are a clear error."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; trajectory recording supports {sorted(SCHEDULERS)}")
    scheduler = SCHEDULERS[name].from_config(config)
    if name == "ddpm" and scheduler.config.variance_type != "fixed_small":
        raise ValueError(
            f"DDPM log-probs need variance_type='fixed_small', got {scheduler.config.variance_type!r}"
        )
    return scheduler


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """log N(x; mean, std²) averaged over all but the batch dimension."""
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    logp = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return logp.flatten(1).mean(1)


def _prev_timestep(scheduler, t: torch.Tensor) -> int:
    return int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def step_distribution(
    scheduler, model_output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of x_{t_prev} given x_t under the scheduler's own step."""
    if isinstance(scheduler, DDIMScheduler):
        if eta <= 0:
            raise ValueError("DDIM with eta=0 is deterministic: log-probs need eta > 0")
        zeros = torch.zeros_like(sample)
        mean = scheduler.step(model_output, t, sample, eta=eta, variance_noise=zeros).prev_sample
        std = eta * scheduler._get_variance(t, _prev_timestep(scheduler, t)) ** 0.5
        return mean, torch.as_tensor(std, dtype=sample.dtype, device=sample.device)
    if isinstance(scheduler, DDPMScheduler):
        # DDPMScheduler.step draws its own noise from `generator`: replay the same draw to recover its mean.
        state = torch.Generator().manual_seed(0)
        out = scheduler.step(model_output, t, sample, generator=state).prev_sample
        var = scheduler._get_variance(t) if int(t) > 0 else torch.tensor(0.0)
        std = torch.as_tensor(var, dtype=sample.dtype, device=sample.device) ** 0.5
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(0), dtype=sample.dtype)
        return out - std * noise.to(sample.device), std
    raise TypeError(f"no log-prob for {type(scheduler).__name__}; use DDIM or DDPM")


def sample_trajectory(
    predict: Predict,
    scheduler,
    initial: torch.Tensor,
    *,
    num_steps: int,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    record: bool = True,
    start: int = 0,
) -> Trajectory:
    """Denoise `initial` (x_T) for `num_steps`, recording every transition and its log-prob.

    Steps whose σ is 0 (e.g. DDPM's final step) are deterministic: their log-prob is recorded as 0 and
    `conditioning["stochastic"]` marks which steps a policy gradient can use. `start` = k continues a
    trajectory from its recorded x_k (`initial`), running steps k … num_steps − 1 only.
    """
    scheduler.set_timesteps(num_steps, device=initial.device)
    x = initial
    latents, nexts, logps, means, stochastic = [], [], [], [], []
    timesteps = scheduler.timesteps[start:]
    for t in timesteps:
        with torch.no_grad():
            output = predict(x, t)
        mean, std = step_distribution(scheduler, output, t, x, eta)
        is_stochastic = float(std) > 0  # one host sync per step
        if is_stochastic:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x_next = mean + std * noise
            logp = gaussian_logprob(x_next, mean, std)
        else:
            x_next, logp = mean, torch.zeros(x.shape[0], device=x.device)
        if record:
            latents.append(x)
            nexts.append(x_next)
            logps.append(logp)
            means.append(mean)
            stochastic.append(is_stochastic)
        x = x_next
    if not record:
        empty = torch.empty(0)
        return Trajectory(empty, empty, timesteps.clone(), empty, final=x)
    return Trajectory(
        latents=torch.stack(latents, 1),
        next_latents=torch.stack(nexts, 1),
        timesteps=timesteps.clone(),
        logprobs=torch.stack(logps, 1),
        conditioning={"stochastic": torch.tensor(stochastic), "eta": eta},
        final=x,
        means=torch.stack(means, 1),
    )


def step_logprob(predict: Predict, scheduler, trajectory: Trajectory, step: int, eta: float) -> torch.Tensor:
    """Log-prob of the recorded transition at `step` under the weights `predict` uses now (with grad)."""
    x, x_next, t = trajectory.latents[:, step], trajectory.next_latents[:, step], trajectory.timesteps[step]
    if scheduler.num_inference_steps != len(trajectory.timesteps):
        scheduler.set_timesteps(len(trajectory.timesteps), device=x.device)
    mean, std = step_distribution(scheduler, predict(x, t), t, x, eta)
    if float(std) == 0:
        raise ValueError(f"step {step} (t={int(t)}) is deterministic; it has no log-prob")
    return gaussian_logprob(x_next, mean, std)


def add_noise(train_scheduler: DDPMScheduler, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε, the forward process the model was trained on."""
    return train_scheduler.add_noise(clean, noise, t)


def denoising_loss(
    predict: Predict,
    train_scheduler: DDPMScheduler,
    clean: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    """Per-sample ‖target − model(x_t, t)‖² averaged over dimensions (target = ε, or v for v-prediction)."""
    noisy = add_noise(train_scheduler, clean, noise, t)
    output = predict(noisy, t)
    if train_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif train_scheduler.config.prediction_type == "v_prediction":
        target = train_scheduler.get_velocity(clean, noise, t)
    else:
        raise ValueError(f"unsupported prediction_type {train_scheduler.config.prediction_type!r}")
    return ((output.float() - target.float()) ** 2).flatten(1).mean(1)
