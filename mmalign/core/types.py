"""Tensors that flow from policies to objectives, named so both sides agree on shapes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SequenceLogProbs:
    """Per-token log-probs of responses under a policy; prompt and padding positions are masked out.

    `token_logps[b, t]` is log π(y_t | x, y_<t) for response tokens and 0 elsewhere; `mask` is 1 on response
    tokens. `entropies` (optional) holds the per-token predictive entropy, used by Mallows-DPO.
    """

    token_logps: torch.Tensor
    mask: torch.Tensor
    entropies: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        """Number of response tokens per sample."""
        return self.mask.sum(-1)

    def split(self, n: int) -> tuple[SequenceLogProbs, SequenceLogProbs]:
        """Split a concatenated (first n, rest) batch, e.g. chosen then rejected."""

        def cut(t: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            return (None, None) if t is None else (t[:n], t[n:])

        (a_lp, b_lp), (a_m, b_m), (a_e, b_e) = cut(self.token_logps), cut(self.mask), cut(self.entropies)
        return SequenceLogProbs(a_lp, a_m, a_e), SequenceLogProbs(b_lp, b_m, b_e)


@dataclass
class Trajectory:
    """A recorded denoising trajectory: what a diffusion policy-gradient objective needs to re-score steps.

    `latents[:, i]` is x_{t_i} and `next_latents[:, i]` the sampled x_{t_{i+1}}; `logprobs[:, i]` is the Gaussian
    log-density of that transition under the sampling weights and `means[:, i]` its Gaussian's mean (so a KL to
    another model needs only that model's predictions); `conditioning` holds whatever the denoiser needs (text
    embeddings, guidance scale) in the adapter's own format.
    """

    latents: torch.Tensor
    next_latents: torch.Tensor
    timesteps: torch.Tensor
    logprobs: torch.Tensor
    conditioning: dict[str, Any] = field(default_factory=dict)
    final: torch.Tensor | None = None
    means: torch.Tensor | None = None
