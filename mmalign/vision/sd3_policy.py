"""Stable Diffusion 3 / 3.5 as a diffusion policy: `SD3Transformer2DModel` with its CLIP (and optional T5) encoders.

Loaded from a hub id or a local `StableDiffusion3Pipeline` directory; conditioning is what the pipeline feeds its
transformer, `prompt_embeds` (both CLIPs' penultimate states side by side, padded to the T5 width, then the T5
tokens) and `pooled_prompt_embeds`, computed by the pipeline's own `encode_prompt`. LoRA is saved in the diffusers
format, so `StableDiffusion3Pipeline.load_lora_weights` reproduces the trained samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmalign.core.types import Conditioning
from mmalign.vision.flow_image_policy import (
    FlowImagePolicy,
    FlowModelConfig,
    absent_components,
    batch_timestep,
)

SD3_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default number of T5 tokens


@dataclass
class SD3ModelConfig(FlowModelConfig):
    """`model:` for kind diffusion_sd3; `text_encoder_3: false` loads without T5, as diffusers documents for SD3."""

    kind: str = "diffusion_sd3"
    text_encoder_3: bool = True


class SD3Policy(FlowImagePolicy):
    """A `StableDiffusion3Pipeline` whose MM-DiT transformer is the policy."""

    layout = "sd3"

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, *, dtype: str = "float32", text_encoder_3: bool = True, **kwargs: Any
    ) -> SD3Policy:
        from diffusers import StableDiffusion3Pipeline

        absent = absent_components(name_or_path)
        if not text_encoder_3:
            absent.update(text_encoder_3=None, tokenizer_3=None)
        pipe = StableDiffusion3Pipeline.from_pretrained(name_or_path, dtype=getattr(torch, dtype), **absent)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, **kwargs)

    def encoders(self) -> list[torch.nn.Module]:
        pipe = self.pipeline
        return [e for e in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if e is not None]

    def default_resolution(self) -> int:
        return self.pipeline.default_sample_size * self.vae_scale_factor

    def image_seq_len(self) -> int:
        patch = self.pipeline.transformer.config.patch_size
        return (self.latent_shape[1] // patch) * (self.latent_shape[2] // patch)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """`prompt_embeds` [B, L, D] and `pooled_prompt_embeds` [B, P], exactly as the pipeline encodes them."""
        length = SD3_MAX_SEQUENCE_LENGTH if self.max_sequence_length is None else self.max_sequence_length
        prompts = list(prompts)
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompts,
            prompts,
            prompts,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def denoise(self, net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, conditioning: Conditioning):
        """The velocity, called as StableDiffusion3Pipeline calls its transformer (timestep = σ·1000)."""
        dtype = self.compute_dtype
        return net(
            hidden_states=x.to(dtype),
            timestep=batch_timestep(t, len(x)),
            encoder_hidden_states=conditioning["prompt_embeds"].to(dtype),
            pooled_projections=conditioning["pooled_prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]
