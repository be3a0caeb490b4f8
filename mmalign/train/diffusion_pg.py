"""Policy gradient over denoising trajectories: DDPO, DPOK and DLPO for any `DiffusionPolicy`.

One rollout samples images (or spectrograms) with the trajectory recorded, scores the decoded outputs with a
reward, turns rewards into advantages (per-prompt normalisation with DDPO's stat tracker), and each update
re-scores a random subset of the recorded steps under the current weights:

Advantages come from any estimator of `mmalign.objectives.advantages` by name (`advantage`): DDPO's per-prompt
tracker by default, GRPO's group normalisation over `samples_per_prompt` samples of a prompt, RLOO, ...

- DDPO (Black et al. 2023; seed 004 §4.5.1): PPO-clip on the per-step likelihood ratio (`loss_type: ppo`) or the
  plain score function (`loss_type: reinforce`, DDPO-SF);
- DPOK (Fan et al. 2023; seed 004 §4.5.1): adds `kl_coef` × KL(p_θ(x_{t-1}|x_t) ‖ p_ref(x_{t-1}|x_t)), the KL
  between the two step Gaussians (same σ, so ‖μ_θ − μ_ref‖²/2σ², averaged over dimensions);
- DLPO (seed 004 §4.5.6): adds `diffusion_loss_coef` (β) × the diffusion model's own denoising loss, keeping the
  fine-tuned model a good denoiser. `diffusion_loss_on: data` computes it as DLPO's reference implementation
  does: the pretraining loss on real outputs of the rollout's prompts (`data.targets`), freshly noised, once
  per sample and update; `samples` on the recorded trajectory itself (x_t and the noise implied by the policy's own
  final sample), which pulls the model towards its own samples, reward-hacked or not.
- Flow-GRPO (Liu et al. 2025, arXiv:2505.05470): this algorithm on a flow-matching policy sampled with its SDE,
  `advantage: grpo` (or `batch`: Flow-GRPO's `global_std`) over `samples_per_prompt` samples, `kl_coef` (its β) and
  the clipped ratio; Flow-GRPO-Fast / MixGRPO add `sde_window_size` (a random SDE window per rollout, recorded in
  the rollout so re-scoring uses the step types it was sampled with) and `same_latent`.

A rollout is one `Batch` of tensors from sampling to loss: sample i's trained steps are `steps[i]` (the same for
every sample of a rollout, so each trained step is one sampler step for the whole micro-batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from mmalign.core.data import Row
from mmalign.core.diffusion_policy import concat_conditioning
from mmalign.core.policy import DiffusionPolicy
from mmalign.core.reward import Reward, score
from mmalign.core.sampler import WindowedSampler
from mmalign.core.types import Batch, Conditioning
from mmalign.objectives import policy_gradient as PG
from mmalign.objectives.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimator,
    PerPromptStatTracker,
    RewardGroups,
    clip_advantages,
    make_advantage_estimator,
)
from mmalign.objectives.diffusion import denoising_error, gaussian_kl, gaussian_logprob
from mmalign.train.algorithm import AlgorithmBase, LossTerm, summed_terms
from mmalign.train.distributed import this_process


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
    # per_prompt: DDPO's stat tracker · reinforce: the batch's mean and std · grpo / dr_grpo / batch / rloo: over
    # the samples_per_prompt samples of each prompt (mmalign.objectives.advantages)
    advantage: str = "per_prompt"
    stat_buffer: int = 32  # per_prompt: reward history kept per prompt
    stat_min_count: int = (
        16  # per_prompt: fewer rewards than this for a prompt: normalise with batch statistics
    )
    advantage_scale: str = (
        "prompt"  # per_prompt: prompt = DDPO's per-prompt std | batch = the batch's std (saturating rewards)
    )
    # Flow-GRPO-Fast / MixGRPO (flow-matching SDE samplers): each rollout draws noise only in a window of
    # `sde_window_size` consecutive steps whose start is drawn uniformly so the window lies in `sde_window_range`
    # [lo, hi) (default: all steps); the other steps are ODE steps. 0 = the sampler's own steps.
    sde_window_size: int = 0
    sde_window_range: tuple[int, int] | None = None
    same_latent: bool = (
        False  # the samples of a prompt start from one initial noise (Flow-GRPO's same_latent)
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
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.advantage not in ADVANTAGE_ESTIMATORS:
            raise ValueError(
                f"advantage must be one of {', '.join(ADVANTAGE_ESTIMATORS)}, got {self.advantage!r}"
            )
        if self.advantage in ("rloo", "grpo", "dr_grpo", "batch") and self.samples_per_prompt < 2:
            raise ValueError(
                f"advantage {self.advantage!r} compares the samples of a prompt: samples_per_prompt >= 2"
            )
        if self.sde_window_size < 0:
            raise ValueError(f"sde_window_size must be >= 0, got {self.sde_window_size}")
        if self.sde_window_range is not None:
            if self.sde_window_size == 0:
                raise ValueError(
                    "sde_window_range places a window of sde_window_size steps: set sde_window_size"
                )
            lo, hi = self.sde_window_range
            if not 0 <= lo < hi or hi - lo < self.sde_window_size:
                raise ValueError(
                    f"sde_window_range must be [lo, hi) with 0 <= lo < hi and hi - lo >= sde_window_size="
                    f"{self.sde_window_size}, got {list(self.sde_window_range)}"
                )
        if self.same_latent and self.samples_per_prompt < 2:
            raise ValueError(
                "same_latent shares one initial noise among a prompt's samples: samples_per_prompt >= 2"
            )

    def estimator(self) -> AdvantageEstimator:
        """The advantage estimator these settings name (DDPO's batch normalisation for `reinforce`)."""
        if self.advantage == "per_prompt":
            return PerPromptStatTracker(self.stat_buffer, self.stat_min_count, self.advantage_scale)
        if self.advantage == "reinforce":
            return make_advantage_estimator("reinforce", scale=True, eps=1e-6)
        return make_advantage_estimator(self.advantage)

    @property
    def uses_data(self) -> bool:
        """Whether DLPO's term on real outputs (data.targets) is part of the loss."""
        return self.diffusion_loss_coef != 0 and self.diffusion_loss_on == "data"


def trajectory_denoising_loss(
    policy: DiffusionPolicy, latents: torch.Tensor, t: torch.Tensor, final: torch.Tensor, cond: Conditioning
) -> torch.Tensor:
    """DLPO's penalty read literally on the sampled trajectory: ‖ε̃ − ε_θ(x_t, c, t)‖², ε̃ the noise that takes the
    final sample to the recorded x_t. It regresses the model onto its own (guided) samples, whatever they are."""
    process = policy.forward_process
    noise = process.implied_noise(latents, final, t).detach()
    target = process.target(final, noise, t).detach()
    output = policy.predict(latents, process.model_timestep(t).expand(len(latents)), cond, guidance=1.0)
    return ((output - target) ** 2).flatten(1).mean(1)


def data_denoising_loss(policy: DiffusionPolicy, clean: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """DLPO's penalty on real data: the pretraining loss of real outputs of the prompts (seed 004 §4.5.6).

    ‖target − model(x_t, c, t)‖² with x_t the forward process applied to a real output x_0 of the prompt, fresh noise
    and a fresh training timestep, as DLPO's reference implementation noises the prompt's recording. The sampler
    guides with the empty prompt too, so its branch gets the same loss: per sample ½(‖· (c)‖² + ‖· (∅)‖²), both on the
    same (noise, t), in one forward of both branches.
    """
    n = len(clean)
    process = policy.forward_process
    noise = torch.randn(clean.shape, dtype=clean.dtype).to(clean.device)
    t = process.sample_timesteps(n).to(clean.device)
    both = concat_conditioning(cond, policy.unconditional(n))
    x0, eps, tt = torch.cat([clean, clean]), torch.cat([noise, noise]), torch.cat([t, t])
    output = policy.predict(process.add_noise(x0, eps, tt), process.model_timestep(tt), both, guidance=1.0)
    loss = denoising_error(output, process.target(x0, eps, tt))
    conditional, unconditional = loss.chunk(2)
    return 0.5 * (conditional + unconditional)


def read_real_outputs(
    policy: DiffusionPolicy, prompts: Sequence[Row], rows: Sequence[Row], purpose: str
) -> dict[str, torch.Tensor]:
    """Real outputs (`data.targets`) encoded and pooled by prompt; every prompt row must have one (named error).

    Read before training, for a loss on real data (DLPO's data term, ReFL's pretraining loss: `purpose`).
    """
    pools: dict[str, list[torch.Tensor]] = {}
    for row in rows:
        encoded = policy.encode_target(row)
        pools.setdefault(encoded["prompt"], []).append(encoded["latents"])
    for row in prompts:
        if row.data["prompt"] not in pools:
            raise row.error("prompt", f"no real output for this prompt in data.targets ({purpose})")
    return {prompt: torch.stack(latents) for prompt, latents in pools.items()}


def draw_real_outputs(pools: dict[str, torch.Tensor], prompts: Sequence[str]) -> torch.Tensor:
    """One real output of each prompt, drawn uniformly from its pool (the global RNG, so resume is exact)."""
    return torch.stack([pools[p][int(torch.randint(len(pools[p]), ()))] for p in prompts])


def trainable_steps(stochastic: torch.Tensor, step_range: tuple[float, float]) -> torch.Tensor:
    """Indices of the steps a policy gradient may train on: stochastic, and lo <= i/n < hi."""
    n_total = len(stochastic)
    # step i (0 = the first, noisiest) is trainable iff lo <= i / n < hi (1e-9: 0.7 * 10 is 7.000000000000001)
    lo, hi = (math.ceil(f * n_total - 1e-9) for f in step_range)
    usable = stochastic.clone()
    usable[:lo], usable[hi:] = False, False
    return usable.nonzero().flatten()


class DiffusionPolicyGradient(AlgorithmBase):
    """Online algorithm: rollouts of recorded trajectories, per-step PPO/REINFORCE, optional KL and denoising terms."""

    online = True

    def __init__(
        self,
        policy: DiffusionPolicy,
        prompts: Sequence[Row],
        reward: Reward,
        config: DiffusionPGConfig,
        targets: Sequence[Row] = (),
    ):
        self.policy, self.prompts, self.reward, self.config = policy, list(prompts), reward, config
        self.samples_per_prompt = config.samples_per_prompt
        self.advantages = config.estimator()
        self.window_range = self._window_range()
        if not trainable_steps(self._stochastic(), config.train_step_range).numel():
            raise ValueError(
                f"the sampler has no stochastic step in train_step_range {config.train_step_range}: a policy "
                "gradient needs steps that draw noise (DDIM with eta > 0; a flow model with an SDE sde_type and "
                "noise_level > 0)"
            )
        if config.diffusion_loss_coef and config.diffusion_loss_on == "samples":
            probe = torch.tensor([1.0])
            if not torch.equal(policy.forward_process.model_timestep(probe), probe):
                raise ValueError(
                    "diffusion_loss_on: samples reads the sampler's timesteps as forward-process timesteps, which "
                    "differ for this model (flow matching: σ vs σ·1000); use diffusion_loss_on: data"
                )
        self.targets = self._read_targets(targets)

    def _window_range(self) -> tuple[int, int] | None:
        """Where a rollout's SDE window may lie, checked against the sampler before training (None: no window)."""
        cfg, sampler = self.config, self.policy.sampler
        if not cfg.sde_window_size:
            return None
        if not isinstance(sampler, WindowedSampler) or getattr(sampler, "sde_type", "ode") == "ode":
            raise ValueError(
                "sde_window_size moves an SDE window over the steps: it needs a flow-matching model sampling with "
                "an SDE (model.sde_type flow_grpo or dance_grpo)"
            )
        lo, hi = cfg.sde_window_range or (0, sampler.num_steps)
        if hi > sampler.num_steps:
            raise ValueError(
                f"sde_window_range {[lo, hi]} runs past the sampler's {sampler.num_steps} steps (model.num_steps)"
            )
        size = cfg.sde_window_size
        for start in range(lo, hi - size + 1):
            window = torch.tensor([start <= i < start + size for i in range(sampler.num_steps)])
            if not trainable_steps(window, cfg.train_step_range).numel():
                raise ValueError(
                    f"the SDE window [{start}, {start + size}) that sde_window_range {[lo, hi]} allows has no step "
                    f"in train_step_range {cfg.train_step_range}"
                )
        return lo, hi

    def _stochastic(self) -> torch.Tensor:
        sampler = self.policy.sampler
        if self.window_range is not None:  # some window of the range: every step of the range may draw noise
            lo, hi = self.window_range
            return torch.tensor([lo <= i < hi for i in range(sampler.num_steps)])
        return torch.tensor([sampler.is_stochastic(i) for i in range(sampler.num_steps)])

    def _rollout_window(self) -> tuple[int, int] | None:
        """This rollout's SDE window [start, start + size), start uniform over the allowed range."""
        if self.window_range is None:
            return None
        lo, hi = self.window_range
        start = int(torch.randint(lo, hi - self.config.sde_window_size + 1, ()))
        return start, start + self.config.sde_window_size

    def _sampler(self, window: torch.Tensor | None) -> Any:
        """The sampler a rollout was drawn with: the policy's, or its copy with the rollout's SDE window."""
        sampler = self.policy.sampler
        if window is None:
            return sampler
        assert isinstance(sampler, WindowedSampler)  # _window_range checked it before training
        return sampler.with_window((int(window[0]), int(window[1])))

    def _initial_noise(self, n: int) -> torch.Tensor | None:
        """One initial noise per prompt, repeated over its samples (`same_latent`); None: the sampler draws."""
        if not self.config.same_latent:
            return None
        k, policy = self.config.samples_per_prompt, self.policy
        draw = policy.sampler.initial_noise((n // k, *policy.sample_shape), None, policy.device)
        return draw.repeat_interleave(k, dim=0)

    def _read_targets(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        """Real outputs per prompt for DLPO's data loss, read (named errors) before training; {} if unused."""
        if not self.config.uses_data:
            if rows:
                raise ValueError(
                    "data.targets is only used by DLPO's data loss (diffusion_loss_on: data with "
                    "diffusion_loss_coef != 0); remove it or enable that loss"
                )
            return {}
        if not rows:
            raise ValueError("diffusion_loss_on: data needs real outputs of the prompts in data.targets")
        return read_real_outputs(self.policy, self.prompts, rows, "DLPO's data loss")

    def setup(self) -> None:
        """Nothing to precompute."""

    @torch.no_grad()
    def rollout(self, rows: Sequence[Row]) -> tuple[Batch, dict[str, float]]:
        from accelerate.utils import gather, gather_object

        cfg, policy = self.config, self.policy
        prompts = [policy.prompt_of(r) for r in rows for _ in range(cfg.samples_per_prompt)]
        window = self._rollout_window()
        window_tensor = None if window is None else torch.tensor(window)
        trajectory = policy.sample(
            prompts,
            record=True,
            initial=self._initial_noise(len(prompts)),
            sampler=self._sampler(window_tensor),
        )
        outputs = policy.decode(trajectory.final)
        reward_prompts = [policy.reward_prompt(r) for r in rows for _ in range(cfg.samples_per_prompt)]
        rewards = score(self.reward, reward_prompts, outputs).float().to(trajectory.logprobs.device)
        # Advantages from the rewards of every process, so each process normalises with the same statistics.
        all_prompts, all_rewards = gather_object(prompts), gather(rewards)
        groups = RewardGroups(cfg.samples_per_prompt, [str(p) for p in all_prompts])
        advantages = self.advantages(all_rewards.cpu(), groups)
        advantages = clip_advantages(
            this_process(advantages, len(prompts)).to(rewards.device), cfg.max_abs_advantage
        )

        # One random subset of the stochastic steps per rollout, shared by its samples so that every trained
        # step is a single sampler step for the whole micro-batch.
        usable = trainable_steps(trajectory.stochastic, cfg.train_step_range)
        n_train = max(1, round(cfg.timestep_fraction * len(usable)))
        steps = usable[torch.randperm(len(usable))[:n_train]].sort().values
        n = len(prompts)
        fields: dict[str, Any] = {
            "prompt": prompts,
            "steps": steps.expand(n, -1),
            "latents": trajectory.latents[:, steps],
            "next_latents": trajectory.next_latents[:, steps],
            "old_logprobs": trajectory.logprobs[:, steps],
            "final": trajectory.final,
            "advantages": advantages,
            **{f"cond.{k}": v for k, v in trajectory.conditioning.items()},
        }
        if window_tensor is not None:  # re-scoring must use the step types the rollout was sampled with
            fields["sde_window"] = window_tensor.expand(n, -1)
        if self.targets:  # one real output of the prompt, drawn per sample (DLPO's data loss)
            fields["targets"] = draw_real_outputs(self.targets, prompts).to(trajectory.final.device)
        metrics = {
            "rollout/reward": all_rewards.mean().item(),
            "rollout/reward_std": all_rewards.std().item(),
        }
        return Batch(**fields), metrics

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sample loss: the sum of `_terms` (not of `loss_terms`, which a subclass may replace by one backward of
        this loss, as the per-step-backward test does)."""
        return summed_terms(self._terms(batch), type(self).__name__)

    def loss_terms(self, batch: Batch) -> list[LossTerm]:
        """The loss as closures the trainer backwards one at a time, each with its own graph."""
        return self._terms(batch)

    def _terms(self, batch: Batch) -> list[LossTerm]:
        """One term per trained denoising step, and DLPO's real-data term once: it draws its own (noise, t),
        independent of the trained steps."""
        n_steps = batch["steps"].shape[1]
        batch = batch.to(self.policy.device)
        terms: list[LossTerm] = [partial(self._step_loss, batch, j, n_steps) for j in range(n_steps)]
        if self.config.uses_data:
            terms.append(partial(self._data_loss, batch))
        return terms

    @staticmethod
    def _conditioning(batch: Batch) -> Conditioning:
        return {name[5:]: value for name, value in batch.fields.items() if name.startswith("cond.")}

    def _data_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """β × DLPO's pretraining loss on the real output drawn for each sample's prompt."""
        dloss = data_denoising_loss(self.policy, batch["targets"], self._conditioning(batch))
        return self.config.diffusion_loss_coef * dloss, {"diffusion_loss": dloss.detach().mean()}

    def _step_loss(self, batch: Batch, j: int, n_steps: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Step j's share (1/n_steps) of the per-sample loss and its metrics."""
        cfg, policy = self.config, self.policy
        adv = batch["advantages"]
        index = int(batch["steps"][0, j])
        x, x_next = batch["latents"][:, j], batch["next_latents"][:, j]
        cond = self._conditioning(batch)
        sampler = self._sampler(batch["sde_window"][0] if "sde_window" in batch else None)
        t = sampler.timesteps(x.device)[index]
        step = sampler.step(policy.predict(x, t, cond), index, x)
        logp = gaussian_logprob(x_next, step.mean, step.std)
        old = batch["old_logprobs"][:, j].to(logp.device)
        if cfg.loss_type == "ppo":
            losses, metrics = PG.ppo_clip_loss(logp, old, adv, cfg.clip_range)
        else:
            losses, metrics = PG.reinforce_loss(logp, adv), {}
        losses = cfg.reward_coef * losses
        if cfg.kl_coef:
            with torch.no_grad(), policy.reference():
                ref = sampler.step(policy.predict(x, t, cond), index, x)
            kl = gaussian_kl(step.mean, ref.mean, step.std)
            losses = losses + cfg.kl_coef * kl
            metrics = {**metrics, "kl": kl.detach().mean()}
        if cfg.diffusion_loss_coef and cfg.diffusion_loss_on == "samples":
            dloss = trajectory_denoising_loss(policy, x, t, batch["final"], cond)
            losses = losses + cfg.diffusion_loss_coef * dloss
            metrics = {**metrics, "diffusion_loss": dloss.detach().mean()}
        metrics = {k: v.detach() / n_steps for k, v in metrics.items()}
        if j == 0:
            metrics["advantage_abs"] = adv.abs().mean()
        return losses / n_steps, metrics

    def state_dict(self) -> dict[str, Any]:
        return {"advantages": self.advantages.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.advantages.load_state_dict(state["advantages"])
