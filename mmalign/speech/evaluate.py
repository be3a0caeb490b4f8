"""Held-out metrics for speech diffusion policies: the image evaluator's rewards/win rate/KL, plus how well the
policy still denoises real held-out speech (DLPO's concern: alignment must not wreck the TTS model)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmalign.core.data import Row
from mmalign.core.policy import DiffusionPolicy
from mmalign.core.reward import Reward
from mmalign.evaluation.classifier import PromptedClassReward
from mmalign.evaluation.diffusion import DiffusionEvaluator
from mmalign.objectives.diffusion import denoising_error


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^½) between two feature sets (FID / FAD, Heusel et al. 2017)."""
    import numpy as np
    from scipy import linalg

    a64, b64 = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a64.mean(0), b64.mean(0)
    cov_a, cov_b = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    root = root.real if np.iscomplexobj(root) else root
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


class SpeechEvaluator(DiffusionEvaluator):
    """`DiffusionEvaluator` metrics on generated mels, plus `heldout_denoising_loss` and `frechet_to_real`.

    `heldout_denoising_loss`: mean ‖ε − ε_θ(x_t, t, c)‖² on real held-out recordings with their prompts, at
    `noise_draws` fixed (noise, t) draws per recording (the same draws at every evaluation, so before/after and
    runs compare exactly). Lower = the fine-tuned model still models real speech.

    `frechet_to_real`: Fréchet distance between the recogniser's penultimate features of generated speech and of
    the real held-out recordings (an FAD with the world's recogniser as the embedding; needs an `intelligibility`
    reward). Lower = generated speech is distributed more like real speech; a reward-hacked model that fools the
    recogniser with unnatural mels moves away from it.
    """

    def __init__(
        self,
        prompts: Sequence[Row],
        rewards: Sequence[Reward],
        *,
        judges: Sequence[Reward] = (),
        trained_on: str | None = None,
        real_speech: Sequence[Row] = (),
        noise_draws: int = 4,
        seeds: int = 4,
        batch_size: int = 32,
        grid_prompts: int = 8,
        kl: bool = True,
    ):
        super().__init__(
            prompts,
            rewards,
            judges=judges,
            trained_on=trained_on,
            seeds=seeds,
            batch_size=batch_size,
            grid_prompts=grid_prompts,
            kl=kl,
        )
        self.real_speech, self.noise_draws = list(real_speech), noise_draws
        self._real: tuple[list[str], torch.Tensor] | None = None
        self._last: torch.Tensor | None = None

    def prepare(self, policy: Any) -> None:
        """Read and check the held-out recordings (named errors) before any training starts."""
        from mmalign.speech.audio import read_wav

        if self._real is not None or not self.real_speech:
            return
        policy.check_prompts(self.real_speech)
        mels = []
        for row in self.real_speech:
            if "audio" not in row.data:
                raise row.error("audio", "held-out speech rows need an audio file path")
            wave = read_wav(_path(row), policy.sample_rate, row=row, field="audio")
            mels.append(policy.frontend(wave)[0])
        self._real = [r.data["prompt"] for r in self.real_speech], torch.stack(mels)

    @torch.no_grad()
    def heldout_denoising_loss(self, policy: DiffusionPolicy) -> float:
        self.prepare(policy)
        prompts, mels = self._real
        process = policy.forward_process
        g = torch.Generator().manual_seed(1234)
        total, count = 0.0, 0
        for _ in range(self.noise_draws):
            noise = torch.randn(mels.shape, generator=g)
            t = process.sample_timesteps(len(mels), generator=g)
            for s in range(0, len(mels), self.batch_size):
                sl = slice(s, s + self.batch_size)
                cond = policy.encode_prompts(prompts[sl])
                clean, eps, tt = (
                    mels[sl].to(policy.device),
                    noise[sl].to(policy.device),
                    t[sl].to(policy.device),
                )
                output = policy.predict(
                    process.add_noise(clean, eps, tt), process.model_timestep(tt), cond, guidance=1.0
                )
                loss = denoising_error(output, process.target(clean, eps, tt))
                total, count = total + loss.sum().item(), count + len(loss)
        return total / count

    def _images(self, policy: Any, jobs, *, kl: bool):
        """The parent's sampling; the first call of an evaluation (the policy's own mels) is kept for FAD."""
        images, kls = super()._images(policy, jobs, kl=kl)
        if self._last is None:
            self._last = images
        return images, kls

    @torch.no_grad()
    def frechet_to_real(self, generated: torch.Tensor) -> float | None:
        embedder = next((r for r in self.rewards if isinstance(r, PromptedClassReward)), None)
        if embedder is None or self._real is None:
            return None
        return frechet_distance(embedder.features(generated), embedder.features(self._real[1]))

    def evaluate(self, policy: Any) -> dict[str, float]:
        self._last = None
        metrics = super().evaluate(policy)
        metrics["n_clips"] = metrics.pop("n_images")
        if self.real_speech:
            metrics["heldout_denoising_loss"] = self.heldout_denoising_loss(policy)
            fad = self.frechet_to_real(self._last)
            if fad is not None:
                metrics["frechet_to_real"] = fad
        return metrics

    def samples(self, policy: Any) -> list[dict[str, Any]]:
        """The first prompts with seed 0, for the report's before/after audio and mel images."""
        return [{"prompt": s["prompt"], "mel": s["image"]} for s in super().samples(policy)]


def _path(row: Row):
    from pathlib import Path

    value = Path(str(row.data["audio"]))
    if value.is_absolute() or not row.source or row.source.startswith("<"):
        return value
    return Path(row.source).parent / value


class WaveformEvaluator(DiffusionEvaluator):
    """`DiffusionEvaluator`'s held-out metrics (every reward, win rate vs the base from the same noise, path KL to the
    base) on decoded waveforms; samples carry the waveform under `image`, as the report reads them."""

    def evaluate(self, policy: Any) -> dict[str, float]:
        metrics = super().evaluate(policy)
        metrics["n_clips"] = metrics.pop("n_images")
        return metrics
