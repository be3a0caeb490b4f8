"""Text-to-speech mel diffusion as a diffusion policy: char text encoder + mel UNet + Griffin-Lim vocoder.

The shared `DenoisingPolicy` does guided prediction and sampling; this adapter adds what is specific to speech: prompts checked against the encoder's alphabet, final latents that
*are* standardised log-mels (`decode` returns them, so recogniser rewards stay differentiable on the mel),
`to_waveform` through Griffin-Lim, and preference pairs and DLPO's real recordings read from WAV files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmalign.core.data import Row
from mmalign.core.diffusion_policy import DenoisingPolicy
from mmalign.core.params import LoraSpec
from mmalign.core.sampler import DDPMFamilySampler, DDPMForwardProcess
from mmalign.core.types import Conditioning
from mmalign.speech.audio import GriffinLimVocoder, MelFrontend, read_wav
from mmalign.speech.text import AlphabetError
from mmalign.speech.tts import MelTTS


class DiffusionSpeechPolicy(DenoisingPolicy):
    """A text-to-mel diffusion model whose UNet is the policy; outputs are mels, audio comes from the vocoder."""

    def __init__(
        self,
        model: MelTTS,
        *,
        lora: LoraSpec | None = None,
        sampler: str = "ddim",
        num_steps: int = 10,
        eta: float = 1.0,
        guidance_scale: float = 3.0,
    ):
        self.tts = model
        self.text_encoder, self.chars, self.mel_config = model.text_encoder, model.chars, model.mel
        self.text_encoder.requires_grad_(False).eval()
        unet = model.unet
        shape = (1, model.mel.n_mels, model.mel.frames)
        super().__init__(
            unet,
            DDPMFamilySampler(model.scheduler.config, sampler, num_steps, eta),
            DDPMForwardProcess(model.scheduler.config),
            shape,
            lora=lora,
            guidance_scale=guidance_scale,
        )
        self.frontend = MelFrontend(model.mel)
        self.vocoder = GriffinLimVocoder(model.mel)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [*super().frozen_modules(), self.text_encoder, self.frontend, self.vocoder]

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: str = "float32", **kwargs: Any) -> DiffusionSpeechPolicy:
        return cls(MelTTS.from_pretrained(path, dtype=getattr(torch, dtype)), **kwargs)

    @property
    def sample_rate(self) -> int:
        return self.mel_config.sample_rate

    def save_pretrained(self, path: str) -> None:
        """LoRA: the diffusers-format UNet LoRA layers; full fine-tuning: the whole model directory."""
        if self.lora is not None:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict
            from safetensors.torch import save_file

            Path(path).mkdir(parents=True, exist_ok=True)
            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.module))
            save_file(
                {f"unet.{k}": v.contiguous() for k, v in layers.items()}, f"{path}/unet_lora.safetensors"
            )
        else:
            self.tts.save_pretrained(path)

    # ------------------------------------------------------------------------------------- conditioning
    def check_prompts(self, rows: Sequence[Row], field: str = "prompt") -> None:
        """Fail before training on any prompt the text encoder cannot spell, naming file, row and field."""
        for row in rows:
            try:
                self.chars.check(row.data.get(field))
            except AlphabetError as err:
                raise row.error(field, str(err)) from None

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Character-encoder states `prompt_embeds` `[B, L, D]` (an out-of-alphabet character is an `AlphabetError`)."""
        return {"prompt_embeds": self.text_encoder(self.chars(list(prompts)).to(self.device))[0]}

    # ------------------------------------------------------------------------------------------ outputs
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Standardised log-mels `[B, 1, n_mels, frames]`: what speech rewards score (the latents themselves)."""
        return latents

    def to_waveform(self, mels: torch.Tensor) -> torch.Tensor:
        """Audio `[B, samples]` at `sample_rate` from mels, through the Griffin-Lim vocoder."""
        return self.vocoder(mels.detach().cpu())

    def write_outputs(
        self, outputs: torch.Tensor, prompts: Sequence[Any], out_dir: str, stem: str
    ) -> list[str]:
        """One WAV per mel (Griffin-Lim): `<out_dir>/<stem>_<i>.wav`."""
        from mmalign.speech.audio import write_wav

        paths = []
        for i, wave in enumerate(self.to_waveform(outputs)):
            path = Path(out_dir) / f"{stem}_{i:03d}.wav"
            write_wav(path, wave, self.sample_rate)
            paths.append(str(path))
        return paths

    # ------------------------------------------------------------------------------- recordings as mels
    def _mel_of(self, row: Row, field: str) -> torch.Tensor:
        """The mel `[1, n_mels, frames]` of the WAV named in `field` (relative to the row's file; validated)."""
        base = Path(row.source).parent if row.source and not row.source.startswith("<") else Path(".")
        value = row.data.get(field)
        if not isinstance(value, str) or not value.strip():
            raise row.error(field, f"expected an audio file path, got {type(value).__name__}")
        path = Path(value) if Path(value).is_absolute() else base / value
        return self.frontend(read_wav(path, self.sample_rate, row=row, field=field))[0]

    def _check_prompt(self, row: Row) -> None:
        try:
            self.chars.check(row.data.get("prompt"))
        except AlphabetError as err:
            raise row.error("prompt", str(err)) from None

    def encode_target(self, row: Row) -> dict[str, Any]:
        """A real recording of a prompt (`audio`) as its mel: DLPO's pretraining data (`data.targets`)."""
        mel = self._mel_of(row, "audio")
        self._check_prompt(row)
        return {"prompt": row.data["prompt"], "latents": mel}

    def encode_pair(self, row: Row) -> dict[str, Any]:
        """Read a pair's WAVs (`audio_w`, `audio_l`; validated rate, non-empty) and turn them into mels once."""
        mels = [self._mel_of(row, field) for field in ("audio_w", "audio_l")]
        self._check_prompt(row)
        return {"prompt": row.data["prompt"], "latents_w": mels[0], "latents_l": mels[1]}
