"""The offline TTS model on disk: a char text encoder, a mel-denoising UNet, a scheduler and the mel settings.

A directory with `unet/` (the mel denoiser, a diffusers `ModelMixin`, over the `[1, n_mels, frames]` mel), `text_encoder/`
(transformers `CLIPTextModel` over character ids), `scheduler/`, `alphabet.json` and `mel.json`; every part is
saved with its library's own `save_pretrained` (safetensors), so loading never unpickles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign.speech.audio import MelConfig
from mmalign.speech.denoiser import MelDenoiser
from mmalign.speech.text import CharEncoder

MARKER = "mmalign_tts.json"


@dataclass
class MelTTS:
    """The parts of a text-to-mel diffusion model (the speech counterpart of a `StableDiffusionPipeline`)."""

    unet: Any
    text_encoder: Any
    chars: CharEncoder
    scheduler: Any
    mel: MelConfig

    def save_pretrained(self, directory: str | Path) -> None:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(out / "unet")
        self.text_encoder.save_pretrained(out / "text_encoder")
        self.scheduler.save_pretrained(out / "scheduler")
        self.chars.save(out)
        self.mel.save(out)
        (out / MARKER).write_text(json.dumps({"kind": "mel_tts", "version": 1}))

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: Any = None) -> MelTTS:
        from diffusers import DDIMScheduler
        from transformers import CLIPTextModel

        path = Path(directory)
        if not (path / MARKER).exists():
            raise FileNotFoundError(
                f"{path} is not a mel TTS model directory (no {MARKER}); build one with `mmalign zoo build speech`"
            )
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        return cls(
            unet=MelDenoiser.from_pretrained(path / "unet", **kwargs),
            text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", **kwargs),
            chars=CharEncoder.load(path),
            scheduler=DDIMScheduler.from_pretrained(path / "scheduler"),
            mel=MelConfig.load(path),
        )
