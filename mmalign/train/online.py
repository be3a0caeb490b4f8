"""Online methods for sequence policies: prompts → sample → reward → objective, one tensor batch from sampling to
loss.

`OnlineDPO` (OAIF-style, Guo et al. 2024; seed 004 §4.2.1): k samples per prompt, a pair chosen from them by a
reward (seed 003's best-vs-worst, or a random rival), trained with any offline preference loss.
`SequencePolicyGradient`: REINFORCE / RLOO / GRPO / Dr. GRPO / DAPO / GSPO (seed 004 §4.1) — an advantage
estimator and a clipped surrogate picked by trl's names (`advantage` / `scale_rewards`, `loss_type`, `epsilon`,
`epsilon_high`, `importance_sampling_level`, `beta`, `mask_truncated_completions`) plus DAPO's dynamic sampling and
soft overlong punishment.

A rollout is collated once, when it is sampled: the policy's model inputs (`inputs.*`: ids, attention and response
masks, pixel values for a VLM), old and reference per-token log-probs as padded [N, T] tensors, per-sample
advantages and weights — a `mmalign.core.types.Batch` the trainer slices into micro-batches and the loss reads
as is. Prompts come from `policy.prompt_of(row)` and rewards see `policy.reward_prompt(row)`, so text LLMs and
VLMs run the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmalign.core.config import RecipeError, to_dataclass
from mmalign.core.data import Row
from mmalign.core.policy import Policy, SequencePolicy
from mmalign.core.reward import Reward, score
from mmalign.core.types import Batch
from mmalign.objectives import policy_gradient as PG
from mmalign.objectives.advantages import (
    RewardGroups,
    clip_advantages,
    dynamic_sampling_mask,
    make_advantage_estimator,
    soft_overlong_punishment,
)
from mmalign.objectives.preference import PREFERENCE_LOSSES
from mmalign.objectives.sequence import sequence_logps
from mmalign.train.algorithm import AlgorithmBase
from mmalign.train.distributed import gather_all, this_process
from mmalign.train.preference import PreferenceAlgorithm, PreferenceConfig

INPUTS = "inputs."  # prefix of the policy's collated model inputs inside a rollout batch
PAIR_RULES = ("max_min", "max_random", "random")


# ------------------------------------------------------------------------------------------ shared pieces
def completion_examples(
    prompts: Sequence[Any], outputs: Sequence[dict[str, Any]], k: int
) -> list[dict[str, Any]]:
    """Examples for `collate_completions`: each output's ids plus its prompt's other model inputs (a VLM prompt is
    a mapping that carries `pixel_values`; a text prompt is a string and carries nothing)."""
    examples = []
    for i, out in enumerate(outputs):
        prompt = prompts[i // k]
        extras = {n: v for n, v in prompt.items() if n != "prompt_ids"} if isinstance(prompt, dict) else {}
        examples.append({**extras, "prompt_ids": out["prompt_ids"], "response_ids": out["response_ids"]})
    return examples


def input_fields(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated batch's tensors as rollout fields (prefixed, so they never clash with the algorithm's)."""
    return {INPUTS + name: value for name, value in inputs.items()}


def model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """The policy's collated inputs back out of a (sliced) rollout batch."""
    return {name[len(INPUTS) :]: v for name, v in batch.fields.items() if name.startswith(INPUTS)}


def policy_device(policy: Policy) -> torch.device:
    return next(policy.module.parameters()).device


# ----------------------------------------------------------------------------------------------- pairs
def _first_max(group: list[float]) -> int:
    """Index of a group's highest reward, the first of equal maxima."""
    return max(range(len(group)), key=lambda j: (group[j], -j))


def _last_min(group: list[float]) -> int:
    """Index of a group's lowest reward, the last of equal minima."""
    return min(range(len(group)), key=lambda j: (group[j], -j))


