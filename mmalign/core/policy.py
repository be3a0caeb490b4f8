"""The two policy kinds every objective family is written against (see DESIGN.md)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch

from mmalign.core.types import SequenceLogProbs, Trajectory


@runtime_checkable
class Policy(Protocol):
    """What the trainer needs from any policy: trainable parameters, a reference view and persistence."""

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def reference(self) -> AbstractContextManager[Any]:
        """Context in which forward passes use the frozen reference (adapter disabled or frozen copy)."""
        ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def save_pretrained(self, path: str) -> None: ...


@runtime_checkable
class SequencePolicy(Policy, Protocol):
    """A policy whose outputs are token sequences: text LLMs and vision-language models."""

    def collate_pairs(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Tokenise prompt+chosen and prompt+rejected rows into one concatenated batch (chosen first)."""
        ...

    def collate_completions(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Tokenise prompt+completion rows (SFT, KTO, online rollouts) into one batch."""
        ...

    def sequence_logprobs(
        self, batch: dict[str, torch.Tensor], *, entropies: bool = False
    ) -> SequenceLogProbs:
        """Per-token log-probs of the batch's responses under the current weights."""
        ...

    def generate(self, prompts: Sequence[Any], *, num_samples: int = 1, greedy: bool = False) -> list[str]:
        """Sample (or greedily decode) responses; `num_samples` per prompt, grouped contiguously."""
        ...


@runtime_checkable
class DiffusionPolicy(Policy, Protocol):
    """A policy that denoises: text-to-image and text-to-speech diffusion models.

    Policy-gradient objectives use `sample(..., record=True)` and `step_logprob`; preference objectives use
    `denoising_loss` at a shared (noise, timestep) for policy and reference.
    """

    def sample(
        self, prompts: Sequence[Any], *, generator: torch.Generator | None = None, record: bool = True
    ) -> Trajectory:
        """Run the sampler, recording latents, timesteps and per-step log-probs."""
        ...

    def step_logprob(self, trajectory: Trajectory, step: int) -> torch.Tensor:
        """Log-density of the recorded transition at `step` under the current weights, shape [B]."""
        ...

    def denoising_loss(
        self, clean: torch.Tensor, conditioning: dict[str, Any], noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample denoising loss ‖ε − ε_θ(x_t, t, c)‖², shape [B]."""
        ...

    def decode(self, final: torch.Tensor) -> Any:
        """Turn final latents into the modality's output (images, waveforms)."""
        ...
