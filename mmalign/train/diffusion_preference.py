"""Diffusion-DPO: the preference objectives on a diffusion policy, through the denoising-error surrogate.

`PairDenoisingScores` gives a diffusion policy the two calls `PreferenceAlgorithm` makes of a sequence policy:
`collate_pairs` (the preferred and rejected latents of each pair, noised with one shared noise draw and timestep)
and `sequence_logprobs` (per sample −½‖target − model(x_t, t)‖², Diffusion-DPO's stand-in for log p(x₀ | c), as a
one-"token" sequence). With it every preference loss that needs neither token lengths nor entropies runs on images
and speech unchanged (Wallace et al. 2023; seed 004 §5.2.1).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from mmalign.core.data import Row
from mmalign.core.policy import DiffusionPolicy
from mmalign.core.types import SequenceLogProbs
from mmalign.objectives.diffusion import denoising_error, denoising_logprob_surrogate


class PairDenoisingScores:
    """A diffusion policy seen as a scorer of preference pairs (Diffusion-DPO's surrogate log-likelihood)."""

    deterministic_scores = False  # every batch draws fresh (noise, t): reference scores cannot be precomputed
    vocab_size = 0

    def __init__(self, policy: DiffusionPolicy):
        self.policy = policy

    @contextmanager
    def reference(self) -> Iterator[None]:
        with self.policy.reference():
            yield

    def encode_pair(self, row: Row) -> dict[str, Any]:
        return self.policy.encode_pair(row)

    def release_reference(self) -> None:
        raise ValueError("a diffusion policy's reference scores depend on each batch's noise draw")

    def collate_pairs(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Preferred then rejected latents; each pair shares one noise draw and one timestep (Diffusion-DPO)."""
        n = len(examples)
        latents = torch.stack([e["latents_w"] for e in examples] + [e["latents_l"] for e in examples])
        noise = torch.randn((n, *latents.shape[1:])).repeat(2, *[1] * (latents.dim() - 1))
        t = self.policy.forward_process.sample_timesteps(n).repeat(2)
        prompts = [e["prompt"] for e in examples]
        return {
            "latents": latents,
            "noise": noise,
            "timesteps": t,
            "conditioning": self.policy.encode_prompts(prompts + prompts),
        }

    def sequence_logprobs(self, batch: dict[str, Any], *, entropies: bool = False) -> SequenceLogProbs:
        """Per sample −½ · denoising error at the batch's (noise, t), unguided, as a one-token sequence."""
        if entropies:
            raise ValueError("this loss needs token entropies; diffusion policies have none")
        policy, process = self.policy, self.policy.forward_process
        dev = policy.device
        clean, noise, t = batch["latents"].to(dev), batch["noise"].to(dev), batch["timesteps"].to(dev)
        cond = {k: v.to(dev) for k, v in batch["conditioning"].items()}
        output = policy.predict(
            process.add_noise(clean, noise, t), process.model_timestep(t), cond, guidance=1.0
        )
        logp = denoising_logprob_surrogate(
            denoising_error(output, process.target(clean, noise, t))
        ).unsqueeze(-1)
        return SequenceLogProbs(logp, torch.ones_like(logp))
