"""Flow-matching sampling and training math: the second sampler family of the diffusion policy kind.

A flow-matching model (Stable Diffusion 3, FLUX) predicts a velocity v ≈ ε − x₀ on the straight path
x_σ = (1 − σ)·x₀ + σ·ε, and its pipeline integrates dx/dσ = v with Euler steps over the σ grid of diffusers'
`FlowMatchEulerDiscreteScheduler`. `FlowMatchSampler` reproduces that grid exactly (it asks the scheduler, with
the `sigmas` and `mu` each pipeline passes) and offers, per step, either that Euler (ODE) step or an SDE step with
the same marginals whose Gaussian gives each step a log-probability:

- **Flow-GRPO** (Liu et al. 2025, arXiv:2505.05470, §4 "ODE to SDE", its Euler–Maruyama update; reference code
  `sde_step_with_logprob` in yifan123/flow_grpo), with Δσ = σ_{i+1} − σ_i < 0:

      x_{i+1} = x_i + [v + σ_t²/(2σ_i)·(x_i + (1 − σ_i)·v)]·Δσ + σ_t·sqrt(−Δσ)·ε,
      σ_t = a·sqrt(σ_i / (1 − σ_i)),   a = `noise_level`,

  where at σ_i = 1 (the first grid point) the denominator uses the second grid value σ_1 instead of σ_i, as the
  reference code does, so σ_t stays finite.
- **DanceGRPO** (Xue et al. 2025, arXiv:2505.07818; `flux_step` in XueZeyue/DanceGRPO): the same drift written
  with the score estimate s = −(x − (1 − σ)·x̂₀)/σ², x̂₀ = x − σ·v: mean = x + Δσ·v − ½η²·s·Δσ, and step standard
  deviation η·sqrt(−Δσ), i.e. the Flow-GRPO step with a constant σ_t = η.
- **SDE window** (Flow-GRPO-Fast; MixGRPO, Li et al. 2025): only steps [a, b) draw noise, the others are ODE steps.
  Flow-GRPO samples every step with the SDE but trains all but the last (whose Gaussian is very narrow); its Fast
  variant without a window size uses the window (0, N − 1). Which steps to train is the algorithm's choice.

Everything a step returns is float32 (Flow-GRPO computes its step in fp32 because bf16 overflows in the mean), so
log-probs taken from it with `gaussian_logprob` are fp32, averaged over all but the batch dimension.
`FlowMatchForwardProcess` is what training losses need: the noising path, the velocity target and SD3-style
training-time sampling; `flow_matching_loss` is the per-sample loss at a given (noise, σ), the log-likelihood
surrogate Diffusion-DPO uses on flows.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

# the defining module, not the `diffusers` namespace, whose type-checking imports resolve to a dummy class
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from mmalign.core.sampler import StepOutput

SDE_TYPES = ("ode", "flow_grpo", "dance_grpo")
GRID_LAYOUTS = ("sd3", "flux")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")
# Scheduler options that change the step rule or run the grid backwards: the Euler step below would not be theirs.
UNSUPPORTED_OPTIONS = ("stochastic_sampling", "invert_sigmas")


def _scheduler(config: dict[str, Any]) -> FlowMatchEulerDiscreteScheduler:
    """A flow-matching Euler scheduler from a pipeline's scheduler config; anything else is a named error."""
    config = dict(config)
    name = config.get("_class_name", FlowMatchEulerDiscreteScheduler.__name__)
    if name != FlowMatchEulerDiscreteScheduler.__name__:
        raise ValueError(
            f"scheduler config is a {name}; flow-matching sampling needs a FlowMatchEulerDiscreteScheduler config"
        )
    accepted = set(inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters)
    foreign = sorted(k for k in config if not k.startswith("_") and k not in accepted)
    if foreign:
        raise ValueError(
            f"scheduler config has {foreign}, which FlowMatchEulerDiscreteScheduler does not take: "
            "flow-matching sampling needs a flow-matching scheduler config, not a DDPM-family one"
        )
    for option in UNSUPPORTED_OPTIONS:
        if config.get(option):
            raise ValueError(f"FlowMatchEulerDiscreteScheduler option {option}=True is not supported")
    return FlowMatchEulerDiscreteScheduler.from_config(config)


def _checked_window(window: tuple[int, int], num_steps: int) -> tuple[int, int]:
    bounds = tuple(int(i) for i in window)
    if len(bounds) != 2 or not 0 <= bounds[0] < bounds[1] <= num_steps:
        raise ValueError(
            f"sde_window must be (start, end) with 0 ≤ start < end ≤ num_steps={num_steps}, got {window}"
        )
    return bounds[0], bounds[1]


def calculate_shift(image_seq_len: int, config: Any) -> float:
    """The resolution-dependent shift μ the SD3 and FLUX pipelines compute: linear in the image token count."""
    base_len, max_len = config.base_image_seq_len, config.max_image_seq_len
    slope = (config.max_shift - config.base_shift) / (max_len - base_len)
    return image_seq_len * slope + config.base_shift - slope * base_len


