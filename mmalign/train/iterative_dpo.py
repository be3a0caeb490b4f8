"""Iterative online DPO (seed 003, "RLHF Workflow: From Reward Modeling to Online RLHF", Algorithm 2 and §3.3).

For iteration t = 0, 1, …: the policy π_t at the iteration's start samples k responses to each prompt of the
iteration, a reward model ranks them, a pair rule (`max_min`: best vs worst, seed 003's choice; `max_random`;
`random`; optionally on the length-penalised reward r̃ = r − λ|y| of seed 003 Eq. (9)) makes one pair per prompt,
and DPO (any per-pair preference loss) trains on those pairs, continuing from the weights the last iteration
ended with. The reference is `fixed` (π_0, the starting model, as seed 003 does) or `previous` (π_t, the policy at
the iteration's start, as in Xiong et al. 2023's per-iteration reference).

How it maps onto the trainer: every rollout is one batch of prompts, and an iteration is the
`prompts_per_iteration / prompts per rollout` rollouts in a row. All rollouts of an iteration sample from π_t, so
at the iteration's first rollout the trainable weights are snapshotted (the LoRA adapter, or every weight when
fully fine-tuning: one more copy of the trained parameters in memory; with `reference: previous` the frozen
π_0 copy of full fine-tuning is released, so memory stays at two copies) and later rollouts of the iteration swap
the snapshot in to sample and score. With `reference: previous` the reference's log-probs are the snapshot's,
computed in the same pass. The snapshot and the rollout count are the algorithm's checkpoint state, so resuming
in the middle of an iteration samples from the same π_t.

Differences from seed 003: each iteration trains on its own fresh pairs (seed 003 retrains on the pairs of all
past iterations, 𝒟_{1:t−1}), and one optimizer and learning-rate schedule span all iterations.
Per-iteration held-out numbers: set `train.eval_every` to the steps of one iteration
(prompts_per_iteration / prompts per rollout × ppo_epochs); metrics.jsonl then holds an `eval/*` row at each
iteration end and `rollout/iteration` on every training row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from mmalign.core.data import Row
from mmalign.core.policy import SequencePolicy
from mmalign.core.reward import Reward, score
from mmalign.core.types import Batch
from mmalign.train.distributed import process_info
from mmalign.train.online import OnlineDPO, OnlineDPOConfig

REFERENCES = ("fixed", "previous")


@dataclass
class IterativeDPOConfig(OnlineDPOConfig):
    """The `algorithm:` section of iterative_dpo: OnlineDPO's sampling and pair settings plus the iterations."""

    name: str = "iterative_dpo"
    samples_per_prompt: int = 8  # seed 003 draws 8 responses per prompt and pairs the best with the worst
    prompts_per_iteration: int = (
        0  # required: prompts sampled by π_t in one iteration (a multiple of a rollout's)
    )
    iterations: int | None = None  # optional: the run must not go past this many iterations
    reference: str = "fixed"  # fixed: π_0 · previous: π_t, the policy at the iteration's start

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompts_per_iteration < 1:
            raise ValueError(f"prompts_per_iteration must be ≥ 1, got {self.prompts_per_iteration}")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"iterations must be ≥ 1, got {self.iterations}")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be fixed or previous, got {self.reference!r}")


class IterativeDPO(OnlineDPO):
    """Seed 003's iterative online DPO: all samples of an iteration come from the policy at its start."""

    config: IterativeDPOConfig

    def __init__(
        self, policy: SequencePolicy, prompts: Sequence[Row], reward: Reward, config: IterativeDPOConfig
    ):
        super().__init__(policy, prompts, reward, config)
        if (
            config.reference == "previous"
            and not self.reference_at_rollout
            and self.preference.needs_reference
        ):
            raise ValueError(
                f"reference: previous scores the reference when pairs are drawn; loss "
                f"{self.preference.config.loss!r} needs reference entropies, which are computed in the loss"
            )
        self.rollouts = 0  # rollouts done so far (each covers one batch of prompts)
        self.snapshot: dict[str, torch.Tensor] | None = None  # π_t's trainable weights

    def setup(self) -> None:
        """With a per-iteration reference, the frozen π_0 copy (full fine-tuning) is never read: free it."""
        if self.config.reference == "previous":
            self.policy.release_reference()

    def _iteration_of(self, prompts_in_rollout: int) -> tuple[int, int]:
        """(iteration, rollout within it) of the next rollout; its size must divide prompts_per_iteration."""
        cfg = self.config
        if cfg.prompts_per_iteration % prompts_in_rollout:
            raise ValueError(
                f"algorithm.prompts_per_iteration ({cfg.prompts_per_iteration}) must be a multiple of the prompts "
                f"of one rollout ({prompts_in_rollout}: train.rollout_prompts, or train.batch_size / "
                "samples_per_prompt)"
            )
        iteration, within = divmod(self.rollouts, cfg.prompts_per_iteration // prompts_in_rollout)
        if cfg.iterations is not None and iteration >= cfg.iterations:
            raise ValueError(
                f"train.max_steps goes past algorithm.iterations ({cfg.iterations}) × prompts_per_iteration "
                f"({cfg.prompts_per_iteration}); lower max_steps or raise iterations"
            )
        return iteration, within

    @contextmanager
    def _weights_of_iteration_start(self, fresh: bool) -> Iterator[None]:
        """Forward passes inside use π_t: the current weights at an iteration's first rollout, else the snapshot
        swapped in (and the current weights put back after)."""
        if fresh:
            yield
            return
        current = self.policy.trainable_state_dict()
        self.policy.load_trainable_state_dict(self.snapshot)
        try:
            yield
        finally:
            self.policy.load_trainable_state_dict(current)

    @torch.no_grad()
    def rollout(self, rows: Sequence[Row]) -> tuple[Batch | list[dict[str, Any]], dict[str, float]]:
        iteration, within = self._iteration_of(len(rows) * process_info()[1])
        if within == 0:
            self.snapshot = self.policy.trainable_state_dict()
        k = self.samples_per_prompt
        prompts = [self.policy.prompt_of(r) for r in rows]
        reward_prompts = [self.policy.reward_prompt(r) for r in rows for _ in range(k)]
        with self._weights_of_iteration_start(fresh=within == 0):
            samples, scored = self._draw(prompts, k)
            rewards = score(self.reward, reward_prompts, scored).float().cpu()
            pairs, metrics = self._pairs(prompts, samples, rewards)
        self.rollouts += 1
        return pairs, {**metrics, "rollout/iteration": float(iteration)}

    def _reference_scores(self, inputs: dict[str, torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """π_0's scores (fixed), or π_t's: the weights loaded while the pairs are drawn (previous)."""
        if self.config.reference == "previous":
            return self._sequence_scores(inputs, n)
        return super()._reference_scores(inputs, n)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rollouts": self.rollouts, "snapshot": self.snapshot}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict({k: v for k, v in state.items() if k not in ("rollouts", "snapshot")})
        self.rollouts, self.snapshot = int(state["rollouts"]), state["snapshot"]
