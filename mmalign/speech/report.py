"""Before/after WAV files and mel-spectrogram images of fixed prompts: the speech part of a run report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmalign.core.reward import score
from mmalign.speech.audio import GriffinLimVocoder, MelConfig, write_wav


def mel_figure(mels: torch.Tensor, titles: list[str], out: Path) -> None:
    """One panel per mel (frequency up, time right), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(mels)
    fig, axes = plt.subplots(1, n, figsize=(1.6 * n, 1.9), squeeze=False)
    for ax, mel, title in zip(axes.flat, mels, titles, strict=True):
        ax.imshow(
            mel.squeeze(0).float().numpy(), origin="lower", aspect="auto", cmap="magma", vmin=-1.2, vmax=2.2
        )
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


class SpeechSamples:
    """Saves `samples_<tag>_<i>.wav` (Griffin-Lim) and `mels_<tag>.png` for held-out prompts (seed 0); each mel is
    titled with its prompt and what the first reward reads in it (e.g. the recogniser's digit)."""

    def __init__(self, mel: MelConfig, rewards: Sequence[Any] = ()):
        self.mel, self.vocoder, self.rewards = mel, GriffinLimVocoder(mel), list(rewards)

    def store_samples(self, run_dir: Path, tag: str, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not samples:
            return []
        mels = torch.stack([s["mel"] for s in samples]).cpu()
        prompts = [s["prompt"] for s in samples]
        read = self._readings(prompts, mels)
        waves = self.vocoder(mels)
        out = []
        for i, (s, wave) in enumerate(zip(samples, waves, strict=True)):
            name = f"samples_{tag}_{i}.wav"
            write_wav(run_dir / name, wave, self.mel.sample_rate)
            record = {"prompt": s["prompt"], "wav": name, "mel_image": f"mels_{tag}.png", "column": i}
            out.append({**record, "reading": read[i]} if read[i] else record)
        titles = [f"{p}\n{r}" if r else p for p, r in zip(prompts, read, strict=True)]
        mel_figure(mels, titles, run_dir / f"mels_{tag}.png")
        return out

    def _readings(self, prompts: list[str], mels: torch.Tensor) -> list[str]:
        if not self.rewards:
            return [""] * len(prompts)
        reward = self.rewards[0]
        if hasattr(reward, "readings"):
            return list(reward.readings(prompts, mels))
        with torch.no_grad():
            return [f"{reward.name} {v:.3g}" for v in score(reward, prompts, mels).float().tolist()]

    def sample_lines(self, samples: dict[str, list[dict[str, Any]]]) -> list[str]:
        lines = wav_table(samples, "## Samples (held-out prompts, same seed): before, then after")
        if lines and self.rewards:
            lines[1] += f" (mel titles: what {self.rewards[0].name} reads)"
        return (
            [*lines, "", "![mels before](mels_before.png)", "", "![mels after](mels_after.png)"]
            if lines
            else []
        )


class WaveformSamples:
    """Run report with before/after WAV files of the evaluator's fixed-seed samples (waveform outputs, e.g. the
    AudioLDM 2 policy; samples carry the waveform under `image`, as the evaluator returns them)."""

    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate

    def store_samples(self, run_dir: Path, tag: str, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for i, s in enumerate(samples):
            name = f"samples_{tag}_{i}.wav"
            write_wav(run_dir / name, s["image"], self.sample_rate)
            out.append({"prompt": s["prompt"], "wav": name})
        return out

    def sample_lines(self, samples: dict[str, list[dict[str, Any]]]) -> list[str]:
        return wav_table(samples, "## Samples (held-out prompts, same seed)")


def wav_table(samples: dict[str, list[dict[str, Any]]], heading: str) -> list[str]:
    """Markdown rows linking each prompt's before/after WAV files; nothing until both sides exist."""
    before, after = samples.get("before", []), samples.get("after", [])
    if not before or not after:
        return []
    lines = ["", heading, "", "| prompt | before | after |", "|---|---|---|"]
    for b, a in zip(before, after, strict=False):
        lines.append(f"| {a['prompt']} | [{b['wav']}]({b['wav']}) | [{a['wav']}]({a['wav']}) |")
    return lines
