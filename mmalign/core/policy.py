"""The policy kinds every objective family is written against (see DESIGN.md), exactly as algorithms call them.

Algorithms, evaluators and the trainer are typed against these protocols, so what a new adapter must provide is
written here and checked by the type checker, not discovered by `hasattr` at run time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch

from mmalign.core.data import Row
from mmalign.core.sampler import ForwardProcess, Sampler
from mmalign.core.types import Conditioning, SequenceLogProbs, Trajectory


@runtime_checkable
class Policy(Protocol):
    """What the trainer needs from anything it trains: the network, a reference view, persistence, placement.

    `module` is the trained network; the trainer wraps it for distributed training and hands the wrapper back
    with `attach`, and forward passes that must synchronise gradients go through the attached wrapper.
    """

    @property
    def module(self) -> torch.nn.Module:
        """The trained network (read-only here, so an adapter may hold a more specific network type)."""
        ...

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def reference(self) -> AbstractContextManager[Any]:
        """Context in which forward passes use the frozen reference (adapter disabled or frozen copy)."""
        ...

    def attach(self, model: torch.nn.Module) -> None:
        """Use `model` (the trainer's prepared wrapper of `module`) for training forward passes."""
        ...

    def move_frozen_to(self, device: torch.device) -> None:
        """Put the parts that never train (reference copy, encoders, decoders) on the trained module's device."""
        ...

    def save_pretrained(self, path: str) -> None: ...


@runtime_checkable
class SequencePolicy(Policy, Protocol):
    """A policy whose outputs are token sequences: text LLMs and vision-language models."""

    vocab_size: int
    tokenizer: Any  # its eos id ends a response (online algorithms tell finished from truncated ones)

    def prompt_of(self, row: Row) -> Any:
        """What `generate` takes for a prompt row (a string or conversation; for a VLM, the encoded image + text)."""
        ...

    def reward_prompt(self, row: Row) -> Any:
        """What rewards receive as the prompt of a row's samples (the prompt text; a VLM's row with its image)."""
        ...

    def encode_pair(self, row: Row) -> dict[str, Any]: ...

    def encode_completion(self, row: Row, field: str = "completion") -> dict[str, Any]: ...

    def collate_pairs(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Tokenised prompt+chosen and prompt+rejected of every pair in one batch (chosen first)."""
        ...

    def collate_completions(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]: ...

    def sequence_logprobs(
        self, batch: dict[str, torch.Tensor], *, entropies: bool = False, hidden_states: bool = False
    ) -> SequenceLogProbs:
        """Per-token log-probs of the batch's responses under the current (or reference) weights (and, with
        `hidden_states`, the last hidden state at each predicting position)."""
        ...

    def generate(
        self, prompts: Sequence[Any], *, num_samples: int = 1, greedy: bool = False
    ) -> list[dict[str, Any]]:
        """Responses (`prompt_ids`, `response_ids`, `text`), `num_samples` per prompt, grouped contiguously."""
        ...

    def release_reference(self) -> None:
        """Free the frozen reference copy once its log-probs are precomputed (a no-op under LoRA)."""
        ...


@runtime_checkable
class ImageSequencePolicy(SequencePolicy, Protocol):
    """A sequence policy that reads an image with every prompt (POVID, RLHF-V): rows are encoded per field."""

    def encode_row_prompt(self, row: Row, image_field: str | None = None) -> dict[str, Any]: ...

    def encode_response(self, row: Row, prompt_ids: list[int], field: str) -> list[int]: ...

    def collate(
        self, sequences: Sequence[tuple[list[int], list[int], torch.Tensor]]
    ) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class DiffusionPolicy(Policy, Protocol):
    """A policy that denoises: text-to-image and text-to-speech diffusion and flow-matching models.

    It owns a `sampler` (the denoising steps, with their Gaussians) and a `forward_process` (how clean outputs are
    noised for training losses); algorithms compose the objective math from `predict`, the sampler's steps and the
    forward process, so the adapter only says how prompts, outputs and weights look in its modality.
    """

    sampler: Sampler
    forward_process: ForwardProcess
    guidance_scale: float
    sample_shape: tuple[int, ...]

    @property
    def device(self) -> torch.device: ...

    def prompt_of(self, row: Row) -> Any: ...

    def reward_prompt(self, row: Row) -> Any: ...

    def encode_prompts(self, prompts: Sequence[Any]) -> Conditioning:
        """Conditioning tensors of prompts (batch-first, keyed by the denoiser's inputs)."""
        ...

    def unconditional(self, n: int) -> Conditioning:
        """The unconditional (empty-prompt) branch's conditioning for a batch of n."""
        ...

    def predict(
        self, x: torch.Tensor, t: torch.Tensor, conditioning: Conditioning, *, guidance: float | None = None
    ) -> torch.Tensor:
        """The denoiser's output (ε, v or velocity, as the sampler expects) with classifier-free guidance."""
        ...

    def sample(
        self,
        prompts: Sequence[Any],
        *,
        generator: torch.Generator | None = None,
        record: bool = True,
        initial: torch.Tensor | None = None,
        sampler: Sampler | None = None,
    ) -> Trajectory:
        """Run the sampler (or `sampler` instead) from noise (or `initial`), recording every transition when
        `record`."""
        ...

    def decode(self, latents: torch.Tensor) -> Any:
        """The modality's outputs (images, mels, waveforms) from final latents; differentiable."""
        ...

    def encode_pair(self, row: Row) -> dict[str, Any]:
        """A preference row's two outputs as latents: {prompt, latents_w, latents_l}."""
        ...

    def encode_target(self, row: Row) -> dict[str, Any]:
        """A real output of a prompt as latents: {prompt, latents} (DLPO's and ReFL's pretraining data)."""
        ...

    def write_outputs(self, outputs: Any, prompts: Sequence[Any], out_dir: str, stem: str) -> list[str]:
        """Save decoded outputs as files (PNG, WAV) and return their paths (what `mmalign sample` prints)."""
        ...


@runtime_checkable
class ScorerPolicy(Policy, Protocol):
    """A reward model being trained: scores each sequence of a collated pair batch (chosen first)."""

    def encode_pair(self, row: Row) -> dict[str, Any]: ...

    def collate_pairs(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]: ...

    def scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...