def select_pairs(
    rewards: torch.Tensor, rule: str = "max_min", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sample indices per group from a [P, k] reward matrix, by seed 003's pair rules:

        max_min     the highest-reward sample over the lowest (seed 003 §3.3: best-of-k vs worst-of-k; the first
                    of equal maxima wins, the last of equal minima loses, so two samples always form a pair)
        max_random  the highest-reward sample over one of the other k − 1 drawn uniformly
        random      two distinct samples drawn uniformly, the higher-reward one preferred (the first drawn on a tie)

    A tie in reward (chosen reward == rejected reward) carries no preference; callers give it weight 0.
    """
    if rule not in PAIR_RULES:
        raise ValueError(f"pair_rule must be one of {', '.join(PAIR_RULES)}; got {rule!r}")
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, k ≥ 2], got shape {tuple(rewards.shape)}")
    p, k = rewards.shape
    groups = rewards.tolist()
    best = torch.tensor([_first_max(g) for g in groups])
    if rule == "max_min":
        worst = torch.tensor([_last_min(g) for g in groups])
        return best, worst
    if rule == "max_random":
        offset = torch.randint(1, k, (p,), generator=generator)
        return best, (best + offset) % k
    first = torch.randint(0, k, (p,), generator=generator)
    second = (first + torch.randint(1, k, (p,), generator=generator)) % k
    rows = torch.arange(p)
    second_wins = rewards[rows, second] > rewards[rows, first]
    return torch.where(second_wins, second, first), torch.where(second_wins, first, second)


@dataclass
class OnlineDPOConfig:
    """The `algorithm:` section of online_dpo: sampling, the pair rule and the preference loss."""

    name: str = "online_dpo"
    preference: dict[str, Any] = field(default_factory=dict)  # any PreferenceConfig fields (loss, beta, ...)
    samples_per_prompt: int = 2  # k samples per prompt, of which two form the pair (2: OAIF's pair)
    pair_rule: str = "max_min"  # max_min | max_random | random (see select_pairs)
    # seed 003 Eq. (9): rank by r̃ = r − λ·|y| with |y| the response's characters (pairs are chosen on r̃)
    length_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be ≥ 2 to form a pair, got {self.samples_per_prompt}")
        if self.pair_rule not in PAIR_RULES:
            raise ValueError(f"pair_rule must be one of {', '.join(PAIR_RULES)}; got {self.pair_rule!r}")
        if self.length_penalty < 0:
            raise ValueError(f"length_penalty must be ≥ 0, got {self.length_penalty}")
        to_dataclass(
            PreferenceConfig, self.preference, "algorithm.preference"
        )  # its keys, before any model loads


class OnlineDPO(AlgorithmBase):
    """Sample `samples_per_prompt` responses per prompt, pick a (chosen, rejected) pair by `pair_rule` on the
    (optionally length-penalised) reward, and apply a preference loss.

    Pairs that carry no preference — tied rewards, or the same response twice (seed 003 drops those) — get weight 0
    (counted in `rollout/tie_fraction`), so every process keeps the same number of pairs. For a sequence policy
    the pairs are collated at rollout time into one `Batch` (`inputs.*` fields shaped [pairs, 2, ...]: chosen,
    rejected) with the reference's sequence log-probs computed once, there; a scorer whose scores draw fresh noise
    per batch (Diffusion-DPO) keeps the pairs as examples and scores its reference in the loss.
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
        if not PREFERENCE_LOSSES[preference.loss_name].per_pair:
            raise RecipeError(
                f"algorithm.preference.loss {preference.loss!r} sorts the batch, so its losses are not per pair "
                "and cannot take the weight 0 of tied pairs"
            )
        if PREFERENCE_LOSSES[preference.loss_name].needs_score_diff:
            raise RecipeError(
                f"algorithm.preference.loss {preference.loss!r} reads scores stored on offline rows; online pairs "
                "have none"
            )
        self.scorer = scorer or policy
        self.preference = PreferenceAlgorithm(self.scorer, [], preference)
        # reference scores are computed once per rollout unless the loss needs reference entropies or every batch
        # draws fresh noise (then the loss scores the reference on its own batch)
        self.precollate = getattr(self.scorer, "deterministic_scores", True)
        self.reference_at_rollout = (
            self.precollate and self.preference.needs_reference and not self.preference.needs_entropy
        )

    @torch.no_grad()
    def rollout(self, rows: Sequence[Row]) -> tuple[Batch | list[dict[str, Any]], dict[str, float]]:
        k = self.samples_per_prompt
        prompts = [self.policy.prompt_of(r) for r in rows]
        samples, scored = self._draw(prompts, k)
        reward_prompts = [self.policy.reward_prompt(r) for r in rows for _ in range(k)]
        rewards = score(self.reward, reward_prompts, scored).float().cpu()
        return self._pairs(prompts, samples, rewards)

    def _pairs(
        self, prompts: list[Any], samples: Any, rewards: torch.Tensor
    ) -> tuple[Batch | list[dict[str, Any]], dict[str, float]]:
        """Choose, weight and collate the pairs of one rollout's scored samples."""
        k, cfg = self.samples_per_prompt, self.config
        ranked = rewards - cfg.length_penalty * self._lengths(samples) if cfg.length_penalty else rewards
        grouped = ranked.view(-1, k)
        chosen, rejected = select_pairs(grouped, cfg.pair_rule)
        rows = torch.arange(len(prompts))
        ties = grouped[rows, chosen] == grouped[rows, rejected]
        pairs = list(zip(chosen.tolist(), rejected.tolist(), strict=True))
        same = torch.tensor(
            [self._same(samples[k * i + c], samples[k * i + r]) for i, (c, r) in enumerate(pairs)]
        )
        weights = (~(ties | same)).float()
        examples = [
            self._pair(prompts[i], samples[k * i + c], samples[k * i + r]) for i, (c, r) in enumerate(pairs)
        ]
        metrics = {
            "rollout/reward": rewards.mean().item(),
            "rollout/tie_fraction": 1.0 - weights.mean().item(),
            "rollout/chosen_reward": rewards.view(-1, k)[rows, chosen].mean().item(),
            "rollout/rejected_reward": rewards.view(-1, k)[rows, rejected].mean().item(),
        }
        if not self.precollate:
            for e, w in zip(examples, weights.tolist(), strict=True):
                e["weight"] = w
            return examples, metrics
        return self._collate(examples, weights), metrics

    def _lengths(self, samples: Any) -> torch.Tensor:
        """|y| of seed 003's length penalty: the characters of each response's text."""
        if not all(isinstance(s, dict) and "text" in s for s in samples):
            raise ValueError(
                "algorithm.length_penalty counts the characters of text responses; these have none"
            )
        return torch.tensor([float(len(s["text"])) for s in samples])

    @staticmethod
    def _same(a: Any, b: Any) -> bool:
        """Whether two samples are the same response (seed 003 drops such pairs)."""
        return (
            isinstance(a, dict)
            and a.get("response_ids") is not None
            and a["response_ids"] == b["response_ids"]
        )

    def _collate(self, examples: list[dict[str, Any]], weights: torch.Tensor) -> Batch:
        """Pairs as one batch: model inputs [pairs, 2, ...] (chosen, rejected), reference scores and weights."""
        n = len(examples)
        inputs = self.policy.collate_pairs(examples)
        fields: dict[str, Any] = {
            INPUTS + name: value.view(2, n, *value.shape[1:]).transpose(0, 1)
            for name, value in inputs.items()
        }
        fields["weight"] = weights
        if self.reference_at_rollout:
            ref_chosen, ref_rejected = self._reference_scores(inputs, n)
            fields["ref_scores"] = torch.stack([ref_chosen, ref_rejected], dim=1).cpu()
        if self.preference.entry.needs_score_diff:
            raise RecipeError(
                "algorithm.preference.loss odpo reads scores stored on offline rows; online pairs have none"
            )
        return Batch(**fields)

    def _reference_scores(self, inputs: dict[str, torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence log-probs of chosen and rejected under the reference (the frozen base model here)."""
        with self.policy.reference():
            return self._sequence_scores(inputs, n)

    def _sequence_scores(self, inputs: dict[str, torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        lp = self.policy.sequence_logprobs(inputs)
        chosen, rejected = lp.split(n)
        return sequence_logps(chosen.token_logps, chosen.mask), sequence_logps(
            rejected.token_logps, rejected.mask
        )

    def _draw(self, prompts: list[Any], k: int) -> tuple[Any, Any]:
        """`k` samples per prompt (a prompt's samples contiguous), and what the reward scores of them."""
        outputs = self.policy.generate(prompts, num_samples=k)
        return outputs, outputs

    def _pair(self, prompt: Any, win: Any, lose: Any) -> dict[str, Any]:
        """A preference example from the preferred and the rejected sample (a VLM prompt adds its pixels)."""
        extras = {n: v for n, v in prompt.items() if n != "prompt_ids"} if isinstance(prompt, dict) else {}
        return {
            **extras,
            "prompt_ids": win["prompt_ids"],
            "chosen_ids": win["response_ids"],
            "rejected_ids": lose["response_ids"],
        }

    def loss(self, batch: Batch | Sequence[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not isinstance(batch, Batch):  # pairs kept as examples (a scorer with fresh noise per batch)
            losses, metrics = self.preference.loss(batch)
            weights = torch.tensor([e["weight"] for e in batch], device=losses.device, dtype=losses.dtype)
            return losses * weights, metrics
        n = len(batch)
        inputs = {
            name: value.transpose(0, 1).reshape(2 * n, *value.shape[2:])
            for name, value in model_inputs(batch).items()
        }
        ref = batch.fields.get("ref_scores")
        losses, metrics = self.preference.batch_loss(
            inputs, n, None if ref is None else (ref[:, 0], ref[:, 1])
        )
        return losses * batch["weight"].to(device=losses.device, dtype=losses.dtype), metrics

    def state_dict(self) -> dict[str, Any]:
        return self.preference.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.preference.load_state_dict(state)


# ------------------------------------------------------------------------------------------ policy gradient
SEQUENCE_ESTIMATORS = ("reinforce", "rloo", "grpo", "dr_grpo", "batch")
SCALE_REWARDS = {"group": "grpo", "batch": "batch", "none": "dr_grpo", True: "grpo", False: "dr_grpo"}


@dataclass
class PolicyGradientConfig:
    """The `algorithm:` section of reinforce / rloo / grpo / dr_grpo / dapo / gspo, in trl's names.

    advantage: reinforce (batch-mean baseline) · rloo (leave-one-out) · grpo (group mean and std) · dr_grpo (group
    mean only) · batch (group mean, batch std); trl's `scale_rewards` (group | batch | none) picks among the last
    three. loss_type: how per-token losses become a sample's (grpo: mean over its tokens · dapo: token mean over
    the global batch · dr_grpo: sum / max_new_tokens · bnpo: token mean over the micro-batch).
    epsilon / epsilon_high: the clip range [1 − ε, 1 + ε_high] (DAPO's clip-higher). importance_sampling_level:
    token, or sequence (GSPO). beta: coefficient of the per-token k3 KL to the reference (trl's; `kl_coef` is its
    older mmalign name). mask_truncated_completions: responses cut at max_new_tokens (no eos) leave the loss
    (DAPO's overlong filtering). dynamic_sampling: groups whose rewards are all equal get weight 0 and the others
    are re-weighted so the loss is their mean (DAPO's dynamic sampling with a fixed batch shape; see
    `SequencePolicyGradient`). soft_punish_cache: DAPO's soft overlong punishment over the last L_cache tokens of
    max_new_tokens, added to the reward.
    """

    name: str = "rloo"
    advantage: str = "rloo"
    scale_rewards: str | bool | None = None
    samples_per_prompt: int | None = None  # default 4
    num_generations: int | None = None  # trl's name for samples_per_prompt
    loss_type: str = "grpo"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    importance_sampling_level: str = "token"
    beta: float = 0.0
    kl_coef: float | None = None
    max_abs_advantage: float | None = None
    mask_truncated_completions: bool = False
    dynamic_sampling: bool = False
    soft_punish_cache: int | None = None

    def __post_init__(self) -> None:
        if (
            None not in (self.num_generations, self.samples_per_prompt)
            and self.num_generations != self.samples_per_prompt
        ):
            raise ValueError(
                f"num_generations ({self.num_generations}) and samples_per_prompt ({self.samples_per_prompt}) "
                "disagree; give one of them"
            )
        self.samples_per_prompt = self.num_generations or self.samples_per_prompt or 4
        if self.kl_coef is not None:
            if self.beta and self.beta != self.kl_coef:
                raise ValueError(
                    f"kl_coef ({self.kl_coef}) and beta ({self.beta}) disagree; give one of them"
                )
            self.beta = self.kl_coef
        if self.advantage not in SEQUENCE_ESTIMATORS:
            raise ValueError(
                f"advantage must be one of {', '.join(SEQUENCE_ESTIMATORS)}, got {self.advantage!r}"
            )
        if self.scale_rewards is not None:
            if self.scale_rewards not in SCALE_REWARDS:
                raise ValueError(
                    f"scale_rewards must be group, batch or none (or a bool), got {self.scale_rewards!r}"
                )
            if self.advantage not in ("grpo", "dr_grpo", "batch"):
                raise ValueError(
                    f"scale_rewards scales group-mean advantages (grpo, dr_grpo, batch); advantage is {self.advantage!r}"
                )
            self.advantage = SCALE_REWARDS[self.scale_rewards]
        if self.advantage != "reinforce" and self.samples_per_prompt < 2:
            raise ValueError(
                f"advantage {self.advantage!r} compares a prompt's samples: samples_per_prompt ≥ 2"
            )
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be ≥ 1, got {self.samples_per_prompt}")
        if self.loss_type not in PG._LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(PG._LOSS_TYPES)}, got {self.loss_type!r}")
        if not self.epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        if self.epsilon_high is not None and not self.epsilon_high > 0:
            raise ValueError(f"epsilon_high must be > 0, got {self.epsilon_high}")
        if self.importance_sampling_level not in PG._IS_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be token or sequence, got {self.importance_sampling_level!r}"
            )
        if self.beta < 0:
            raise ValueError(f"beta must be ≥ 0, got {self.beta}")
        if self.max_abs_advantage is not None and not self.max_abs_advantage > 0:
            raise ValueError(f"max_abs_advantage must be > 0, got {self.max_abs_advantage}")
        if self.dynamic_sampling and self.samples_per_prompt < 2:
            raise ValueError("dynamic_sampling filters groups of a prompt's samples: samples_per_prompt ≥ 2")
        if self.soft_punish_cache is not None and self.soft_punish_cache < 1:
            raise ValueError(f"soft_punish_cache must be ≥ 1 token, got {self.soft_punish_cache}")


def dynamic_sampling_weights(keep: torch.Tensor) -> torch.Tensor:
    """Per-sample weights [N] that turn the mean over all N samples into the mean over the kept ones:
    keep_i · N / N_kept (all zero when nothing is kept)."""
    kept = keep.float().sum()
    if kept == 0:
        return torch.zeros(keep.shape)
    return keep.float() * keep.numel() / kept


class SequencePolicyGradient(AlgorithmBase):
    """Group-baselined policy gradient with the clipped surrogate (the ratio is 1 on a rollout's first update).

    Advantages are computed on the rewards gathered from every process, so N processes equal 1. DAPO's dynamic
    sampling keeps the batch shape fixed: instead of drawing more prompts until the batch holds only groups with
    differing rewards (DAPO §3.2), groups whose rewards are all equal get weight 0 and the kept samples are
    re-weighted (N / N_kept, or for loss_type dapo a token normaliser over the kept tokens) so the loss is the
    mean over the kept groups, as if the filtered ones had never been drawn; `rollout/kept_fraction` logs the
    share kept. A rollout where every group ties trains on nothing (loss 0).

    When one optimizer step trains on each rollout (`updates_per_rollout` 1, which the trainer sets from
    `train.ppo_epochs`), the old log-probs are the current ones, so the rollout skips their forward pass and the
    loss takes them from its own forward, detached (ratio exactly 1; trl does the same when num_iterations = 1).
    """

    online = True

    def __init__(
        self, policy: SequencePolicy, prompts: Sequence[Row], reward: Reward, config: PolicyGradientConfig
    ):
        self.policy, self.prompts, self.reward, self.config = policy, list(prompts), reward, config
        if config.samples_per_prompt is None:
            raise ValueError("samples_per_prompt is unset (PolicyGradientConfig.__post_init__ sets it)")
        self.samples_per_prompt: int = config.samples_per_prompt
        self.estimator = make_advantage_estimator(config.advantage)
        self.max_new_tokens: int | None = getattr(policy, "max_new_tokens", None)
        needs_length = config.loss_type == "dr_grpo" or config.soft_punish_cache is not None
        if needs_length and not self.max_new_tokens:
            raise ValueError("loss_type dr_grpo and soft_punish_cache need the policy's max_new_tokens")
        if (
            config.soft_punish_cache is not None
            and self.max_new_tokens is not None  # checked just above
            and config.soft_punish_cache > self.max_new_tokens
        ):
            raise ValueError(
                f"soft_punish_cache ({config.soft_punish_cache}) must be ≤ model.max_new_tokens ({self.max_new_tokens})"
            )

    @torch.no_grad()
    def rollout(self, rows: Sequence[Row]) -> tuple[Batch, dict[str, float]]:
        cfg, policy, g = self.config, self.policy, self.samples_per_prompt
        prompts = [policy.prompt_of(r) for r in rows]
        outputs = policy.generate(prompts, num_samples=g)
        reward_prompts = [policy.reward_prompt(r) for r in rows for _ in range(g)]
        rewards = score(self.reward, reward_prompts, outputs).float().cpu()
        lengths = torch.tensor([float(len(o["response_ids"])) for o in outputs])
        eos = policy.tokenizer.eos_token_id
        truncated = torch.tensor([not o["response_ids"] or o["response_ids"][-1] != eos for o in outputs])
        if cfg.soft_punish_cache is not None:
            assert self.max_new_tokens is not None  # __init__: soft_punish_cache needs it
            rewards = rewards + soft_overlong_punishment(lengths, self.max_new_tokens, cfg.soft_punish_cache)

        inputs = policy.collate_completions(completion_examples(prompts, outputs, g))
        old_logps = None
        if self.updates_per_rollout == 1 and "response_mask" in inputs:
            mask = inputs["response_mask"][:, 1:].float()  # what sequence_logprobs masks with
        else:
            old = policy.sequence_logprobs(inputs)
            mask, old_logps = old.mask.cpu(), old.token_logps.cpu()
        if cfg.mask_truncated_completions:
            mask = mask * (~truncated).unsqueeze(-1).to(mask.dtype)
        n = len(outputs)

        all_rewards = gather_all(rewards)
        advantages = self.estimator(all_rewards, RewardGroups(g))
        if cfg.max_abs_advantage:
            advantages = clip_advantages(advantages, cfg.max_abs_advantage)
        keep = (
            dynamic_sampling_mask(all_rewards, g)
            if cfg.dynamic_sampling
            else torch.ones(len(all_rewards), dtype=torch.bool)
        )
        all_tokens = gather_all(mask.sum(-1))
        if cfg.loss_type == "dapo":  # the global token mean over kept samples: Σ kept ℓ / T_kept
            weights = keep.float()
            tokens_per_sample = float((all_tokens * keep).sum()) / len(all_rewards)
        else:
            weights = dynamic_sampling_weights(keep)
            tokens_per_sample = float(all_tokens.sum()) / len(all_rewards)
        fields: dict[str, Any] = {
            **input_fields(inputs),
            "mask": mask,
            **({} if old_logps is None else {"old_logps": old_logps}),
            "advantages": this_process(advantages, n),
            "weight": this_process(weights, n),
            "tokens_per_sample": torch.full((n,), max(tokens_per_sample, 1e-8)),
        }
        if cfg.beta:
            with policy.reference():
                fields["ref_logps"] = policy.sequence_logprobs(inputs).token_logps.cpu()
        metrics = {
            "rollout/reward": all_rewards.mean().item(),
            "rollout/reward_std": all_rewards.std().item() if len(all_rewards) > 1 else 0.0,
            "rollout/response_tokens": lengths.mean().item(),
            "rollout/truncated_fraction": truncated.float().mean().item(),
            "rollout/kept_fraction": keep.float().mean().item(),
        }
        return Batch(**fields), metrics

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        batch = batch.to(policy_device(self.policy))
        lp = self.policy.sequence_logprobs(model_inputs(batch))
        mask = batch["mask"]
        token_losses, metrics = PG.clipped_surrogate(
            lp.token_logps,
            batch["old_logps"] if "old_logps" in batch else lp.token_logps.detach(),
            batch["advantages"],
            mask,
            epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high,
            importance_sampling_level=cfg.importance_sampling_level,
        )
        if cfg.beta:
            kl = PG.kl_penalty(lp.token_logps, batch["ref_logps"], estimator="k3") * mask
            token_losses = token_losses + cfg.beta * kl
            metrics["kl"] = (kl.sum() / mask.sum().clamp(min=1)).detach()
        losses = PG.aggregate_token_losses(
            token_losses,
            mask,
            cfg.loss_type,
            max_completion_length=self.max_new_tokens,
            tokens_per_sample=float(batch["tokens_per_sample"][0]) if len(batch) else None,
        )
        metrics["advantage_abs"] = batch["advantages"].abs().mean()
        return losses * batch["weight"].to(losses.dtype), metrics
