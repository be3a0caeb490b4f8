"""Audio I/O and mel features for the speech adapter: soundfile for WAVs, torchaudio transforms for mels.

torchaudio.load/save need torchcodec (not usable here), so files go through soundfile; every problem with a file
(unreadable, empty, wrong sample rate) is an `AudioError` naming the file and, for dataset rows, row and field.
Mels are log-magnitude mel spectrograms standardised with the statistics of the model's training data, padded or
cut to a fixed number of frames: the `[1, n_mels, frames]` "image" the TTS diffusion model denoises.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mmalign.core.data import DataError, Row

MEL_CONFIG_NAME = "mel.json"


class AudioError(DataError):
    """An audio file that cannot be used: unreadable, empty, or at a sample rate the model was not built for."""


@dataclass
class MelConfig:
    """How waveforms become model mels and back; saved next to a model so its vocoder matches its features."""

    sample_rate: int = 8000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 200
    n_mels: int = 32
    frames: int = 32
    f_min: float = 50.0
    f_max: float = 4000.0
    floor: float = 1e-4  # log(max(mel, floor)): silence has a fixed level
    mean: float = 0.0  # standardisation of log-mels (set from the training data)
    std: float = 1.0
    griffin_lim_iters: int = 32

    @property
    def num_samples(self) -> int:
        """Waveform length that gives exactly `frames` frames (centered STFT)."""
        return (self.frames - 1) * self.hop_length

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / MEL_CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> MelConfig:
        path = Path(directory) / MEL_CONFIG_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path}: no mel config (expected next to a speech model)")
        return cls(**json.loads(path.read_text()))


def _error(path: Path, row: Row | None, field: str | None, message: str) -> AudioError:
    if row is not None:
        return AudioError(row.source, row.line, field, f"{path}: {message}", row.unit)
    return AudioError(str(path), None, field, message)


def read_wav(
    path: str | Path, sample_rate: int, *, row: Row | None = None, field: str | None = None
) -> torch.Tensor:
    """A mono float waveform in [-1, 1] (channels averaged); unreadable/empty/wrong-rate files are `AudioError`."""
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise _error(path, row, field, "audio file not found")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise _error(path, row, field, f"cannot read audio: {err}") from None
    if data.shape[0] == 0:
        raise _error(path, row, field, "audio file is empty (0 samples)")
    if rate != sample_rate:
        raise _error(path, row, field, f"sample rate is {rate} Hz, the model expects {sample_rate} Hz")
    wave = torch.from_numpy(data.mean(1))
    if not torch.isfinite(wave).all():
        raise _error(path, row, field, "audio contains NaN or inf samples")
    return wave


def write_wav(path: str | Path, wave: torch.Tensor | np.ndarray, sample_rate: int) -> None:
    """Write a mono waveform as 16-bit PCM WAV (values clipped to [-1, 1])."""
    import soundfile as sf

    arr = wave.detach().cpu().float().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
    sf.write(str(path), np.clip(arr.reshape(-1), -1.0, 1.0), sample_rate, subtype="PCM_16")


class MelFrontend(torch.nn.Module):
    """Waveform `[B, samples]` → standardised log-mel `[B, 1, n_mels, frames]` (fixed length: pad or cut)."""

    def __init__(self, config: MelConfig):
        super().__init__()
        import torchaudio

        self.config = config
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=config.sample_rate,
            n_fft=config.n_fft,
            win_length=config.win_length,
            hop_length=config.hop_length,
            f_min=config.f_min,
            f_max=config.f_max,
            n_mels=config.n_mels,
            power=1.0,
        )

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """Unstandardised log-mel of waveforms padded or cut to the model's length."""
        n = self.config.num_samples
        wave = wave[..., :n]
        if wave.shape[-1] < n:
            wave = torch.nn.functional.pad(wave, (0, n - wave.shape[-1]))
        return self.mel(wave).clamp_min(self.config.floor).log()

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() == 1:
            wave = wave[None]
        return ((self.log_mel(wave) - self.config.mean) / self.config.std)[:, None]


class GriffinLimVocoder(torch.nn.Module):
    """Standardised log-mel `[B, 1, n_mels, frames]` → waveform `[B, samples]`: inverse mel scale + Griffin-Lim.

    Phase is estimated iteratively from a fixed start (`rand_init=False`), so the same mel gives the same audio.
    """

    def __init__(self, config: MelConfig):
        super().__init__()
        import torchaudio

        self.config = config
        self.inverse_mel = torchaudio.transforms.InverseMelScale(
            n_stft=config.n_fft // 2 + 1,
            n_mels=config.n_mels,
            sample_rate=config.sample_rate,
            f_min=config.f_min,
            f_max=config.f_max,
        )
        self.griffin_lim = torchaudio.transforms.GriffinLim(
            n_fft=config.n_fft,
            win_length=config.win_length,
            hop_length=config.hop_length,
            power=1.0,
            n_iter=config.griffin_lim_iters,
            rand_init=False,
        )
        # No waveform in [-1, 1] has a mel value above (largest filter's weight sum) × (window sum). Louder mels,
        # which a reward-hacked model can produce, are clipped there, so exp and the inverse mel stay finite.
        window = torch.hann_window(config.win_length).sum()
        self.max_log_mel = math.log(float(self.inverse_mel.fb.sum(0).max() * window))

    @torch.no_grad()
    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        log_mel = mels.squeeze(1).float() * self.config.std + self.config.mean
        mel = log_mel.clamp(max=self.max_log_mel).exp()
        spec = self.inverse_mel(mel).clamp_min(0)
        wave = self.griffin_lim(spec)
        peak = wave.abs().amax(-1, keepdim=True).clamp_min(1e-6)
        return wave * torch.where(peak > 0.99, 0.99 / peak, torch.ones_like(peak))
