"""Samplers and forward processes: the two halves of a diffusion model that objectives need, as objects.

A `Sampler` walks a grid of timesteps; its single-step primitive `step` returns the next sample together with the
Gaussian it was drawn from (mean, σ) and the predicted clean sample, so policy gradient (log-probs), reward
backprop (gradients through chosen steps) and evaluation (deterministic steps) all use one code path. A
`ForwardProcess` says how clean outputs are noised for training losses (Diffusion-DPO, DLPO's data term, ReFL's
pretraining term). This module holds the DDPM family (DDIM with any η, DDPM); flow matching lives in
`mmalign.core.flow`. Both are sampler families of the one diffusion policy kind.

DDPM-family log-probs are scheduler-exact: for DDIM the mean is what `DDIMScheduler.step` returns with zero noise
and σ = η·sqrt(scheduler._get_variance(t, t_prev)); for DDPM ("fixed_small") the mean is what `scheduler.step`
adds its noise to, and σ² is its posterior variance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from diffusers import DDIMScheduler, DDPMScheduler


@dataclass
class StepOutput:
    """One denoising step: where it went, the Gaussian it was drawn from, and the predicted clean sample."""

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    pred_original_sample: torch.Tensor


@runtime_checkable
class Sampler(Protocol):
    """A grid of `num_steps` timesteps and one step from the sample at grid point i to the one at i + 1."""

    num_steps: int

    def timesteps(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The values the denoiser is called with, one per step, in sampling order."""
        ...

    def initial_noise(
        self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str
    ) -> torch.Tensor:
        """The sample at the first grid point (pure noise, scaled as the scheduler wants)."""
        ...

    def is_stochastic(self, index: int) -> bool:
        """Whether step `index` draws noise (and so has a log-prob)."""
        ...

    def step(
        self, model_output: torch.Tensor, index: int, sample: torch.Tensor, noise: torch.Tensor | None = None
    ) -> StepOutput:
        """Step `index` from `sample`; `noise` None takes the mean. Differentiable in model_output and sample."""
        ...


@runtime_checkable
class WindowedSampler(Sampler, Protocol):
    """A sampler whose SDE steps can be confined to a window of its grid (flow matching: Flow-GRPO-Fast, MixGRPO)."""

    def with_window(self, sde_window: tuple[int, int]) -> Sampler:
        """The same sampler with SDE steps only in [start, end)."""
        ...


@runtime_checkable
class ForwardProcess(Protocol):
    """How a clean output is noised at timestep t, and what the denoiser should predict there (training losses).

    Timesteps are in the units the denoiser takes (`model_timestep` maps them where a family differs).
    """

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def target(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def implied_noise(self, noisy: torch.Tensor, clean: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise that takes `clean` to `noisy` at t (inverse of `add_noise` in the noise)."""
        ...

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor: ...


SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


class DDPMFamilySampler:
    """DDIM (η = 0 deterministic, η > 0 stochastic) or DDPM sampling with a diffusers scheduler's own steps."""

    def __init__(
        self, scheduler_config: dict[str, Any], name: str = "ddim", num_steps: int = 20, eta: float = 1.0
    ):
        if name not in SCHEDULERS:
            raise ValueError(
                f"unknown scheduler {name!r} for the DDPM-family sampler; supported: {sorted(SCHEDULERS)}"
            )
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.scheduler = SCHEDULERS[name].from_config(scheduler_config)
        if name == "ddpm" and self.scheduler.config.variance_type != "fixed_small":
            raise ValueError(
                f"DDPM log-probs need variance_type='fixed_small', got {self.scheduler.config.variance_type!r}"
            )
        self.name, self.num_steps, self.eta = name, num_steps, eta
        self.scheduler.set_timesteps(num_steps)
        self._timesteps = self.scheduler.timesteps.clone()
        self._stds = [
            self._std(int(t)) for t in self._timesteps
        ]  # 0-dim float32 tensors, as the scheduler computes

    def timesteps(self, device: torch.device | str | None = None) -> torch.Tensor:
        return self._timesteps.to(device) if device is not None else self._timesteps

    def initial_noise(
        self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str
    ) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device) * self.scheduler.init_noise_sigma

    def is_stochastic(self, index: int) -> bool:
        return bool(self._stds[index] > 0)

    def _std(self, t: int) -> torch.Tensor:
        if self.name == "ddim":
            prev = t - self.scheduler.config.num_train_timesteps // self.num_steps
            return self.eta * self.scheduler._get_variance(t, prev) ** 0.5
        return (self.scheduler._get_variance(t) if t > 0 else torch.tensor(0.0)) ** 0.5

    def step(
        self, model_output: torch.Tensor, index: int, sample: torch.Tensor, noise: torch.Tensor | None = None
    ) -> StepOutput:
        t = self._timesteps[index].to(sample.device)
        if self.name == "ddim":
            out = self.scheduler.step(
                model_output, t, sample, eta=self.eta, variance_noise=torch.zeros_like(sample)
            )
            mean = out.prev_sample
            std = self._stds[index].to(device=sample.device, dtype=sample.dtype)
        else:  # DDPMScheduler.step draws its own noise from `generator`: replay the same draw to recover its mean
            out = self.scheduler.step(model_output, t, sample, generator=torch.Generator().manual_seed(0))
            std = self._stds[index].to(device=sample.device, dtype=sample.dtype)
            replay = torch.randn(sample.shape, generator=torch.Generator().manual_seed(0), dtype=sample.dtype)
            mean = out.prev_sample - std * replay.to(sample.device)
        prev = mean if noise is None or not self.is_stochastic(index) else mean + std * noise
        return StepOutput(prev, mean, std, out.pred_original_sample)


class DDPMForwardProcess:
    """x_t = sqrt(ᾱ_t)·x₀ + sqrt(1 − ᾱ_t)·ε, the process an ε- or v-prediction model was trained on."""

    def __init__(self, scheduler_config: dict[str, Any]):
        self.scheduler = DDPMScheduler.from_config({**scheduler_config, "variance_type": "fixed_small"})
        kind = self.scheduler.config.prediction_type
        if kind not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {kind!r}; expected epsilon or v_prediction")
        self.prediction_type = kind

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(clean, noise, t)

    def target(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(clean, noise, t)

    def implied_noise(self, noisy: torch.Tensor, clean: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.scheduler.alphas_cumprod.to(noisy.device)[t]
        abar = abar.reshape(-1, *[1] * (noisy.dim() - 1)) if abar.dim() else abar
        return (noisy - abar.sqrt() * clean) / (1 - abar).sqrt()

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        return t
