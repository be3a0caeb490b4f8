"""Stable Diffusion XL as a diffusion policy: the SD adapter with SDXL's extra conditioning entries.

`StableDiffusionXLPipeline` conditions its UNet on two CLIP encoders' penultimate states side by side
(`prompt_embeds`), the second encoder's pooled projection (`text_embeds`) and six micro-conditioning time ids
(original size, crop offset, target size: `time_ids`); here they are three entries of the conditioning dict, encoded
by the pipeline's own `encode_prompt`, and the unconditional branch is what the pipeline uses for an empty negative
prompt (zeros when `force_zeros_for_empty_prompt`). Sampling is the DDPM family (DDIM with any η, DDPM) from the
pipeline's scheduler config, so DDPO, DPOK, Diffusion-DPO and the rest run on it as on SD 1.5. LoRA is saved in the
diffusers format (with r and alpha), so `StableDiffusionXLPipeline.load_lora_weights` reproduces the samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmalign.core.diffusion_policy import DiffusionModelConfig
from mmalign.core.params import LoraSpec
from mmalign.core.types import Conditioning
from mmalign.vision.diffusion_policy import DiffusionImagePolicy


@dataclass
class SDXLModelConfig(DiffusionModelConfig):
    """`model:` for kind diffusion_sdxl: the DDPM-family sampler settings of SD, on an SDXL pipeline."""

    kind: str = "diffusion_sdxl"


class SDXLPolicy(DiffusionImagePolicy):
    """A `StableDiffusionXLPipeline` whose UNet is the policy."""

    def __init__(self, pipeline: Any, *, lora: LoraSpec | None = None, **kwargs: Any):
        super().__init__(pipeline, lora=lora, **kwargs)
        self.text_encoder_2 = pipeline.text_encoder_2
        if self.text_encoder_2 is not None:
            self.text_encoder_2.requires_grad_(False).eval()
        side = self.latent_shape[-1] * self.vae_scale_factor
        # original size, crop top-left, target size: the pipeline's defaults for an image of the UNet's size
        self.time_ids = torch.tensor([side, side, 0, 0, side, side], dtype=torch.float32)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: str = "float32", **kwargs: Any) -> SDXLPolicy:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(name_or_path, dtype=getattr(torch, dtype))
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, **kwargs)

    def frozen_modules(self) -> list[torch.nn.Module]:
        extra = [self.text_encoder_2] if self.text_encoder_2 is not None else []
        return [*super().frozen_modules(), *extra]

    def save_pretrained(self, path: str) -> None:
        """LoRA: diffusers-format `pytorch_lora_weights.safetensors` with its r and alpha; full: the pipeline."""
        if self.lora is None:
            self.pipeline.save_pretrained(path)
            return
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.module))
        type(self.pipeline).save_lora_weights(
            path,
            unet_lora_layers=layers,
            unet_lora_adapter_metadata=self.module.peft_config["default"].to_dict(),
        )

    # ------------------------------------------------------------------------------------- conditioning
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """`prompt_embeds` [B, L, D₁+D₂], `text_embeds` (pooled) [B, P] and `time_ids` [B, 6], as the pipeline."""
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            list(prompts), device=self.device, do_classifier_free_guidance=False
        )
        time_ids = self.time_ids.to(self.device, embeds.dtype).expand(len(embeds), -1)
        return {"prompt_embeds": embeds, "text_embeds": pooled, "time_ids": time_ids}

    def negative_conditioning(self) -> Conditioning:
        """The empty negative prompt as the pipeline conditions on it: zeros when `force_zeros_for_empty_prompt`."""
        empty = self.encode_prompts([""])
        if not self.pipeline.config.force_zeros_for_empty_prompt:
            return empty
        return {
            **empty,
            "prompt_embeds": torch.zeros_like(empty["prompt_embeds"]),
            "text_embeds": torch.zeros_like(empty["text_embeds"]),
        }

    def denoise(self, net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, conditioning: Conditioning):
        """ε (or v) from the UNet with SDXL's added conditioning (pooled text embeddings and time ids)."""
        added = {"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]}
        return net(x, t, encoder_hidden_states=conditioning["prompt_embeds"], added_cond_kwargs=added).sample
