"""What the trainer asks of an algorithm: examples in, per-sample losses out (see DESIGN.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from mmalign.core.data import Row


@runtime_checkable
class Algorithm(Protocol):
    """Glue between an objective family and a policy kind.

    `loss` returns per-sample losses (the trainer averages them over the global batch, which makes gradient
    accumulation and multi-process runs exact) and a dict of scalar metrics. Offline algorithms expose
    `train_examples`; online ones expose `prompts` and `rollout`, which samples, scores and returns examples.
    """

    online: bool

    # Optional: `loss_terms(examples) -> list[Callable[[], (losses, metrics)]]`, terms whose sum is `loss`. The
    # trainer backwards each term on its own so only one term's graph is alive at a time (memory ∝ one term).

    def loss(self, examples: Sequence[Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class OfflineAlgorithm(Algorithm, Protocol):
    train_examples: Sequence[Any]

    def setup(self) -> None:
        """Work done once before the first step (e.g. precomputing reference log-probs)."""
        ...


@runtime_checkable
class OnlineAlgorithm(Algorithm, Protocol):
    prompts: Sequence[Row]
    samples_per_prompt: int

    def rollout(self, rows: Sequence[Row]) -> tuple[list[Any], dict[str, float]]: ...


class Evaluator(Protocol):
    """Held-out metrics of a policy (the same dict before and after training) and samples for the report."""

    def evaluate(self, policy: Any) -> dict[str, float]: ...

    def samples(self, policy: Any) -> list[dict[str, Any]]: ...
