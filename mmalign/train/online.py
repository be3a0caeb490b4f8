"""Online methods for sequence policies: prompts → sample → reward → objective.

`OnlineDPO` (OAIF-style, Guo et al. 2024; seed 004 §4.2.1): two samples per prompt, ranked by a reward, trained
with any offline preference loss. `SequencePolicyGradient`: REINFORCE / RLOO / GRPO-style advantages with the
PPO-clip surrogate and an optional KL penalty to the reference (seed 004 §4.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmalign.core.config import RecipeError, to_dataclass
from mmalign.core.data import Row
from mmalign.core.reward import Reward, score
from mmalign.objectives import policy_gradient as PG
from mmalign.objectives.preference import PREFERENCE_LOSSES
from mmalign.train.algorithm import AlgorithmBase
from mmalign.train.preference import PreferenceAlgorithm, PreferenceConfig


def _scatter_responses(values: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    """Place per-response token values into a [B, T] tensor at the mask's (contiguous) response positions."""
    out = torch.zeros_like(mask, dtype=torch.float32)
    out[mask.bool()] = torch.tensor(
        [v for row in values for v in row], dtype=torch.float32, device=mask.device
    )
    return out


def _gather_responses(tensor: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    return [row[m.bool()].tolist() for row, m in zip(tensor.detach().float().cpu(), mask.cpu(), strict=True)]


@dataclass
class OnlineDPOConfig:
    name: str = "online_dpo"
    preference: dict[str, Any] = field(default_factory=dict)  # any PreferenceConfig fields (loss, beta, ...)
    samples_per_prompt: int = 2  # the pair is the best and the worst of these (2: OAIF's pair)

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be ≥ 2 to form a pair, got {self.samples_per_prompt}")


def best_and_worst(rewards: torch.Tensor) -> list[tuple[int, int, float]]:
    """Per group (a row of `rewards`): (best index, worst index, weight); weight 0 when all rewards tie.

    The first of equal maxima wins and the last of equal minima loses, so two samples always form a pair.
    """
    out = []
    for group in rewards.tolist():
        best = max(range(len(group)), key=lambda j: (group[j], -j))
        worst = min(range(len(group)), key=lambda j: (group[j], -j))
        out.append((best, worst, float(group[best] != group[worst])))
    return out


class OnlineDPO(AlgorithmBase):
    """Sample `samples_per_prompt` responses per prompt, prefer the highest-reward one over the lowest, apply a
    preference loss (OAIF with two samples; best-vs-worst of k as in rejection-sampling DPO variants).

    Pairs whose rewards tie carry no preference: they get weight 0 (counted in `rollout/tie_fraction`) so every
    process keeps the same number of examples.
    """

    online = True

    def __init__(
        self,
        policy: Any,
        prompts: Sequence[Row],
        reward: Reward,
        config: OnlineDPOConfig,
        scorer: Any = None,
    ):
        self.policy, self.prompts, self.reward, self.config = policy, list(prompts), reward, config
        self.samples_per_prompt = config.samples_per_prompt
        preference = to_dataclass(PreferenceConfig, config.preference, "algorithm.preference")
        if not PREFERENCE_LOSSES[preference.loss].per_pair:
            raise RecipeError(
                f"algorithm.preference.loss {preference.loss!r} sorts the batch, so its losses are not per pair "
                "and cannot take the weight 0 of tied pairs"
            )
        self.preference = PreferenceAlgorithm(scorer or policy, [], preference)

    def setup(self) -> None:
        """Nothing to precompute: pairs are drawn each rollout."""

    @torch.no_grad()
    def rollout(self, rows: Sequence[Row]) -> tuple[list[dict[str, Any]], dict[str, float]]:
        k = self.samples_per_prompt
        prompts = [self.policy.prompt_of(r) for r in rows]
        samples, scored = self._draw(prompts, k)
        reward_prompts = [self.policy.reward_prompt(r) for r in rows for _ in range(k)]
        rewards = score(self.reward, reward_prompts, scored).float().view(-1, k)
        examples = [
            {**self._pair(prompts[i], samples[k * i + win], samples[k * i + lose]), "weight": weight}
            for i, (win, lose, weight) in enumerate(best_and_worst(rewards))
        ]
        ties = sum(e["weight"] == 0 for e in examples) / len(examples)
        return examples, {"rollout/reward": rewards.mean().item(), "rollout/tie_fraction": ties}

    def _draw(self, prompts: list[Any], k: int) -> tuple[Any, Any]:
        """`k` samples per prompt (a prompt's samples contiguous), and what the reward scores of them."""
        outputs = self.policy.generate(prompts, num_samples=k)
        return outputs, outputs

    def _pair(self, prompt: Any, win: Any, lose: Any) -> dict[str, Any]:
        """A preference example from the preferred and the rejected sample."""
        return {
            "prompt_ids": win["prompt_ids"],
            "chosen_ids": win["response_ids"],
            "rejected_ids": lose["response_ids"],
        }

    def loss(self, examples: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses, metrics = self.preference.loss(examples)
        weights = torch.tensor([e["weight"] for e in examples], device=losses.device, dtype=losses.dtype)
        return losses * weights, metrics

    def state_dict(self) -> dict[str, Any]:
        return self.preference.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.preference.load_state_dict(state)


@dataclass
class PolicyGradientConfig:
    advantage: str = "rloo"  # rloo | grpo | reinforce (batch-mean baseline)
    samples_per_prompt: int = 4
    clip_range: float = 0.2
    kl_coef: float = 0.0  # β of a per-token k3 KL penalty to the reference
    max_abs_advantage: float | None = None

    def __post_init__(self) -> None:
        if self.advantage not in ("rloo", "grpo", "reinforce"):
            raise ValueError(f"advantage must be rloo, grpo or reinforce, got {self.advantage!r}")
        if self.advantage != "reinforce" and self.samples_per_prompt < 2:
            raise ValueError(f"{self.advantage} needs samples_per_prompt ≥ 2")


class SequencePolicyGradient(AlgorithmBase):
    """Group-baselined policy gradient with the PPO-clip surrogate (ratio is 1 on the first update of a rollout)."""

    online = True

    def __init__(self, policy: Any, prompts: Sequence[Row], reward: Reward, config: PolicyGradientConfig):
        self.policy, self.prompts, self.reward, self.config = policy, list(prompts), reward, config
        self.samples_per_prompt = config.samples_per_prompt

    def setup(self) -> None:
        """Nothing to precompute."""

    def _advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Advantages from the rewards of every process (so a batch-wide baseline is the same on 1 or N
        processes), then this process's share."""
        from accelerate.state import PartialState
        from accelerate.utils import gather

        cfg, state = self.config, PartialState()
        everything = gather(rewards) if state.num_processes > 1 else rewards
        if cfg.advantage == "rloo":
            adv = PG.rloo_advantages(everything, cfg.samples_per_prompt)
        elif cfg.advantage == "grpo":
            adv = PG.group_normalized_advantages(everything, cfg.samples_per_prompt)
        else:
            adv = everything - everything.mean()
        adv = adv[state.process_index * len(rewards) : (state.process_index + 1) * len(rewards)]
        return PG.clip_advantages(adv, cfg.max_abs_advantage) if cfg.max_abs_advantage else adv

    @torch.no_grad()
    def rollout(self, rows: Sequence[Row]) -> tuple[list[dict[str, Any]], dict[str, float]]:
        g = self.config.samples_per_prompt
        prompts = [self.policy.prompt_of(r) for r in rows]
        outputs = self.policy.generate(prompts, num_samples=g)
        reward_prompts = [self.policy.reward_prompt(r) for r in rows for _ in range(g)]
        rewards = score(self.reward, reward_prompts, outputs).float()
        advantages = self._advantages(rewards)
        examples = [
            {"prompt_ids": o["prompt_ids"], "response_ids": o["response_ids"], "advantage": float(a)}
            for o, a in zip(outputs, advantages.tolist(), strict=True)
        ]
        batch = self.policy.collate_completions(examples)
        old = self.policy.sequence_logprobs(batch)
        for e, lp in zip(examples, _gather_responses(old.token_logps, old.mask), strict=True):
            e["old_logps"] = lp
        if self.config.kl_coef:
            with self.policy.reference():
                ref = self.policy.sequence_logprobs(batch)
            for e, lp in zip(examples, _gather_responses(ref.token_logps, ref.mask), strict=True):
                e["ref_logps"] = lp
        lengths = torch.tensor([len(o["response_ids"]) for o in outputs], dtype=torch.float32)
        return examples, {
            "rollout/reward": rewards.mean().item(),
            "rollout/reward_std": rewards.std().item(),
            "rollout/response_tokens": lengths.mean().item(),
        }

    def loss(self, examples: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lp = self.policy.sequence_logprobs(self.policy.collate_completions(examples))
        old = _scatter_responses([e["old_logps"] for e in examples], lp.mask)
        adv = torch.tensor([e["advantage"] for e in examples], device=lp.mask.device)
        losses, metrics = PG.ppo_clip_loss(lp.token_logps, old, adv, self.config.clip_range, mask=lp.mask)
        if self.config.kl_coef:
            ref = _scatter_responses([e["ref_logps"] for e in examples], lp.mask)
            kl = PG.kl_penalty(lp.token_logps, ref, estimator="k3") * lp.mask
            per_sample_kl = kl.sum(-1) / lp.mask.sum(-1).clamp(min=1)
            losses = losses + self.config.kl_coef * per_sample_kl
            metrics["kl"] = per_sample_kl.detach().mean()
        return losses, metrics

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
