"""Policy gradient over denoising trajectories: DDPO, DPOK and DLPO for any `DiffusionPolicy`.

One rollout samples images (or spectrograms) with the trajectory recorded, scores the decoded outputs with a
reward, turns rewards into advantages (per-prompt normalisation with DDPO's stat tracker), and each update
re-scores a random subset of the recorded steps under the current weights:

- DDPO (Black et al. 2023; seed 004 §4.5.1): PPO-clip on the per-step likelihood ratio (`loss_type: ppo`) or the
  plain score function (`loss_type: reinforce`, DDPO-SF);
- DPOK (Fan et al. 2023; seed 004 §4.5.1): adds `kl_coef` × KL(p_θ(x_{t-1}|x_t) ‖ p_ref(x_{t-1}|x_t)), the KL
  between the two step Gaussians (same σ, so ‖μ_θ − μ_ref‖²/2σ², averaged over dimensions);
- DLPO (seed 004 §4.5.6): adds `diffusion_loss_coef` (β) × the diffusion model's own denoising loss, keeping the
  fine-tuned model a good denoiser. `diffusion_loss_on: data` computes it as DLPO's reference implementation
  does: the pretraining ε-loss on real outputs of the rollout's prompts (`data.targets`), freshly noised, once
  per sample and update;
  `samples` on the recorded trajectory itself (x_t and the noise implied by the policy's own final sample),
  which pulls the model towards its own samples, reward-hacked or not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from mmalign.core.data import Row
from mmalign.core.diffusion import gaussian_logprob
from mmalign.core.reward import Reward, score
from mmalign.objectives import policy_gradient as PG


@dataclass
class DiffusionPGConfig:
    """The `algorithm:` section of ddpo / dpok / dlpo recipes."""

    name: str = "ddpo"
    loss_type: str = "ppo"  # ppo (clipped ratio) | reinforce (DDPO-SF)
    clip_range: float = 1e-4
    max_abs_advantage: float = 5.0
    timestep_fraction: float = 1.0  # share of the stochastic steps trained on per sample
    # Which part of the sampler's steps may be trained on: step i of n (in sampling order) iff lo <= i/n < hi.
    # The log-prob gradient scales as 1/σ_t, so the last low-noise steps, which no longer decide what is drawn,
    # can dominate the update with noise; (0, 0.8) leaves out the last fifth, (0, 0.2) keeps the first fifth.
    train_step_range: tuple[float, float] = (0.0, 1.0)
    samples_per_prompt: int = 1
    stat_buffer: int = 32  # per-prompt reward history kept by the stat tracker
    stat_min_count: int = 16  # fewer rewards than this for a prompt: normalise with batch statistics
    per_prompt_stats: bool = True
    advantage_scale: str = (
        "prompt"  # prompt: DDPO's per-prompt std | batch: the batch's std (saturating rewards)
    )
    kl_coef: float = 0.0  # DPOK's β
    reward_coef: float = 1.0  # DPOK/DLPO's α on the policy-gradient term
    diffusion_loss_coef: float = 0.0  # DLPO's β on the denoising loss
    diffusion_loss_on: str = "samples"  # samples: the recorded trajectory | data: real outputs (data.targets)

    def __post_init__(self) -> None:
        if self.loss_type not in ("ppo", "reinforce"):
            raise ValueError(f"loss_type must be ppo or reinforce, got {self.loss_type!r}")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.diffusion_loss_on not in ("samples", "data"):
            raise ValueError(f"diffusion_loss_on must be samples or data, got {self.diffusion_loss_on!r}")
        lo, hi = self.train_step_range
        if not 0 <= lo < hi <= 1:
            raise ValueError(
                f"train_step_range must be (lo, hi) with 0 <= lo < hi <= 1, got {self.train_step_range}"
            )


class DiffusionPolicyGradient:
    """Online algorithm: rollouts of recorded trajectories, per-step PPO/REINFORCE, optional KL and denoising terms."""

    online = True

    def __init__(
        self,
        policy: Any,
        prompts: Sequence[Row],
        reward: Reward,
        config: DiffusionPGConfig,
        targets: Sequence[Row] = (),
    ):
        self.policy, self.prompts, self.reward, self.config = policy, list(prompts), reward, config
        self.samples_per_prompt = config.samples_per_prompt
        self.tracker = PG.PerPromptStatTracker(
            config.stat_buffer, config.stat_min_count, config.advantage_scale
        )
        self.targets = self._read_targets(targets)

    def _read_targets(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        """Real outputs per prompt for DLPO's data loss, read (named errors) before training; {} if unused."""
        cfg = self.config
        used = cfg.diffusion_loss_coef != 0 and cfg.diffusion_loss_on == "data"
        if not used:
            if rows:
                raise ValueError(
                    "data.targets is only used by DLPO's data loss (diffusion_loss_on: data with "
                    "diffusion_loss_coef != 0); remove it or enable that loss"
                )
            return {}
        if not rows:
            raise ValueError("diffusion_loss_on: data needs real outputs of the prompts in data.targets")
        if not hasattr(self.policy, "encode_target"):
            raise TypeError(f"{type(self.policy).__name__} cannot read real outputs (data.targets)")
        pools: dict[str, list[torch.Tensor]] = {}
        for row in rows:
            encoded = self.policy.encode_target(row)
            pools.setdefault(encoded["prompt"], []).append(encoded["latents"])
        for row in self.prompts:
            if row.data["prompt"] not in pools:
                raise row.error("prompt", "no real output for this prompt in data.targets (DLPO's data loss)")
        return {prompt: torch.stack(latents) for prompt, latents in pools.items()}

    @torch.no_grad()
    def rollout(self, rows: Sequence[Row]) -> tuple[list[dict[str, Any]], dict[str, float]]:
        from accelerate.utils import gather, gather_object

        cfg = self.config
        prompts = [r.data["prompt"] for r in rows for _ in range(cfg.samples_per_prompt)]
        trajectory = self.policy.sample(prompts, record=True)
        outputs = self.policy.decode(trajectory.final)
        rewards = score(self.reward, prompts, outputs).float().to(trajectory.logprobs.device)
        # Advantages from the rewards of every process, so each process normalises with the same statistics.
        all_prompts, all_rewards = gather_object(prompts), gather(rewards)
        if cfg.per_prompt_stats:
            advantages = self.tracker.update(list(all_prompts), all_rewards.cpu())
        else:
            advantages = (all_rewards - all_rewards.mean()) / (all_rewards.std() + 1e-6)
        rank_slice = slice(self._rank() * len(prompts), (self._rank() + 1) * len(prompts))
        advantages = PG.clip_advantages(advantages[rank_slice].to(rewards.device), cfg.max_abs_advantage)

        # One random subset of the stochastic steps per rollout, shared by its samples so that every trained
        # step is a single scheduler step with one timestep for the whole micro-batch.
        n_total = len(trajectory.timesteps)
        # step i (0 = the first, noisiest) is trainable iff lo <= i / n < hi (1e-9: 0.7 * 10 is 7.000000000000001)
        lo, hi = (math.ceil(f * n_total - 1e-9) for f in cfg.train_step_range)
        stochastic = trajectory.conditioning["stochastic"].clone()
        stochastic[:lo], stochastic[hi:] = False, False
        usable = stochastic.nonzero().flatten()
        if len(usable) == 0:
            raise ValueError(f"train_step_range {cfg.train_step_range} leaves no stochastic step to train on")
        n_train = max(1, round(cfg.timestep_fraction * len(usable)))
        steps = usable[torch.randperm(len(usable))[:n_train]].sort().values
        examples = []
        for i in range(len(prompts)):
            examples.append(
                {
                    "prompt": prompts[i],
                    "latents": trajectory.latents[i, steps],
                    "next_latents": trajectory.next_latents[i, steps],
                    "timesteps": trajectory.timesteps[steps],
                    "old_logprobs": trajectory.logprobs[i, steps],
                    "conditioning": self.policy.conditioning_of(trajectory, i),
                    "advantage": advantages[i],
                }
            )
            if self.targets:  # one real output of the prompt, drawn per sample (DLPO's data loss)
                pool = self.targets[prompts[i]]
                examples[-1]["target"] = pool[int(torch.randint(len(pool), ()))]
        metrics = {
            "rollout/reward": all_rewards.mean().item(),
            "rollout/reward_std": all_rewards.std().item(),
        }
        return examples, metrics

    @staticmethod
    def _rank() -> int:
        from accelerate.state import PartialState

        return PartialState().process_index

    def loss(self, examples: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sample loss: the sum of `loss_terms`."""
        total, sums = None, {}
        for term in self._terms(examples):
            losses, metrics = term()
            total = losses if total is None else total + losses
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v
        return total, sums

    def loss_terms(self, examples: Sequence[dict[str, Any]]) -> list[Callable[[], tuple[torch.Tensor, dict]]]:
        """The loss as closures the trainer backwards one at a time, each with its own graph."""
        return self._terms(examples)

    def _terms(self, examples: Sequence[dict[str, Any]]) -> list[Callable[[], tuple[torch.Tensor, dict]]]:
        """One term per trained denoising step, and DLPO's real-data term once: it draws its own (ε, t),
        independent of the trained steps."""
        n_steps = examples[0]["timesteps"].shape[0]
        terms = [partial(self._step_loss, examples, j, n_steps) for j in range(n_steps)]
        if self.config.diffusion_loss_coef and self.config.diffusion_loss_on == "data":
            terms.append(partial(self._data_loss, examples))
        return terms

    def _data_loss(self, examples: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """β × DLPO's pretraining ε-loss on the real output drawn for each sample's prompt."""
        dloss = self.policy.data_denoising_loss(self.policy.step_batch(examples, 0))
        return self.config.diffusion_loss_coef * dloss, {"diffusion_loss": dloss.detach().mean()}

    def _step_loss(
        self, examples: Sequence[dict[str, Any]], j: int, n_steps: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Step j's share (1/n_steps) of the per-sample loss and its metrics."""
        cfg = self.config
        adv = torch.stack([e["advantage"] for e in examples])
        step = self.policy.step_batch(examples, j)
        mean, std = self.policy.step_distribution(step)
        logp = gaussian_logprob(step["next_latents"], mean, std)
        old = torch.stack([e["old_logprobs"][j] for e in examples]).to(logp.device)
        if cfg.loss_type == "ppo":
            losses, metrics = PG.ppo_clip_loss(logp, old, adv, cfg.clip_range)
        else:
            losses, metrics = PG.reinforce_loss(logp, adv), {}
        losses = cfg.reward_coef * losses
        if cfg.kl_coef:
            with torch.no_grad(), self.policy.reference():
                ref_mean, _ = self.policy.step_distribution(step)
            kl = ((mean - ref_mean) ** 2).flatten(1).mean(1) / (2 * std**2)
            losses = losses + cfg.kl_coef * kl
            metrics = {**metrics, "kl": kl.detach().mean()}
        if cfg.diffusion_loss_coef and cfg.diffusion_loss_on == "samples":
            dloss = self.policy.trajectory_denoising_loss(step)
            losses = losses + cfg.diffusion_loss_coef * dloss
            metrics = {**metrics, "diffusion_loss": dloss.detach().mean()}
        metrics = {k: v.detach() / n_steps for k, v in metrics.items()}
        if j == 0:
            metrics["advantage_abs"] = adv.abs().mean()
        return losses / n_steps, metrics

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "tracker" in state:
            self.tracker.load_state_dict(state["tracker"])
