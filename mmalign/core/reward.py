"""The reward protocol and combinators: any scorer of (prompt, output) pairs, rule-based or learned."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from mmalign.core.errors import MmalignError


class RewardError(MmalignError, RuntimeError):
    """A reward returned something that must not be trained on (NaN/inf, wrong shape)."""

    label = "reward error"


@runtime_checkable
class Reward(Protocol):
    """Scores outputs for their prompts; `differentiable` rewards keep the graph to the outputs."""

    name: str
    differentiable: bool

    def __call__(self, prompts: Sequence[Any], outputs: Any) -> torch.Tensor: ...


def check_rewards(reward: Reward, values: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Fail loudly on a wrong shape or non-finite values instead of training on them."""
    name = getattr(reward, "name", type(reward).__name__)
    if not isinstance(values, torch.Tensor):
        raise RewardError(f"reward '{name}' returned {type(values).__name__}, expected a torch.Tensor")
    if values.shape != (batch_size,):
        raise RewardError(f"reward '{name}' returned shape {tuple(values.shape)}, expected ({batch_size},)")
    bad = ~torch.isfinite(values.detach())
    if bad.any():
        idx = bad.nonzero().flatten().tolist()
        raise RewardError(f"reward '{name}' returned non-finite values at batch indices {idx[:10]}")
    return values


def score(reward: Reward, prompts: Sequence[Any], outputs: Any) -> torch.Tensor:
    """Call a reward and validate what it returned."""
    values = reward(prompts, outputs)
    return check_rewards(reward, values, len(prompts))


class WeightedSum:
    """Weighted sum of rewards; differentiable only when every part is."""

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float]):
        if len(rewards) != len(weights) or not rewards:
            raise ValueError("WeightedSum needs one weight per reward and at least one reward")
        self.rewards, self.weights = list(rewards), [float(w) for w in weights]
        self.name = "+".join(f"{w:g}*{r.name}" for r, w in zip(self.rewards, self.weights, strict=True))
        self.differentiable = all(r.differentiable for r in self.rewards)

    def __call__(self, prompts: Sequence[Any], outputs: Any) -> torch.Tensor:
        terms = [w * score(r, prompts, outputs) for r, w in zip(self.rewards, self.weights, strict=True)]
        return sum(terms[1:], terms[0])


class Clipped:
    """Clip a reward into [low, high] so a single outlier cannot dominate an update."""

    def __init__(self, reward: Reward, low: float, high: float):
        if low >= high:
            raise ValueError(f"Clipped: low ({low}) must be below high ({high})")
        self.reward, self.low, self.high = reward, low, high
        self.name, self.differentiable = f"clip({reward.name})", reward.differentiable

    def __call__(self, prompts: Sequence[Any], outputs: Any) -> torch.Tensor:
        return score(self.reward, prompts, outputs).clamp(self.low, self.high)


class Normalized:
    """Standardise a reward with fixed statistics (e.g. measured on the base model) to a common scale."""

    def __init__(self, reward: Reward, mean: float, std: float):
        if std <= 0:
            raise ValueError(f"Normalized: std must be positive, got {std}")
        self.reward, self.mean, self.std = reward, mean, std
        self.name, self.differentiable = f"norm({reward.name})", reward.differentiable

    def __call__(self, prompts: Sequence[Any], outputs: Any) -> torch.Tensor:
        return (score(self.reward, prompts, outputs) - self.mean) / self.std