class FlowMatchSampler:
    """The σ grid of a flow-matching pipeline and its Euler (ODE) or variance-preserving SDE steps.

    `layout` says which pipeline's grid to reproduce: "sd3" (StableDiffusion3Pipeline: the scheduler's default
    timesteps, μ only when the config uses dynamic shifting) or "flux" (FluxPipeline: σ = linspace(1, 1/N, N)
    shifted with μ). `image_seq_len` is the transformer's image token count ((h/p)·(w/p) for SD3, the packed length
    for FLUX); it is needed where μ is. `sde_type` "ode" makes every step Euler; "flow_grpo" / "dance_grpo" make
    the steps in `sde_window` (default: all) stochastic with `noise_level` a (Flow-GRPO) or η (DanceGRPO).
    Timesteps are in the scheduler's units, σ·num_train_timesteps: what StableDiffusion3Pipeline passes to its
    transformer (FluxPipeline divides them by 1000 at the transformer call).
    """

    def __init__(
        self,
        scheduler_config: dict[str, Any],
        num_steps: int,
        *,
        layout: str = "sd3",
        image_seq_len: int | None = None,
        sde_type: str = "ode",
        noise_level: float = 0.7,
        sde_window: tuple[int, int] | None = None,
    ):
        if num_steps < 1:
            raise ValueError(f"num_steps must be ≥ 1, got {num_steps}")
        if layout not in GRID_LAYOUTS:
            raise ValueError(f"layout must be one of {GRID_LAYOUTS}, got {layout!r}")
        if sde_type not in SDE_TYPES:
            raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
        if not math.isfinite(noise_level) or noise_level < 0:
            raise ValueError(f"noise_level must be a finite number ≥ 0, got {noise_level}")
        window = _checked_window((0, num_steps) if sde_window is None else sde_window, num_steps)
        scheduler = _scheduler(scheduler_config)
        self.scheduler_config = dict(scheduler.config)
        self.num_steps, self.layout, self.image_seq_len = num_steps, layout, image_seq_len
        self.sde_type, self.noise_level, self.sde_window = sde_type, float(noise_level), window
        sigmas, mu = self._pipeline_grid_arguments(scheduler.config)
        scheduler.set_timesteps(num_steps, device="cpu", sigmas=sigmas, mu=mu)
        # diffusers infers `timesteps` as the ndarray set_timesteps computes first; it stores a tensor
        self._timesteps = scheduler.timesteps.float()  # type: ignore[attr-defined]
        self.sigmas = scheduler.sigmas.float()  # [num_steps + 1], ending at 0

    def _pipeline_grid_arguments(self, config: Any) -> tuple[list[float] | None, float | None]:
        """The `sigmas` and `mu` the pipeline of `layout` passes to `scheduler.set_timesteps`."""
        needs_mu = self.layout == "flux" or config.use_dynamic_shifting
        mu: float | None = None
        if needs_mu:
            if self.image_seq_len is None:
                raise ValueError(
                    f"image_seq_len is needed: the {self.layout} grid of this scheduler shifts by it"
                )
            mu = calculate_shift(self.image_seq_len, config)
        if self.layout == "sd3" or getattr(config, "use_flow_sigmas", False):
            return None, mu
        return np.linspace(1.0, 1 / self.num_steps, self.num_steps).tolist(), mu

    def with_window(self, sde_window: tuple[int, int]) -> FlowMatchSampler:
        """The same sampler with SDE steps only in [start, end): one rollout's window (Flow-GRPO-Fast, MixGRPO)."""
        other = copy.copy(self)
        other.sde_window = _checked_window(sde_window, self.num_steps)
        return other

    def timesteps(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The `num_steps` values the denoiser is called with, noisiest first."""
        return self._timesteps.to(device)

    def initial_noise(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | list[torch.Generator] | None,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        *,
        group_size: int = 1,
    ) -> torch.Tensor:
        """x at σ = 1: standard normal noise drawn as the pipelines draw it (`randn_tensor`).

        `group_size` = k > 1 shares one draw among each block of k consecutive rows (the samples of one prompt), as
        DanceGRPO and MixGRPO do so that a group's rewards differ by the SDE noise only.
        """
        if group_size < 1 or shape[0] % group_size:
            raise ValueError(f"group_size must be ≥ 1 and divide the batch size {shape[0]}, got {group_size}")
        draw = randn_tensor(
            (shape[0] // group_size, *shape[1:]), generator=generator, device=device, dtype=dtype
        )
        return draw.repeat_interleave(group_size, dim=0)

    def is_sde_step(self, index: int) -> bool:
        """Is step `index` an SDE step (inside the window of an SDE sampler), whatever its noise level?"""
        self._check_index(index)
        start, end = self.sde_window
        return self.sde_type != "ode" and start <= index < end

    def is_stochastic(self, index: int) -> bool:
        """Does step `index` draw noise (and so have a log-prob)? An SDE step at noise level 0 does not."""
        return self.is_sde_step(index) and self.noise_level > 0

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_steps:
            raise IndexError(f"step index {index} outside 0..{self.num_steps - 1}")

    def sde_scale(self, index: int) -> float:
        """σ_t of step `index`: a·sqrt(σ/(1 − σ)) for Flow-GRPO (σ = 1 reads σ_1 below the line), η for DanceGRPO."""
        self._check_index(index)
        if self.sde_type == "dance_grpo":
            return self.noise_level
        sigma = float(self.sigmas[index])
        below = float(self.sigmas[1]) if sigma == 1.0 else sigma
        return self.noise_level * math.sqrt(sigma / (1 - below))

    def step(
        self,
        model_output: torch.Tensor,
        index: int,
        sample: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> StepOutput:
        """Step `index` from σ_i to σ_{i+1} given the velocity; `noise` None returns the mean as the next sample.

        Differentiable in `model_output` and `sample`; computed in float32.
        """
        v, x = model_output.float(), sample.float()
        sigma = self.sigmas[index].to(x.device)
        dt = self.sigmas[index + 1].to(x.device) - sigma
        pred_original = x - sigma * v
        if self.is_sde_step(index):
            scale = self.sde_scale(index)
            mean = x * (1 + scale**2 / (2 * sigma) * dt) + v * (1 + scale**2 * (1 - sigma) / (2 * sigma)) * dt
            std = scale * torch.sqrt(-dt)
        else:
            mean = x + dt * v  # FlowMatchEulerDiscreteScheduler.step
            std = torch.zeros((), device=x.device)
        prev = mean if noise is None or not self.is_stochastic(index) else mean + std * noise.float()
        return StepOutput(prev_sample=prev, mean=mean, std=std, pred_original_sample=pred_original)


def logit_normal(n: int, mean: float, std: float, generator: torch.Generator | None) -> torch.Tensor:
    """u = sigmoid(z), z ~ N(mean, std²): SD3's logit-normal training-time density (Esser et al. 2024, §3.1)."""
    return torch.sigmoid(torch.randn(n, generator=generator) * std + mean)


class FlowMatchForwardProcess:
    """The rectified-flow forward process and target: x_σ = (1 − σ)·x₀ + σ·ε, v = ε − x₀.

    Training σ are drawn as diffusers' SD3/FLUX training scripts draw them: u from `timestep_sampling` ("uniform",
    or "logit_normal" with `logit_mean`/`logit_std`, the default of `train_dreambooth_sd3.py`), then the σ of the
    scheduler's 1000-point training grid at index ⌊u·1000⌋ (so a static `shift` applies, as in training).
    The "t" of this process is σ itself; `model_timestep` turns it into the scheduler's units, σ·1000.
    """

    def __init__(
        self,
        scheduler_config: dict[str, Any],
        *,
        timestep_sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ):
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(
                f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {timestep_sampling!r}"
            )
        if not logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        scheduler = _scheduler(scheduler_config)
        self.num_train_timesteps = scheduler.config["num_train_timesteps"]
        self.train_sigmas = scheduler.sigmas.float()  # [num_train_timesteps], noisiest first
        self.timestep_sampling, self.logit_mean, self.logit_std = timestep_sampling, logit_mean, logit_std

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """σ for n training samples (on the CPU; move them with the batch)."""
        if self.timestep_sampling == "logit_normal":
            u = logit_normal(n, self.logit_mean, self.logit_std, generator)
        else:
            u = torch.rand(n, generator=generator)
        # sigmoid can round to exactly 1.0 in float32: keep the index on the grid.
        index = (u * self.num_train_timesteps).long().clamp(max=self.num_train_timesteps - 1)
        return self.train_sigmas[index]

    @staticmethod
    def _expand(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=like.device, dtype=like.dtype)
        return sigma.reshape(-1, *[1] * (like.dim() - 1)) if sigma.dim() else sigma

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_σ = (1 − σ)·x₀ + σ·ε (`FlowMatchEulerDiscreteScheduler.scale_noise`)."""
        sigma = self._expand(t, clean)
        return (1 - sigma) * clean + sigma * noise

    def target(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity the model is trained to output: v = dx_σ/dσ = ε − x₀."""
        return noise - clean

    def implied_noise(self, noisy: torch.Tensor, clean: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The ε that `add_noise` turns `clean` into `noisy` with at σ: ε = (x_σ − (1 − σ)·x₀)/σ (σ > 0)."""
        sigma = self._expand(t, noisy)
        return (noisy - (1 - sigma) * clean) / sigma

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """σ in the scheduler's units (σ·1000), what StableDiffusion3Pipeline passes to its transformer."""
        return torch.as_tensor(t) * self.num_train_timesteps


Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def flow_matching_loss(
    predict: Predict,
    process: FlowMatchForwardProcess,
    clean: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    """Per-sample ‖v_θ(x_σ, σ) − (ε − x₀)‖² averaged over dimensions, in float32.

    `predict(x, timestep)` takes the scheduler-unit timestep. With a shared (ε, σ) for the preferred and the
    rejected sample, −½ of this is the log-likelihood surrogate of Diffusion-DPO (Wallace et al. 2023) on flows.
    """
    noisy = process.add_noise(clean, noise, t)
    output = predict(noisy, process.model_timestep(t).to(clean.device))
    target = process.target(clean, noise, t)
    return ((output.float() - target.float()) ** 2).flatten(1).mean(1)
