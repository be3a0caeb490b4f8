"""Speech rewards on generated mels: recogniser intelligibility, a signal measure, and DNSMOS (evaluation only).

Every reward takes standardised log-mels `[B, 1, n_mels, frames]` (what `DiffusionSpeechPolicy.decode` returns);
rewards that need audio vocode them with the model's own Griffin-Lim settings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mmalign.evaluation.classifier import PromptedClassReward
from mmalign.speech.audio import GriffinLimVocoder, MelConfig


class Intelligibility(PromptedClassReward):
    """p(prompted digit | mel) under the speech world's spoken-digit recogniser; differentiable on the mel.

    `agreement()` (recogniser argmax equals the prompted digit) is the held-out accuracy the recipes report.
    """

    def __init__(self, classifier, **kwargs: Any):
        super().__init__(classifier, **{"name": "intelligibility", **kwargs})


class Tonality:
    """1 − spectral flatness of the mel (geometric / arithmetic mean per frame, averaged over voiced frames).

    A cheap signal measure: white noise scores near 0, harmonic speech well above; silent frames (below the
    utterance's mean energy) are ignored so padding does not dominate.
    """

    differentiable = True
    name = "tonality"

    def __init__(self, mel: MelConfig):
        self.mel = mel

    def __call__(self, prompts: Sequence[Any], mels: torch.Tensor) -> torch.Tensor:
        logmel = mels.float().squeeze(1) * self.mel.std + self.mel.mean  # [B, M, F]
        # log(arithmetic mean) through logsumexp, so extreme (e.g. reward-hacked) mels cannot overflow
        log_mean = torch.logsumexp(logmel, 1) - math.log(logmel.shape[1])  # [B, F]
        flat = (logmel.mean(1) - log_mean).exp().clamp(0, 1)
        voiced = (log_mean >= log_mean.mean(1, keepdim=True)).float()
        return 1 - (flat * voiced).sum(1) / voiced.sum(1).clamp_min(1)


class DNSMOS:
    """DNSMOS P.835 overall MOS (Reddy et al. 2022) from the ONNX model shipped in the `speechmos` wheel.

    Runs offline with onnxruntime on the vocoded audio resampled to 16 kHz and tiled to the model's 9.01 s input
    (as speechmos does for short clips); the raw SIG/BAK/OVRL outputs go through DNSMOS's published polynomial
    calibration. Not differentiable and ~0.1–0.7 s per clip on one CPU thread: for evaluation, not training.
    """

    differentiable = False
    name = "dnsmos_ovrl"
    INPUT_SECONDS, RATE = 9.01, 16000
    OVRL_POLY = (-0.06766283, 1.11546468, 0.04602535)

    def __init__(self, mel: MelConfig, batch_size: int = 16):
        try:
            import importlib.resources

            import onnxruntime as ort

            model = importlib.resources.files("speechmos") / "dnsmos_models" / "sig_bak_ovr.onnx"
        except ImportError as err:
            raise ImportError("the dnsmos reward needs: pip install 'mmalign[speech-mos]'") from err
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self.vocoder, self.mel, self.batch_size = GriffinLimVocoder(mel), mel, batch_size

    def audio_mos(self, waves: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Overall MOS of waveforms `[B, samples]` at `sample_rate`."""
        import torchaudio.functional as AF

        wave = AF.resample(waves.float().cpu(), sample_rate, self.RATE)
        need = int(self.INPUT_SECONDS * self.RATE)
        reps = -(-need // wave.shape[-1])
        wave = wave.repeat(1, reps)[:, :need].numpy().astype(np.float32)
        out = []
        for start in range(0, len(wave), self.batch_size):
            raw = self.session.run(None, {"input_1": wave[start : start + self.batch_size]})[0]
            out.append(np.polyval(self.OVRL_POLY, raw[:, 2]))
        return torch.from_numpy(np.concatenate(out)).float()

    def __call__(self, prompts: Sequence[Any], mels: torch.Tensor) -> torch.Tensor:
        return self.audio_mos(self.vocoder(mels.detach().cpu()), self.mel.sample_rate)
