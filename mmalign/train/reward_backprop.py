"""Reward backprop for any `DiffusionPolicy`: DRaFT-K, full DRaFT, DRaFT-LV, AlignProp and ReFL as one algorithm.

The loss is the sampled chain itself: each update samples outputs from noise with the autograd graph kept through
a window of denoising steps (`mmalign.core.sampling.sample_with_gradients`), decodes them (VAE for images, the mel
itself for speech), scores them with a differentiable reward and descends a loss on that reward
(`mmalign.objectives.reward_backprop`). The variants differ only in settings:

- **DRaFT-K** (Clark et al. 2023; seed 004 §4.5.3, Eq. (28): J(θ) = E_{c, x_T}[r(sample(θ, c, x_T), c)]):
  `truncation: last`, gradients through the last `backprop_steps` = K steps (K = 1: DRaFT-1; null: full DRaFT);
- **DRaFT-LV**: DRaFT-1 with `last_step_repeats` = n: the last step is also run from n − 1 re-noisings of the
  final sample (x̃ = forward process at the last step's level, fresh ε) and the n rewards' losses are averaged.
  DRaFT's Algorithm 2 draws all n inputs by re-noising; here the first of the n is the chain's own last step, so
  n = 1 is exactly DRaFT-1 and no extra denoiser call is spent;
- **AlignProp** (Prabhudesai et al. 2023; seed 004 §4.5.4, L_align = −1/|D| Σ_c R(π_θ(x_T, c))): the first step
  with gradients is drawn per batch (`truncation: uniform` over `truncation_range`, the paper's randomized
  truncation, or `gaussian` with `truncation_mean`/`truncation_std`, its code's default); AlignProp's code
  (and trl's AlignPropTrainer) redraws the point per denoising step, which makes the trained steps a random
  non-contiguous set; a single point per batch is the paper's K ~ U[0, T];
- **ReFL** (Xu et al. 2023, ImageReward; seed 004 §4.5.2): `truncation: refl`, no gradient until a step drawn
  from `truncation_range` (ImageReward: 30..39 of 40), then that one step with gradients, and its predicted
  clean sample x̂₀ decoded and scored, with `loss: refl` (λ·relu(φ − r)); `pretrain_loss_coef` adds its J_pre,
  the denoising loss on real outputs of the prompts (`data.targets`, DLPO's `data_denoising_loss`);
- **DRaFT+** regulariser: `kl_coef` × Σ over the gradient steps of KL(p_θ(x_{t−1}|x_t) ‖ p_ref(x_{t−1}|x_t))
  between the policy's and the base model's step Gaussians at the policy's own samples (`gaussian_kl`). A
  deterministic step (DDIM η = 0, flow ODE) has σ = 0 and no Gaussian: it is scored as if σ were 1, i.e.
  ½‖μ_θ − μ_ref‖² averaged over dimensions, the shared-variance penalty NeMo-Aligner's DRaFT+ puts on ε.

How it fits the trainer's rollout/loss split: `rollout` (no gradients) only draws what a chain starts from —
prompts, their conditioning, the initial noise, the truncation point and, for ReFL's J_pre, one real output per
sample; `loss` runs the chain with gradients from that noise under the current weights. Nothing in a rollout goes
stale, so `train.ppo_epochs` > 1 re-samples the same (prompt, noise, truncation) draws with the updated weights:
it reuses the draws, not the samples (leave it at 1 for fresh noise every step). Micro-batches (`grad_accum`) are
slices of one rollout, each its own chain, so memory follows the micro-batch. The reward is validated where it is
computed (shape, NaN/inf: `RewardError`) and a non-finite gradient of the reward w.r.t. the decoded outputs is a
`RewardError` during backward, before any update or checkpoint; the trainer logs the gradient norm of each step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from mmalign.core.data import Row
from mmalign.core.policy import DiffusionPolicy
from mmalign.core.reward import Reward, RewardError, score
from mmalign.core.sampling import GradientWindow, Renoise, sample_with_gradients
from mmalign.core.types import Batch, Conditioning
from mmalign.objectives.diffusion import gaussian_kl
from mmalign.objectives.reward_backprop import REWARD_BACKPROP_LOSSES, make_reward_backprop_loss
from mmalign.train.algorithm import AlgorithmBase, LossTerm, summed_terms
from mmalign.train.diffusion_pg import data_denoising_loss, draw_real_outputs, read_real_outputs

TRUNCATIONS = ("last", "uniform", "gaussian", "refl")
GAUSSIAN_DRAWS = 10_000  # a gaussian truncation point outside the chain is redrawn at most this often


@dataclass
class RewardBackpropConfig:
    """The `algorithm:` section of alignprop / draft / draft_lv / refl recipes (steps count from 0, the noisiest)."""

    name: str = "draft"
    # last: gradients through the last `backprop_steps` steps (DRaFT-K) · uniform / gaussian: the first step with
    # gradients drawn per batch (AlignProp) · refl: one step with gradients, drawn per batch, scored on its x̂₀
    truncation: str = "last"
    backprop_steps: int | None = 1  # last: K; null = every step (full DRaFT)
    # uniform: first gradient step drawn from [lo, hi] (default [0, num_steps − 1], i.e. K ~ U{1..N});
    # refl: the gradient step drawn from [lo, hi] (default [⌈0.75·N⌉, N − 1], ImageReward's 30..39 of 40)
    truncation_range: tuple[int, int] | None = None
    truncation_mean: float | None = None  # gaussian: default 0.84·N (AlignProp's 42 of 50)
    truncation_std: float | None = None  # gaussian: default 0.1·N (AlignProp's 5 of 50)
    last_step_repeats: int = 1  # DRaFT-LV's n (rewards of the last step from n inputs, averaged)
    checkpointing: bool = True  # recompute each denoiser call in backward (torch.utils.checkpoint)
    loss: str = "negative"  # negative (DRaFT, AlignProp) | target (AlignProp's |r − target|) | refl (ReFL)
    # the loss's options, e.g. {target: 10} (target) or {threshold: 2, scale: 1e-3} (refl)
    loss_options: dict[str, Any] = field(default_factory=dict)
    kl_coef: float = 0.0  # DRaFT+'s KL to the base model over the gradient steps
    pretrain_loss_coef: float = 0.0  # ReFL's J_pre: the denoising loss on real outputs (data.targets)
    samples_per_prompt: int = 1

    def __post_init__(self) -> None:
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {', '.join(TRUNCATIONS)}, got {self.truncation!r}")
        if self.backprop_steps is not None and self.backprop_steps < 1:
            raise ValueError(
                f"backprop_steps must be >= 1 (or null for every step), got {self.backprop_steps}"
            )
        if self.truncation_range is not None:
            lo, hi = (int(v) for v in self.truncation_range)
            if not 0 <= lo <= hi:
                raise ValueError(
                    f"truncation_range must be [lo, hi] with 0 <= lo <= hi, got {self.truncation_range}"
                )
            self.truncation_range = (lo, hi)
        if self.truncation_std is not None and not self.truncation_std > 0:
            raise ValueError(f"truncation_std must be > 0, got {self.truncation_std}")
        if self.last_step_repeats < 1:
            raise ValueError(f"last_step_repeats must be >= 1, got {self.last_step_repeats}")
        if self.last_step_repeats > 1 and self.truncation == "refl":
            raise ValueError(
                "last_step_repeats (DRaFT-LV) repeats the last step; truncation: refl stops before it"
            )
        if self.loss not in REWARD_BACKPROP_LOSSES:
            raise ValueError(f"loss must be one of {', '.join(REWARD_BACKPROP_LOSSES)}, got {self.loss!r}")
        make_reward_backprop_loss(self.loss, **self.loss_options)  # unknown or missing options: a named error
        for name in ("kl_coef", "pretrain_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")

    @property
    def uses_data(self) -> bool:
        """Whether ReFL's pretraining loss on real outputs (data.targets) is part of the loss."""
        return self.pretrain_loss_coef > 0


