"""KTO on unpaired desirable/undesirable examples, for any policy that scores completions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmalign.core.data import Row
from mmalign.core.policy import SequencePolicy
from mmalign.objectives.preference import kto_kl_estimate, kto_loss
from mmalign.objectives.sequence import sequence_logps
from mmalign.train.algorithm import AlgorithmBase


@dataclass
class KTOConfig:
    name: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


class KTOAlgorithm(AlgorithmBase):
    """Per-example KTO loss with the reference point z estimated from mismatched (prompt, completion) pairs.

    z is the batch mean of β-free log-ratios of completion i+1 given prompt i (as in the KTO paper), detached,
    averaged over processes and then clamped at 0 (trl's order), so every rank uses the same value.
    """

    online = False

    def __init__(self, policy: SequencePolicy, rows: Sequence[Row], config: KTOConfig):
        self.policy, self.config = policy, config
        self.train_examples = []
        for row in rows:
            example = policy.encode_completion(row, "completion")
            example["label"] = bool(row.data["label"])
            self.train_examples.append(example)

    def _logratios(self, examples: Sequence[dict[str, Any]]) -> torch.Tensor:
        batch = self.policy.collate_completions(examples)
        lp = self.policy.sequence_logprobs(batch)
        with torch.no_grad(), self.policy.reference():
            ref = self.policy.sequence_logprobs(batch)
        return sequence_logps(lp.token_logps, lp.mask) - sequence_logps(ref.token_logps, ref.mask)

    def loss(self, examples: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        logratios = self._logratios(examples)
        # completion i+1 under prompt i, with everything else of example i (a VLM prompt keeps its image)
        mismatched = [
            {**e, "response_ids": examples[(i + 1) % len(examples)]["response_ids"]}
            for i, e in enumerate(examples)
        ]
        with torch.no_grad():
            kl = kto_reference_point(self._logratios(mismatched))
        desirable = torch.tensor([e["label"] for e in examples], device=logratios.device)
        losses = kto_loss(logratios, desirable, kl, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
        rewards = cfg.beta * logratios.detach()
        d = desirable.float()
        metrics = {  # masked means (0 when a micro-batch has no example of that kind), same keys on every rank
            "kl": kl,
            "rewards/desirable": (rewards * d).sum() / d.sum().clamp(min=1),
            "rewards/undesirable": (rewards * (1 - d)).sum() / (1 - d).sum().clamp(min=1),
        }
        return losses, metrics

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def kto_reference_point(mismatched_logratios: torch.Tensor) -> torch.Tensor:
    """KTO's z over the whole batch: this process's mean log-ratio, averaged over processes, then clamped at 0."""
    return kto_kl_estimate(mismatched_logratios, mean_over_processes=_mean_over_processes)


def _mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    from accelerate.state import PartialState
    from accelerate.utils import reduce

    return reduce(value, "mean") if PartialState().num_processes > 1 else value
