"""Supervised members of the family: SFT on completions and Bradley–Terry reward-model training."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmalign.core.data import Row
from mmalign.core.policy import SequencePolicy
from mmalign.objectives.supervised import bradley_terry_loss, nll_loss
from mmalign.train.algorithm import AlgorithmBase


@dataclass
class SFTConfig:
    name: str = "sft"
    field: str = "completion"  # which row field is the target response


class SFTAlgorithm(AlgorithmBase):
    """Maximise the likelihood of target responses (per-sequence mean token NLL)."""

    online = False

    def __init__(self, policy: SequencePolicy, rows: Sequence[Row], config: SFTConfig):
        self.policy, self.config = policy, config
        self.train_examples = [policy.encode_completion(r, config.field) for r in rows]

    def loss(self, examples: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lp = self.policy.sequence_logprobs(self.policy.collate_completions(examples))
        losses = nll_loss(lp.token_logps, lp.mask)
        return losses, {"nll": losses.detach().mean()}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class RewardModelConfig:
    name: str = "reward_model"
    margin_from_scores: bool = False  # use score_chosen − score_rejected as the BT margin


class RewardModelAlgorithm(AlgorithmBase):
    """Bradley–Terry training: −log σ(r(x, y_w) − r(x, y_l) − margin) for each pair."""

    online = False

    def __init__(self, model: Any, rows: Sequence[Row], config: RewardModelConfig):
        self.model, self.config = model, config
        self.train_examples = []
        for row in rows:
            example = model.encode_pair(row)
            if config.margin_from_scores:
                if "score_chosen" not in row.data:
                    raise row.error(
                        "score_chosen", "margin_from_scores needs score_chosen and score_rejected"
                    )
                example["margin"] = float(row.data["score_chosen"]) - float(row.data["score_rejected"])
            self.train_examples.append(example)

    def loss(self, examples: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scores = self.model.scores(self.model.collate_pairs(examples))
        chosen, rejected = scores[: len(examples)], scores[len(examples) :]
        margin = None
        if self.config.margin_from_scores:
            margin = torch.tensor([e["margin"] for e in examples], device=scores.device)
        losses = bradley_terry_loss(chosen, rejected, margin=margin)
        metrics = {
            "accuracy": (chosen > rejected).float().mean().detach(),
            "margin": (chosen - rejected).mean().detach(),
        }
        return losses, metrics

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
