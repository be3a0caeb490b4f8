"""The one sampling loop every diffusion policy runs: a sampler's steps from noise, recorded or differentiable.

`sample_trajectory` walks the steps without gradients (rollouts of policy-gradient methods, evaluation).
`sample_with_gradients` walks the same steps, drawing the same noise, but keeps the autograd graph through a window
of the last steps, as the reward-backprop methods need (DRaFT-K, AlignProp, ReFL, DRaFT-LV); see `GradientWindow`.
Both use only the `Sampler` protocol (timesteps, is_stochastic, step), so they run on DDPM-family and flow samplers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from mmalign.core.sampler import Sampler, StepOutput
from mmalign.core.types import Trajectory
from mmalign.objectives.diffusion import gaussian_logprob

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Renoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _step_noise(
    sampler: Sampler, index: int, like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor | None:
    """The noise step `index` adds (None for a deterministic step), drawn on the CPU so a seed means one stream."""
    if not sampler.is_stochastic(index):
        return None
    return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)


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
            noise = _step_noise(sampler, i, x, generator)
            out = sampler.step(output, i, x, noise)
        if record:
            latents.append(x)
            nexts.append(out.prev_sample)
            means.append(out.mean)
            stochastic.append(noise is not None)
            logps.append(
                gaussian_logprob(out.prev_sample, out.mean, out.std)
                if noise is not None
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


@dataclass(frozen=True)
class GradientWindow:
    """Which steps of one sampled chain keep gradients, and how the chain ends.

    The chain runs steps 0 … `end` − 1 (`end` None: every step). Steps before `start` run without gradients;
    steps `start` … `end` − 1 keep the graph, so the output's gradient reaches the weights through them only
    (gradients through the last K steps: start = num_steps − K, DRaFT-K; a start drawn per batch: AlignProp).
    A chain stopped before its last step returns the predicted clean sample x̂₀ of its last step (ReFL: one step
    with gradients, end = start + 1). `repeats` = n > 1 is DRaFT-LV: the last step is run n − 1 more times, each
    from `renoise(final, ε)`, the chain's final sample (detached) noised afresh to the last step's input level, and
    every run's output is returned. `checkpoint` recomputes each denoiser call in the backward pass
    (`torch.utils.checkpoint`, non-reentrant) instead of keeping its activations (all calls but the last).
    """

    start: int
    end: int | None = None
    checkpoint: bool = True
    repeats: int = 1
    renoise: Renoise | None = field(default=None, compare=False)

    def check(self, num_steps: int) -> int:
        """The resolved `end`, or a ValueError naming the field that does not fit a chain of `num_steps`."""
        end = num_steps if self.end is None else self.end
        if not 0 <= self.start < end <= num_steps:
            raise ValueError(
                f"gradient window [start={self.start}, end={end}) must satisfy 0 <= start < end <= num_steps "
                f"({num_steps})"
            )
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.repeats > 1 and (end != num_steps or self.renoise is None):
            raise ValueError(
                "repeats > 1 (DRaFT-LV) repeats the last step of a full chain: it needs end = num_steps and renoise"
            )
        return end


@dataclass
class WindowStep:
    """One step that kept gradients: its index, its input (detached) and its output (with the graph)."""

    index: int
    sample: torch.Tensor
    output: StepOutput


@dataclass
class DifferentiableSample:
    """What `sample_with_gradients` returns: the outputs to score, and the steps that carry their gradients.

    `outputs[0]` is the chain's final sample (or its x̂₀ when it stopped early); `outputs[1:]` are DRaFT-LV's
    repeats of the last step. `steps` lists the chain's gradient steps in order (not the repeats).
    """

    outputs: list[torch.Tensor]
    steps: list[WindowStep]


def _call(predict: Predict, x: torch.Tensor, t: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    if use_checkpoint:
        return checkpoint(predict, x, t, use_reentrant=False)
    return predict(x, t)


def sample_with_gradients(
    predict: Predict,
    sampler: Sampler,
    initial: torch.Tensor,
    window: GradientWindow,
    *,
    generator: torch.Generator | None = None,
) -> DifferentiableSample:
    """Denoise `initial` as `sample_trajectory` does (the same steps and noise draws), keeping the graph through
    the steps of `window`: the reward-backprop methods' differentiable sampler.

    Call it with gradients enabled; only the window's denoiser calls build a graph, so memory grows with the
    window's length (with checkpointing, by one sample-sized input and output per step). The last denoiser call
    with gradients is not checkpointed, as `torch.utils.checkpoint.checkpoint_sequential` leaves its last segment:
    backward starts there, so recomputing it would only repeat the forward just run. Deterministic samplers
    (DDIM with η = 0, flow ODE) need no noise; stochastic steps add theirs as data (the reparameterised step).
    """
    end = window.check(sampler.num_steps)
    timesteps = sampler.timesteps(initial.device)
    x = initial
    with torch.no_grad():
        for i in range(window.start):
            x = sampler.step(
                predict(x, timesteps[i]), i, x, _step_noise(sampler, i, x, generator)
            ).prev_sample
    calls_left = end - window.start + window.repeats - 1

    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal calls_left
        calls_left -= 1
        return _call(predict, x, t, window.checkpoint and calls_left > 0)

    steps: list[WindowStep] = []
    for i in range(window.start, end):
        out = sampler.step(call(x, timesteps[i]), i, x, _step_noise(sampler, i, x, generator))
        steps.append(WindowStep(i, x.detach(), out))
        x = out.prev_sample
    outputs = [x if end == sampler.num_steps else steps[-1].output.pred_original_sample]
    last = sampler.num_steps - 1
    for _ in range(window.repeats - 1):
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        assert window.renoise is not None  # window.check: repeats > 1 needs renoise
        start = window.renoise(x.detach(), noise)
        out = sampler.step(
            call(start, timesteps[last]), last, start, _step_noise(sampler, last, start, generator)
        )
        outputs.append(out.prev_sample)
    return DifferentiableSample(outputs, steps)