def last_step_renoise(policy: DiffusionPolicy) -> Renoise:
    """A clean sample noised to the input level of the sampler's last step (DRaFT-LV's x̃ = forward(x₀, ε)).

    The sampler's timesteps are in the denoiser's units; the forward process's t maps to them linearly
    (`model_timestep(t)` = t for the DDPM family, t·num_train_timesteps for flow matching), so its t is the
    timestep divided by that factor.
    """
    process = policy.forward_process
    t_model = policy.sampler.timesteps()[-1]
    unit = process.model_timestep(torch.ones(()))
    t = t_model if float(unit) == 1.0 else t_model / unit

    def renoise(clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return process.add_noise(clean, noise, t.expand(len(clean)).to(clean.device))

    return renoise


class RewardBackprop(AlgorithmBase):
    """Online algorithm whose loss is a chain sampled with gradients, scored by a differentiable reward."""

    online = True

    def __init__(
        self,
        policy: DiffusionPolicy,
        prompts: Sequence[Row],
        reward: Reward,
        config: RewardBackpropConfig,
        targets: Sequence[Row] = (),
    ):
        if not getattr(reward, "differentiable", False):
            raise ValueError(
                f"reward {getattr(reward, 'name', type(reward).__name__)!r} is not differentiable: reward backprop "
                "needs a reward whose gradient reaches the outputs (use a policy-gradient method such as ddpo)"
            )
        self.policy, self.prompts, self.reward, self.config = policy, list(prompts), reward, config
        self.samples_per_prompt = config.samples_per_prompt
        self.loss_fn: Callable[[torch.Tensor], torch.Tensor] = make_reward_backprop_loss(
            config.loss, **config.loss_options
        )
        self.num_steps = policy.sampler.num_steps
        self.bounds = self._check_truncation()
        self.renoise = last_step_renoise(policy) if config.last_step_repeats > 1 else None
        if targets and not config.uses_data:
            raise ValueError(
                "data.targets is only read by ReFL's pretraining loss (pretrain_loss_coef > 0); remove it or set it"
            )
        if config.uses_data and not targets:
            raise ValueError("pretrain_loss_coef > 0 needs real outputs of the prompts in data.targets")
        self.targets = (
            read_real_outputs(policy, self.prompts, targets, "ReFL's pretraining loss")
            if config.uses_data
            else {}
        )

    # ------------------------------------------------------------------------------------------ truncation
    def _check_truncation(self) -> tuple[int, int]:
        """The range the first gradient step is drawn from, checked against the sampler's `num_steps`."""
        cfg, n = self.config, self.num_steps
        if cfg.truncation == "last":
            k = n if cfg.backprop_steps is None else cfg.backprop_steps
            if k > n:
                raise ValueError(
                    f"backprop_steps (K = {k}) is larger than the sampler's {n} steps (model.num_steps); "
                    f"use K <= {n}, or null for every step"
                )
            return n - k, n - k
        if cfg.truncation == "gaussian":
            if cfg.truncation_range is not None:
                raise ValueError(
                    "truncation_range is for uniform and refl; gaussian uses truncation_mean/std"
                )
            mean = 0.84 * n if cfg.truncation_mean is None else cfg.truncation_mean
            if not 0 <= mean <= n - 1:
                raise ValueError(
                    f"truncation_mean must lie in [0, {n - 1}] (the sampler's steps), got {mean}"
                )
            return 0, n - 1
        if cfg.truncation_mean is not None or cfg.truncation_std is not None:
            raise ValueError(f"truncation_mean/std are for truncation: gaussian, not {cfg.truncation!r}")
        default = (
            (0, n - 1) if cfg.truncation == "uniform" else (min(math.ceil(0.75 * n - 1e-9), n - 1), n - 1)
        )
        lo, hi = cfg.truncation_range or default
        if hi > n - 1:
            raise ValueError(f"truncation_range {[lo, hi]} reaches past the sampler's last step ({n - 1})")
        return lo, hi

    def draw_start(self) -> int:
        """The first step with gradients for one batch (global RNG: resumed runs draw the same points)."""
        cfg, (lo, hi) = self.config, self.bounds
        if cfg.truncation in ("last", "uniform", "refl"):
            return int(torch.randint(lo, hi + 1, ()))
        mean = 0.84 * self.num_steps if cfg.truncation_mean is None else cfg.truncation_mean
        std = 0.1 * self.num_steps if cfg.truncation_std is None else cfg.truncation_std
        # AlignProp's code: int(N(mean, std)), redrawn until it is a step of the chain
        for _ in range(GAUSSIAN_DRAWS):
            start = math.floor(mean + std * float(torch.randn(())))
            if lo <= start <= hi:
                return start
        raise RuntimeError(f"no gaussian truncation point in [{lo}, {hi}] in {GAUSSIAN_DRAWS} draws")

    def window(self, start: int) -> GradientWindow:
        cfg = self.config
        return GradientWindow(
            start=start,
            end=start + 1 if cfg.truncation == "refl" else None,
            checkpoint=cfg.checkpointing,
            repeats=cfg.last_step_repeats,
            renoise=self.renoise,
        )

    # -------------------------------------------------------------------------------------------- rollout
    @torch.no_grad()
    def rollout(self, rows: Sequence[Row]) -> tuple[Batch, dict[str, float]]:
        """What this rollout's chains start from: prompts, conditioning, noise, truncation point (no sampling)."""
        k, policy = self.samples_per_prompt, self.policy
        prompts = [policy.prompt_of(r) for r in rows for _ in range(k)]
        n = len(prompts)
        conditioning = policy.encode_prompts(prompts)
        noise = policy.sampler.initial_noise((n, *policy.sample_shape), None, policy.device)
        start = self.draw_start()
        fields: dict[str, Any] = {
            "prompt": prompts,
            "reward_prompt": [policy.reward_prompt(r) for r in rows for _ in range(k)],
            "noise": noise,
            "start": torch.full((n,), start),
            **{f"cond.{key}": value for key, value in conditioning.items()},
        }
        if self.targets:  # one real output of the prompt, drawn per sample (ReFL's J_pre)
            fields["targets"] = draw_real_outputs(self.targets, prompts).to(noise.device)
        return Batch(**fields), {"rollout/backprop_steps": float(self._gradient_steps(start))}

    def _gradient_steps(self, start: int) -> int:
        return 1 if self.config.truncation == "refl" else self.num_steps - start

    # ----------------------------------------------------------------------------------------------- loss
    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sample loss: the sum of `loss_terms`."""
        return summed_terms(self.loss_terms(batch), type(self).__name__)

    def loss_terms(self, batch: Batch) -> list[LossTerm]:
        """The chain's reward loss (one graph through the sampled window), and ReFL's J_pre on its own graph."""
        batch = batch.to(self.policy.device)
        terms: list[LossTerm] = [partial(self._chain_loss, batch)]
        if self.config.uses_data:
            terms.append(partial(self._pretrain_loss, batch))
        return terms

    @staticmethod
    def _conditioning(batch: Batch) -> Conditioning:
        return {name[5:]: value for name, value in batch.fields.items() if name.startswith("cond.")}

    def _chain_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, policy = self.config, self.policy
        cond = self._conditioning(batch)
        sample = sample_with_gradients(
            lambda x, t: policy.predict(x, t, cond),
            policy.sampler,
            batch["noise"],
            self.window(int(batch["start"][0])),
        )
        losses, rewards = [], []
        for output in sample.outputs:
            decoded = policy.decode(output)
            self._guard_gradient(decoded)
            reward = score(self.reward, batch["reward_prompt"], decoded)
            rewards.append(reward.detach())
            losses.append(self.loss_fn(reward.float()))
        loss = torch.stack(losses).mean(0)
        reward = torch.stack(rewards).float()
        metrics = {"reward": reward.mean()}
        if reward.shape[1] > 1:
            metrics["reward_std"] = reward[0].std()
        if cfg.kl_coef:
            kl = self._kl(sample.steps, cond)
            loss = loss + cfg.kl_coef * kl
            metrics["kl"] = kl.detach().mean()
        return loss, metrics

    def _kl(self, steps: Sequence[Any], cond: Conditioning) -> torch.Tensor:
        """Σ over the gradient steps of the KL between the policy's and the reference's step Gaussians."""
        policy = self.policy
        total: torch.Tensor | None = None
        for step in steps:
            t = policy.sampler.timesteps(step.sample.device)[step.index]
            with torch.no_grad(), policy.reference():
                ref = policy.sampler.step(policy.predict(step.sample, t, cond), step.index, step.sample)
            std = step.output.std if bool((torch.as_tensor(step.output.std) > 0).all()) else 1.0
            kl = gaussian_kl(step.output.mean, ref.mean, std)
            total = kl if total is None else total + kl
        if total is None:
            raise ValueError("the KL needs at least one gradient step")
        return total

    def _guard_gradient(self, outputs: torch.Tensor) -> None:
        """Raise a `RewardError` naming the reward if its gradient w.r.t. the outputs is NaN/inf (during backward,
        before the optimizer step: nothing is applied and no checkpoint is written)."""
        if not outputs.requires_grad:
            return
        name = getattr(self.reward, "name", type(self.reward).__name__)

        def check(grad: torch.Tensor) -> None:
            bad = ~torch.isfinite(grad).flatten(1).all(1)
            if bad.any():
                rows = bad.nonzero().flatten().tolist()
                raise RewardError(
                    f"reward '{name}' has a non-finite gradient w.r.t. its inputs at batch indices {rows[:10]}; "
                    "the update was not applied"
                )

        outputs.register_hook(check)

    def _pretrain_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """ReFL's J_pre: the denoising loss on the real output drawn for each sample's prompt."""
        dloss = data_denoising_loss(self.policy, batch["targets"], self._conditioning(batch))
        return self.config.pretrain_loss_coef * dloss, {"pretrain_loss": dloss.detach().mean()}
