"""AudioLDM 2 text-to-speech (diffusers `AudioLDM2Pipeline`) as a diffusion policy, for GPU users.

The shared `DenoisingPolicy` does guided prediction and sampling; this adapter supplies what is specific to AudioLDM 2's speech checkpoints (a VITS text encoder as `text_encoder_2`):

- conditioning is the pipeline's own `encode_prompt`: CLAP(description) + VITS(transcription) → projection →
  GPT-2 prior → generated embeddings, plus the VITS states and their attention mask. A prompt row's `prompt` is
  the *transcription* (what is said); the CLAP description (how it sounds) is one fixed string per policy.
  The unconditional branch of classifier-free guidance is the pipeline's too (CLAP("") and all-masked zero VITS
  states), so guided sampling is `AudioLDM2Pipeline.__call__`'s;
- the UNet is called with both cross-attention streams (`encoder_hidden_states` = generated embeddings,
  `encoder_hidden_states_1` + `encoder_attention_mask_1` = VITS states), as the pipeline calls it;
- `decode` = VAE → mel → SpeechT5 HiFi-GAN: waveforms `[B, samples]` at `sample_rate` (16 kHz for the released
  checkpoints). Rewards therefore take waveforms: `WaveformDNSMOS` (`dnsmos_waveform` in recipes) works; the
  mel rewards of `mmalign.speech.rewards` (intelligibility, tonality, dnsmos) score the spoken-digits world's
  8 kHz standardised mels and do not apply (a recipe naming them is refused before anything loads).
- only the UNet trains: LoRA through peft (the stock UNet has no peft mixin, so `from_pretrained` loads it as
  `PeftAudioLDM2UNet`; reference = adapters disabled) or full fine-tuning (reference = frozen copy). The frozen
  parts (`frozen_modules`) follow the UNet to whatever device the trainer puts it on.

The three UNet conditioning inputs are three entries of the policy's conditioning dict. T5 checkpoints (text-to-audio `cvssp/audioldm2`) are refused: there the pipeline pads the
unconditional branch to each batch's prompt length, which changes the GPT-2 prior's positions, so one cached
unconditional conditioning would not reproduce the pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.pipelines.audioldm2.modeling_audioldm2 import AudioLDM2UNet2DConditionModel

from mmalign.core.data import Row
from mmalign.core.diffusion_policy import DenoisingPolicy
from mmalign.core.params import LoraSpec
from mmalign.core.sampler import DDPMFamilySampler, DDPMForwardProcess
from mmalign.core.types import Conditioning

LORA_FILE = "unet_lora.safetensors"
FROZEN = ("vae", "text_encoder", "text_encoder_2", "projection_model", "language_model", "vocoder")


class PeftAudioLDM2UNet(PeftAdapterMixin, AudioLDM2UNet2DConditionModel):
    """AudioLDM 2's UNet with diffusers' peft mixin (`add_adapter`, `disable_adapters`), which the stock class lacks."""


def _generation_capable(language_model: torch.nn.Module) -> torch.nn.Module:
    """The GPT-2 prior as `GPT2LMHeadModel` (same weights, same hidden states).

    Speech checkpoints such as `anhnct/audioldm2_gigaspeech` store a bare `GPT2Model`, which has no generation
    helpers in current transformers, so `AudioLDM2Pipeline.generate_language_model` fails on it (diffusers issue
    #12630). The head is tied to the input embeddings and unused: only hidden states are read.
    """
    if hasattr(language_model, "_update_model_kwargs_for_generation"):
        return language_model
    from transformers import GPT2LMHeadModel

    lm = GPT2LMHeadModel(language_model.config).to(language_model.dtype)
    lm.transformer.load_state_dict(language_model.state_dict())
    return lm.to(language_model.device).eval()


class AudioLDM2SpeechPolicy(DenoisingPolicy):
    """AudioLDM 2 (speech checkpoint) whose UNet is the policy; outputs are HiFi-GAN waveforms."""

    def __init__(
        self,
        pipeline: Any,
        *,
        lora: LoraSpec | None = None,
        sampler: str = "ddim",
        num_steps: int = 50,
        eta: float = 1.0,
        guidance_scale: float = 3.5,
        description: str = "A person is speaking.",
        audio_length_in_s: float | None = None,
        max_new_tokens: int | None = None,
    ):
        from transformers import VitsModel

        if not isinstance(pipeline.text_encoder_2, VitsModel):
            raise ValueError(
                f"AudioLDM 2 policy needs a speech checkpoint (text_encoder_2 = VitsModel), got "
                f"{type(pipeline.text_encoder_2).__name__}: T5 (text-to-audio) checkpoints are not supported"
            )
        if lora is not None and not hasattr(pipeline.unet, "add_adapter"):
            raise ValueError(
                "LoRA needs the peft-capable UNet: load with AudioLDM2SpeechPolicy.from_pretrained"
            )
        clap_tokens = len(pipeline.tokenizer(description).input_ids)
        if clap_tokens > pipeline.tokenizer.model_max_length:  # the pipeline would cut it with a warning
            raise ValueError(
                f"description is {clap_tokens} CLAP tokens; the tokenizer takes {pipeline.tokenizer.model_max_length}"
            )
        pipeline.register_modules(language_model=_generation_capable(pipeline.language_model))
        self.pipeline = pipeline
        for name in FROZEN:
            getattr(pipeline, name).requires_grad_(False).eval()
        self.description, self.max_new_tokens = description, max_new_tokens
        vocoder, unet = pipeline.vocoder.config, pipeline.unet
        # the latent length as AudioLDM2Pipeline.__call__ computes it (seconds per mel frame, then round up)
        upsample = math.prod(vocoder.upsample_rates) / vocoder.sampling_rate
        scale = pipeline.vae_scale_factor
        if audio_length_in_s is None:
            audio_length_in_s = unet.config.sample_size * scale * upsample
        if audio_length_in_s <= 0:
            raise ValueError(f"audio_length_in_s must be > 0, got {audio_length_in_s}")
        frames = math.ceil(int(audio_length_in_s / upsample) / scale) * scale
        self.num_samples = int(audio_length_in_s * vocoder.sampling_rate)  # the pipeline's cut
        super().__init__(
            unet,
            DDPMFamilySampler(pipeline.scheduler.config, sampler, num_steps, eta),
            DDPMForwardProcess(pipeline.scheduler.config),
            (unet.config.in_channels, frames // scale, vocoder.model_in_dim // scale),
            lora=lora,
            guidance_scale=guidance_scale,
        )

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, *, dtype: str = "float32", lora: LoraSpec | None = None, **kwargs: Any
    ) -> AudioLDM2SpeechPolicy:
        """A hub id or local pipeline directory; safetensors weights only (a pickled checkpoint is an error)."""
        from diffusers import AudioLDM2Pipeline

        torch_dtype = getattr(torch, dtype)
        extra = {}
        if lora is not None:
            extra["unet"] = PeftAudioLDM2UNet.from_pretrained(
                name_or_path, subfolder="unet", dtype=torch_dtype, use_safetensors=True
            )
        pipe = AudioLDM2Pipeline.from_pretrained(
            name_or_path, dtype=torch_dtype, use_safetensors=True, **extra
        )
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, lora=lora, **kwargs)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [*super().frozen_modules(), *(getattr(self.pipeline, name) for name in FROZEN)]

    @property
    def sample_rate(self) -> int:
        return self.pipeline.vocoder.config.sampling_rate

    # ------------------------------------------------------------------------------------- conditioning
    def check_prompts(self, rows: Sequence[Row], field: str = "prompt") -> None:
        """Fail before training on a transcription the VITS tokenizer would drop characters of or truncate."""
        tok = self.pipeline.tokenizer_2
        for row in rows:
            text = row.data.get(field)
            if not isinstance(text, str) or not text.strip():
                raise row.error(field, "expected a non-empty transcription")
            if tok.phonemize:  # phonemes come from espeak at encoding time: nothing to check here
                continue
            normal = tok.normalize_text(text) if tok.normalize else text
            dropped = sorted({c for c in normal if c not in tok.encoder})
            if dropped:
                raise row.error(field, f"characters {dropped} are not in the VITS tokenizer's vocabulary")
            n = len(tok(text).input_ids)
            if n >= tok.model_max_length:  # the pipeline also needs one slot for its end token
                raise row.error(field, f"{n} tokens; the VITS tokenizer takes < {tok.model_max_length}")

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """`AudioLDM2Pipeline.encode_prompt(description, transcription=prompt)` for each prompt: the GPT-2 prior's
        generated embeddings, the VITS states and their attention mask."""
        texts = list(prompts)
        embeds, mask, generated = self.pipeline.encode_prompt(
            [self.description] * len(texts),
            self.device,
            1,
            False,
            transcription=texts,
            max_new_tokens=self.max_new_tokens,
        )
        return {"generated": generated, "embeds": embeds, "mask": mask}

    def negative_conditioning(self) -> Conditioning:
        """The pipeline's unconditional branch: CLAP("") and zero, fully masked VITS states through the prior."""
        embeds, mask, generated = self.pipeline.encode_prompt(
            [self.description],
            self.device,
            1,
            True,
            transcription=[""],
            max_new_tokens=self.max_new_tokens,
        )
        return {
            "generated": generated[:1],
            "embeds": embeds[:1],
            "mask": mask[:1],
        }  # first half = unconditional

    def denoise(self, net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, conditioning: Conditioning):
        return net(
            x,
            t,
            encoder_hidden_states=conditioning["generated"],
            encoder_hidden_states_1=conditioning["embeds"],
            encoder_attention_mask_1=conditioning["mask"],
            return_dict=False,
        )[0]

    # ------------------------------------------------------------------------------------------ outputs
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Waveforms `[B, num_samples]` (float32, CPU): VAE → mel → HiFi-GAN, cut to the requested length."""
        vae = self.pipeline.vae
        mel = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return self.pipeline.mel_spectrogram_to_waveform(mel)[:, : self.num_samples]

    def write_outputs(
        self, outputs: torch.Tensor, prompts: Sequence[Any], out_dir: str, stem: str
    ) -> list[str]:
        """One WAV per decoded waveform: `<out_dir>/<stem>_<i>.wav`."""
        from mmalign.speech.audio import write_wav

        paths = []
        for i, wave in enumerate(outputs.detach().cpu()):
            path = Path(out_dir) / f"{stem}_{i:03d}.wav"
            write_wav(path, wave, self.sample_rate)
            paths.append(str(path))
        return paths

    def encode_pair(self, row: Row) -> dict[str, Any]:
        """Offline audio pairs need AudioLDM 2's waveform → mel frontend, which the pipeline does not ship."""
        raise row.error(
            "prompt",
            "offline Diffusion-DPO on audio files is not supported for AudioLDM 2 (no waveform-to-mel frontend "
            "in AudioLDM2Pipeline); use online_diffusion_dpo, which ranks the policy's own samples",
        )

    # ------------------------------------------------------------------------------------------ weights
    def save_pretrained(self, path: str) -> None:
        """LoRA: `unet_lora.safetensors` (diffusers key format, `unet.` prefix); full fine-tuning: the pipeline."""
        if self.lora is None:
            self.pipeline.save_pretrained(path)
            return
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        Path(path).mkdir(parents=True, exist_ok=True)
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.module))
        save_file({f"unet.{k}": v.contiguous() for k, v in layers.items()}, str(Path(path) / LORA_FILE))

    def load_lora(self, path: str) -> None:
        """Load a `save_pretrained` LoRA directory into this policy's adapter (same rank and targets)."""
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        if self.lora is None:
            raise ValueError(
                "this policy has no LoRA adapter; build it with the LoRA settings of the saved run"
            )
        state = load_file(str(Path(path) / LORA_FILE))
        state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
        result = set_peft_model_state_dict(self.module, state)
        if result.unexpected_keys:
            raise ValueError(f"{path}: LoRA keys not in this model: {result.unexpected_keys[:5]}")


class WaveformDNSMOS:
    """DNSMOS P.835 OVRL of generated waveforms: the MOS reward for policies whose outputs are audio.

    Scores with `mmalign.speech.rewards.DNSMOS.audio_mos` (offline ONNX, not differentiable, ~0.1–0.7 s per clip
    on one CPU thread); the mel settings that DNSMOS's own `__call__` vocodes with are not used here.
    """

    differentiable = False
    name = "dnsmos_ovrl"

    def __init__(self, sample_rate: int = 16000, batch_size: int = 16):
        from mmalign.speech.audio import MelConfig
        from mmalign.speech.rewards import DNSMOS

        self.sample_rate = sample_rate
        self.scorer = DNSMOS(MelConfig(), batch_size=batch_size)

    def __call__(self, prompts: Sequence[Any], waves: torch.Tensor) -> torch.Tensor:
        if waves.dim() != 2:
            raise ValueError(
                f"dnsmos_waveform takes waveforms [batch, samples], got shape {tuple(waves.shape)} "
                "(mel outputs of the spoken-digits policy go to the `dnsmos` reward)"
            )
        return self.scorer.audio_mos(waves, self.sample_rate)
