"""Held-out metrics for sequence policies and reward models: preference accuracy, rewards of greedy generations,
pairwise accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmalign.core.data import Row
from mmalign.core.policy import ScorerPolicy, SequencePolicy
from mmalign.core.reward import Reward, score
from mmalign.objectives.sequence import sequence_logps


class SequenceEvaluator:
    """Evaluates a `SequencePolicy` on held-out pairs and prompts; the same dict before and after training.

    - `preference_accuracy`: share of held-out pairs where the policy gives the chosen response a higher
      log-likelihood than the rejected one (a property of the model alone, so it is defined for the base too);
    - `<reward>`: mean reward of greedy generations on held-out prompts, for each reward given;
    - `n_pairs`, `n_prompts`: how many items the numbers are over.
    """

    def __init__(
        self,
        *,
        pairs: Sequence[Row] = (),
        prompts: Sequence[Row] = (),
        rewards: Sequence[Reward] = (),
        batch_size: int = 64,
        n_samples: int = 8,
    ):
        self.pairs, self.prompts, self.rewards = list(pairs), list(prompts), list(rewards)
        self.batch_size, self.n_samples = batch_size, n_samples
        self._encoded: list[dict[str, Any]] | None = None

    def evaluate(self, policy: SequencePolicy) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.pairs:
            if self._encoded is None:
                self._encoded = [policy.encode_pair(r) for r in self.pairs]
            wins, margins = [], []
            for start in range(0, len(self._encoded), self.batch_size):
                chunk = self._encoded[start : start + self.batch_size]
                chosen, rejected = policy.sequence_logprobs(policy.collate_pairs(chunk)).split(len(chunk))
                margin = sequence_logps(chosen.token_logps, chosen.mask) - sequence_logps(
                    rejected.token_logps, rejected.mask
                )
                wins.append((margin > 0).float())
                margins.append(margin)
            metrics["preference_accuracy"] = torch.cat(wins).mean().item()
            metrics["logp_margin"] = torch.cat(margins).mean().item()
            metrics["n_pairs"] = len(self._encoded)
        if self.prompts and self.rewards:
            prompts = [policy.prompt_of(r) for r in self.prompts]
            outputs: list[dict[str, Any]] = []
            for start in range(0, len(prompts), self.batch_size):
                outputs += policy.generate(prompts[start : start + self.batch_size], greedy=True)
            reward_prompts = [policy.reward_prompt(r) for r in self.prompts]
            for reward in self.rewards:
                metrics[reward.name] = score(reward, reward_prompts, outputs).float().mean().item()
            metrics["response_tokens"] = sum(len(o["response_ids"]) for o in outputs) / len(outputs)
            metrics["n_prompts"] = len(prompts)
        return metrics

    def samples(self, policy: SequencePolicy) -> list[dict[str, Any]]:
        """Greedy responses to the first few held-out prompts, for the report's before/after table."""
        rows = self.prompts[: self.n_samples]
        if not rows:
            return []
        outputs = policy.generate([policy.prompt_of(r) for r in rows], greedy=True)
        table = []
        for row, out in zip(rows, outputs, strict=True):
            entry = {"prompt": row.data["prompt"], "response": out["text"]}
            for reward in self.rewards:
                entry[reward.name] = float(score(reward, [policy.reward_prompt(row)], [out])[0])
            if "answer" in row.data:
                entry["answer"] = row.data["answer"]
            table.append(entry)
        return table


class PairwiseAccuracy:
    """Held-out pairwise accuracy of a reward model: share of pairs scored chosen > rejected."""

    def __init__(self, rows: Sequence[Row], batch_size: int = 64):
        self.rows, self.batch_size = list(rows), batch_size
        self._encoded: list[dict[str, Any]] | None = None

    def evaluate(self, model: ScorerPolicy) -> dict[str, float]:
        if self._encoded is None:
            self._encoded = [model.encode_pair(r) for r in self.rows]
        wins = []
        for start in range(0, len(self._encoded), self.batch_size):
            chunk = self._encoded[start : start + self.batch_size]
            scores = model.scores(model.collate_pairs(chunk))
            wins.append((scores[: len(chunk)] > scores[len(chunk) :]).float())
        return {"pairwise_accuracy": torch.cat(wins).mean().item(), "n_pairs": len(self._encoded)}

    def samples(self, model: ScorerPolicy) -> list[dict[str, Any]]:
        return []
