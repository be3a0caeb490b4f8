"""What the trainer asks of an algorithm, an evaluator and a report (see DESIGN.md)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from mmalign.core.data import Row

LossTerm = Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def summed_terms(terms: Sequence[LossTerm], owner: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A loss split into terms, summed: the per-sample loss and metrics the trainer accumulates term by term."""
    total: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = {}
    for term in terms:
        losses, more = term()
        total = losses if total is None else total + losses
        for name, value in more.items():
            metrics[name] = metrics.get(name, 0) + value
    if total is None:
        raise RuntimeError(f"{owner} built no loss terms")
    return total, metrics


@runtime_checkable
class Algorithm(Protocol):
    """Glue between an objective family and a policy kind.

    `loss` returns per-sample losses (the trainer averages them over the global batch, which makes gradient
    accumulation and multi-process runs exact) and a dict of scalar metrics; `loss_terms` the same loss as closures
    whose sum it is, which the trainer backwards one at a time so only one term's graph is alive (memory ∝ one
    term). Offline algorithms expose `train_examples`; online ones `prompts`, `samples_per_prompt` and `rollout`,
    which samples, scores and returns one batch (anything sliceable: a list of examples or a `Batch`).
    The trainer sets `updates_per_rollout` (`train.ppo_epochs`) before `setup`: with one optimizer step per
    rollout an algorithm may skip work, such as the old log-prob forward.
    """

    online: bool
    updates_per_rollout: int | None

    def setup(self) -> None:
        """Work done once before the first step (e.g. precomputing reference log-probs)."""
        ...

    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def loss_terms(self, batch: Any) -> list[LossTerm]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class AlgorithmBase:
    """Defaults for algorithms: nothing to set up, one loss term, no state to checkpoint."""

    online: bool = False
    updates_per_rollout: int | None = None  # set by the trainer; None: unknown

    def setup(self) -> None:
        """Nothing to precompute."""

    def loss_terms(self, batch: Any) -> list[LossTerm]:
        return [lambda: self.loss(batch)]  # type: ignore[attr-defined]  # every algorithm defines `loss`

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stateless algorithms restore nothing."""


@runtime_checkable
class OfflineAlgorithm(Algorithm, Protocol):
    train_examples: Sequence[Any]


@runtime_checkable
class OnlineAlgorithm(Algorithm, Protocol):
    prompts: Sequence[Row]
    samples_per_prompt: int

    def rollout(self, rows: Sequence[Row]) -> tuple[Any, dict[str, float]]: ...


class Evaluator(Protocol):
    """Held-out metrics of a policy (the same dict before and after training) and samples for the report."""

    def evaluate(self, policy: Any) -> dict[str, float]: ...

    def samples(self, policy: Any) -> list[dict[str, Any]]: ...


class Report(Protocol):
    """Writes the human-readable part of a run directory (report.md, curves, sample files)."""

    def store_samples(
        self, run_dir: Path, tag: str, samples: list[dict[str, Any]]
    ) -> list[dict[str, Any]]: ...

    def write(
        self, run_dir: Path, summary: dict[str, Any], samples: dict[str, list[dict[str, Any]]]
    ) -> None: ...
