"""Held-out metrics for sequence policies: preference accuracy and the reward of greedy generations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmalign.core.data import Row
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

    def evaluate(self, policy: Any) -> dict[str, float]:
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
            prompts = [r.data["prompt"] for r in self.prompts]
            outputs: list[dict[str, Any]] = []
            for start in range(0, len(prompts), self.batch_size):
                outputs += policy.generate(prompts[start : start + self.batch_size], greedy=True)
            for reward in self.rewards:
                metrics[reward.name] = score(reward, prompts, outputs).float().mean().item()
            metrics["response_tokens"] = sum(len(o["response_ids"]) for o in outputs) / len(outputs)
            metrics["n_prompts"] = len(prompts)
        return metrics

    def samples(self, policy: Any) -> list[dict[str, Any]]:
        """Greedy responses to the first few held-out prompts, for the report's before/after table."""
        rows = self.prompts[: self.n_samples]
        if not rows:
            return []
        prompts = [r.data["prompt"] for r in rows]
        outputs = policy.generate(prompts, greedy=True)
        table = []
        for prompt, row, out in zip(prompts, rows, outputs, strict=True):
            entry = {"prompt": prompt, "response": out["text"]}
            for reward in self.rewards:
                entry[reward.name] = float(score(reward, [prompt], [out])[0])
            if "answer" in row.data:
                entry["answer"] = row.data["answer"]
            table.append(entry)
        return table
