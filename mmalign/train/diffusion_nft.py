"""DiffusionNFT: online reinforcement of a diffusion policy on its forward process, without log-probs or CFG.

Zheng et al. 2025 (DiffusionNFT, arXiv:2509.16117, ICLR 2026). One rollout:

1. the old policy samples `samples_per_prompt` outputs per prompt with ANY sampler (the policy's own: the ODE of
   a flow model, DDIM with η = 0, an SDE: no trajectory is kept, only the clean samples x₀);
2. a reward scores them; advantages come from the shared estimators (`advantage: grpo`, or `batch` for the
   reference's global std) and become optimality probabilities r = ½ + ½·clip(A/`max_abs_advantage`, −1, 1);
3. each sample is noised by the forward process at `timesteps_per_sample` training timesteps (fresh ε, t), and the
   old policy's unguided prediction there is recorded.

Each update then trains the current policy's unguided (CFG-free) prediction with `nft_loss`: towards the implicit
positive policy's target on samples with r > ½ and away on those with r < ½, plus `kl_coef`·‖v_θ − v_ref‖² to the
base model (the reference code's `train.beta`). The old policy is the sampling policy: by default the weights at
rollout time (on-policy); `old_decay_rate` > 0 keeps it as the reference code's soft-updated copy,
θ_old ← η·θ_old + (1 − η)·θ with η = min(rate·k, `old_decay_max`) at rollout k, and samples with it.

The objective needs only a forward process and a prediction that is linear in the score (velocity, ε or v), so it
runs on flow-matching models and on DDPM-family models (SD 1.5, SDXL, speech) alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from mmalign.core.data import Row
from mmalign.core.policy import DiffusionPolicy
from mmalign.core.reward import Reward, score
from mmalign.core.types import Batch, Conditioning
from mmalign.objectives.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimator,
    RewardGroups,
    make_advantage_estimator,
)
from mmalign.objectives.diffusion import nft_loss, nft_optimality
from mmalign.train.algorithm import AlgorithmBase, LossTerm, summed_terms
from mmalign.train.distributed import this_process

GROUP_ESTIMATORS = ("grpo", "dr_grpo", "batch", "rloo")


@dataclass
class DiffusionNFTConfig:
    """The `algorithm:` section of diffusion_nft recipes (names of the reference code in comments)."""

    name: str = "diffusion_nft"
    beta: float = 1.0  # the implicit policies' step β (config.beta)
    samples_per_prompt: int = 8  # sample.num_image_per_prompt
    advantage: str = "grpo"  # grpo: per-prompt std · batch: the rollout's std (sample.global_std: true)
    max_abs_advantage: float = 5.0  # train.adv_clip_max: r = ½ + ½·clip(A / this, −1, 1)
    timesteps_per_sample: int = 4  # forward-process (ε, t) draws trained per sample and rollout
    adaptive_weighting: bool = True  # divide each branch's error by its detached mean absolute error
    kl_coef: float = 0.0  # train.beta: ‖v_θ − v_ref‖² to the base model
    rollout_guidance: float | None = (
        None  # sampling guidance; null = model.guidance_scale (1 = CFG-free rollouts)
    )
    old_decay_rate: float = 0.0  # η_k = min(rate·k, old_decay_max); 0 = on-policy (θ_old = θ at each rollout)
    old_decay_max: float = 0.5

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.samples_per_prompt < 2:
            raise ValueError(
                f"samples_per_prompt must be >= 2 (the samples of a prompt are split into better and worse), "
                f"got {self.samples_per_prompt}"
            )
        if self.advantage not in GROUP_ESTIMATORS:
            raise ValueError(
                f"advantage must be one of {', '.join(GROUP_ESTIMATORS)} (of {', '.join(ADVANTAGE_ESTIMATORS)}, "
                f"the ones that compare a prompt's samples), got {self.advantage!r}"
            )
        if not self.max_abs_advantage > 0:
            raise ValueError(f"max_abs_advantage must be > 0, got {self.max_abs_advantage}")
        if self.timesteps_per_sample < 1:
            raise ValueError(f"timesteps_per_sample must be >= 1, got {self.timesteps_per_sample}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.rollout_guidance is not None and not self.rollout_guidance >= 1:
            raise ValueError(f"rollout_guidance must be >= 1 (1 = no guidance), got {self.rollout_guidance}")
        if self.old_decay_rate < 0 or not 0 <= self.old_decay_max < 1:
            raise ValueError(
                f"old_decay_rate must be >= 0 and old_decay_max in [0, 1), got {self.old_decay_rate}, "
                f"{self.old_decay_max}"
            )

    def estimator(self) -> AdvantageEstimator:
        return make_advantage_estimator(self.advantage)


class DiffusionNFT(AlgorithmBase):
    """Online algorithm: clean samples of the old policy, forward-process noising, the NFT loss per timestep."""

    online = True

    def __init__(
        self, policy: DiffusionPolicy, prompts: Sequence[Row], reward: Reward, config: DiffusionNFTConfig
    ):
        self.policy, self.prompts, self.reward, self.config = policy, list(prompts), reward, config
        self.samples_per_prompt = config.samples_per_prompt
        self.advantages = config.estimator()
        self.rollouts = 0  # rollouts drawn so far: the old policy's soft-update schedule counts them
        self.old_weights: dict[str, torch.Tensor] | None = None

    # ---------------------------------------------------------------------------------- old policy
    def _decay(self) -> float:
        return min(self.config.old_decay_rate * self.rollouts, self.config.old_decay_max)

    def _update_old(self) -> None:
        """θ_old ← η·θ_old + (1 − η)·θ (kept only when it can differ from θ, i.e. with a soft update)."""
        if not self.config.old_decay_rate:
            return
        current, eta = self.policy.trainable_state_dict(), self._decay()
        if self.old_weights is None:
            self.old_weights = current
            return
        self.old_weights = {k: eta * self.old_weights[k] + (1 - eta) * v for k, v in current.items()}

    @contextmanager
    def _old_policy(self) -> Iterator[None]:
        """Inside, the policy's trained weights are the old policy's (a no-op when on-policy)."""
        if self.old_weights is None:
            yield
            return
        current = self.policy.trainable_state_dict()
        self.policy.load_trainable_state_dict(self.old_weights)
        try:
            yield
        finally:
            self.policy.load_trainable_state_dict(current)

    @contextmanager
    def _rollout_guidance(self) -> Iterator[None]:
        guidance, own = self.config.rollout_guidance, self.policy.guidance_scale
        if guidance is not None:
            self.policy.guidance_scale = guidance
        try:
            yield
        finally:
            self.policy.guidance_scale = own

    # ---------------------------------------------------------------------------------------- rollout
    @torch.no_grad()
    def rollout(self, rows: Sequence[Row]) -> tuple[Batch, dict[str, float]]:
        from accelerate.utils import gather, gather_object

        cfg, policy = self.config, self.policy
        k = cfg.samples_per_prompt
        prompts = [policy.prompt_of(r) for r in rows for _ in range(k)]
        self._update_old()
        with self._old_policy():
            with self._rollout_guidance():
                trajectory = policy.sample(prompts, record=False)
            clean, conditioning = trajectory.final, trajectory.conditioning
            outputs = policy.decode(clean)
            reward_prompts = [policy.reward_prompt(r) for r in rows for _ in range(k)]
            rewards = score(self.reward, reward_prompts, outputs).float().to(clean.device)
            all_prompts, all_rewards = gather_object(prompts), gather(rewards)
            groups = RewardGroups(k, [str(p) for p in all_prompts])
            advantages = self.advantages(all_rewards.cpu(), groups)
            advantages = this_process(advantages, len(prompts)).to(clean.device)
            noisy, timesteps, targets, old = self._noised(clean, conditioning)
        self.rollouts += 1
        optimality = nft_optimality(advantages, cfg.max_abs_advantage)
        batch = Batch(
            prompt=prompts,
            noisy=noisy,
            timesteps=timesteps,
            targets=targets,
            old_outputs=old,
            optimality=optimality,
            **{f"cond.{name}": value for name, value in conditioning.items()},
        )
        metrics = {
            "rollout/reward": all_rewards.mean().item(),
            "rollout/reward_std": all_rewards.std().item(),
            "rollout/positive_share": (optimality > 0.5).float().mean().item(),
        }
        return batch, metrics

    def _noised(
        self, clean: torch.Tensor, conditioning: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`timesteps_per_sample` forward-process draws per sample and the old policy's unguided prediction there."""
        policy, process = self.policy, self.policy.forward_process
        n, j = len(clean), self.config.timesteps_per_sample
        noisy, timesteps, targets, old = [], [], [], []
        for _ in range(j):
            noise = torch.randn(clean.shape, dtype=clean.dtype).to(clean.device)
            t = process.sample_timesteps(n).to(clean.device)
            x_t = process.add_noise(clean, noise, t)
            old.append(policy.predict(x_t, process.model_timestep(t), conditioning, guidance=1.0).float())
            noisy.append(x_t)
            timesteps.append(t)
            targets.append(process.target(clean, noise, t))
        return torch.stack(noisy, 1), torch.stack(timesteps, 1), torch.stack(targets, 1), torch.stack(old, 1)

    # ------------------------------------------------------------------------------------------ loss
    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sample loss: the sum of `loss_terms`."""
        return summed_terms(self.loss_terms(batch), type(self).__name__)

    def loss_terms(self, batch: Batch) -> list[LossTerm]:
        """One term per recorded forward-process draw, each with its own graph."""
        batch = batch.to(self.policy.device)
        n_draws = batch["timesteps"].shape[1]
        return [partial(self._draw_loss, batch, j, n_draws) for j in range(n_draws)]

    def _draw_loss(self, batch: Batch, j: int, n_draws: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Draw j's share (1/n_draws) of the per-sample NFT loss, CFG-free, and its metrics."""
        cfg, policy = self.config, self.policy
        process = policy.forward_process
        cond = {name[5:]: value for name, value in batch.fields.items() if name.startswith("cond.")}
        x_t, t = batch["noisy"][:, j], batch["timesteps"][:, j]
        timestep = process.model_timestep(t)
        output = policy.predict(x_t, timestep, cond, guidance=1.0)
        losses, metrics = nft_loss(
            output,
            batch["old_outputs"][:, j],
            batch["targets"][:, j],
            batch["optimality"],
            cfg.beta,
            adaptive=cfg.adaptive_weighting,
        )
        if cfg.kl_coef:
            with torch.no_grad(), policy.reference():
                reference = policy.predict(x_t, timestep, cond, guidance=1.0)
            kl = ((output.float() - reference.float()) ** 2).flatten(1).mean(1)
            losses = losses + cfg.kl_coef * kl
            metrics = {**metrics, "kl": kl.detach().mean()}
        return losses / n_draws, {name: value / n_draws for name, value in metrics.items()}

    # ------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"advantages": self.advantages.state_dict(), "rollouts": self.rollouts}
        if self.old_weights is not None:
            state["old_weights"] = self.old_weights
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.advantages.load_state_dict(state["advantages"])
        self.rollouts = int(state["rollouts"])
        self.old_weights = state.get("old_weights")
