"""Tensors that flow from policies to objectives, named so both sides agree on shapes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SequenceLogProbs:
    """Per-token log-probs of responses under a policy; prompt and padding positions are masked out.

    `token_logps[b, t]` is log π(y_t | x, y_<t) for response tokens and 0 elsewhere; `mask` is 1 on response
    tokens. `entropies` (optional) holds the per-token predictive entropy, used by Mallows-DPO; `hidden_states`
    (optional, [B, T, H]) the last layer's hidden state at the position that predicts each token (PPO's value head).
    """

    token_logps: torch.Tensor
    mask: torch.Tensor
    entropies: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        """Number of response tokens per sample."""
        return self.mask.sum(-1)

    def split(self, n: int) -> tuple[SequenceLogProbs, SequenceLogProbs]:
        """Split a concatenated (first n, rest) batch, e.g. chosen then rejected."""

        def cut(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return t[:n], t[n:]

        (a_lp, b_lp), (a_m, b_m) = cut(self.token_logps), cut(self.mask)
        a_e, b_e = (None, None) if self.entropies is None else cut(self.entropies)
        return SequenceLogProbs(a_lp, a_m, a_e), SequenceLogProbs(b_lp, b_m, b_e)


Conditioning = dict[str, torch.Tensor]
"""A denoiser's conditioning inputs by name (text embeddings, pooled embeddings, time ids, attention masks), each
batch-first so a batch of prompts can be indexed, concatenated with the unconditional branch and stacked."""


@dataclass
class Trajectory:
    """A recorded denoising trajectory: what a diffusion policy-gradient objective needs to re-score steps.

    `latents[:, i]` is the sample before step i and `next_latents[:, i]` the sample it drew; `logprobs[:, i]` is the
    Gaussian log-density of that transition under the sampling weights and `means[:, i]` its Gaussian's mean (so a
    KL to another model needs only that model's predictions); `stochastic[i]` says whether step i drew noise (a
    deterministic step has no log-prob). `conditioning` holds the prompts' conditioning tensors. Without recording,
    only `final` (and `timesteps`) are set.
    """

    latents: torch.Tensor
    next_latents: torch.Tensor
    timesteps: torch.Tensor
    logprobs: torch.Tensor
    stochastic: torch.Tensor
    conditioning: Conditioning = field(default_factory=dict)
    final: torch.Tensor = field(kw_only=True)  # the sampled outputs' latents, always set
    means: torch.Tensor | None = None


class Batch:
    """Named fields that share a first dimension (tensors or lists): a rollout that stays one indexable batch.

    `batch["advantages"]` is a field; `batch[a:b]` (or an index tensor / list) selects those samples of every field,
    so the trainer can split a rollout into micro-batches and processes without unstacking it into examples.
    """

    def __init__(self, **fields: Any):
        sizes = {name: len(value) for name, value in fields.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"batch fields differ in length: {sizes}")
        self.fields = fields

    def __len__(self) -> int:
        return len(next(iter(self.fields.values()))) if self.fields else 0

    def __contains__(self, name: str) -> bool:
        return name in self.fields

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return self.fields[key]
        if isinstance(key, slice):
            return Batch(**{n: v[key] for n, v in self.fields.items()})
        index = torch.as_tensor(key, dtype=torch.long)
        return Batch(
            **{
                n: v[index] if isinstance(v, torch.Tensor) else [v[i] for i in index.tolist()]
                for n, v in self.fields.items()
            }
        )

    def to(self, device: torch.device | str) -> Batch:
        """The batch with every tensor field on `device`."""
        return Batch(
            **{n: v.to(device) if isinstance(v, torch.Tensor) else v for n, v in self.fields.items()}
        )
