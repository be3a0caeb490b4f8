"""FLUX.1 as a diffusion policy: `FluxTransformer2DModel` on 2×2-packed latents, CLIP pooled + T5 conditioning.

Loaded from a hub id or a local `FluxPipeline` directory. The sampler's state is the packed latent sequence
[B, (h/2)·(w/2), 4C], as `FluxPipeline` denoises it (initial noise is drawn unpacked and then packed, so a
generator reproduces the pipeline's draw); the σ grid is FLUX's (linspace(1, 1/N, N) shifted by μ of the packed
length) and the transformer takes timestep/1000. FLUX.1-dev is guidance-distilled: its guidance is an input of
the transformer (`guidance_scale` → the `guidance` embedding, one forward, no unconditional branch), which is what
`predict(guidance=w)` feeds; a model without guidance embeddings (FLUX.1-schnell) gets true classifier-free
guidance with the empty prompt when `guidance_scale` > 1 (the pipeline's default for schnell is none: set
`guidance_scale: 1`). LoRA is saved in the diffusers format, so `FluxPipeline.load_lora_weights` reproduces samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmalign.core.sampler import Sampler
from mmalign.core.types import Conditioning, Trajectory
from mmalign.vision.flow_image_policy import (
    FlowImagePolicy,
    FlowModelConfig,
    absent_components,
    batch_timestep,
)

FLUX_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default number of T5 tokens


@dataclass
class FluxModelConfig(FlowModelConfig):
    """`model:` for kind diffusion_flux (FLUX.1-dev's sampling defaults: 28 steps, guidance 3.5)."""

    kind: str = "diffusion_flux"
    num_steps: int = 28
    guidance_scale: float = 3.5


class FluxPolicy(FlowImagePolicy):
    """A `FluxPipeline` whose transformer is the policy; states are packed latents."""

    layout = "flux"

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: str = "float32", **kwargs: Any) -> FluxPolicy:
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(
            name_or_path, dtype=getattr(torch, dtype), **absent_components(name_or_path)
        )
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, **kwargs)

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.pipeline.transformer.config.guidance_embeds)

    def encoders(self) -> list[torch.nn.Module]:
        return [e for e in (self.pipeline.text_encoder, self.pipeline.text_encoder_2) if e is not None]

    def default_resolution(self) -> int:
        return self.pipeline.default_sample_size * self.vae_scale_factor

    def image_seq_len(self) -> int:
        return (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)

    # ------------------------------------------------------------------------------------- packing
    def state_shape(self) -> tuple[int, ...]:
        channels, h, w = self.latent_shape
        if h % 2 or w % 2:
            raise ValueError(f"FLUX packs 2×2 latent patches: the latent side must be even, got {h}×{w}")
        return ((h // 2) * (w // 2), channels * 4)

    def to_state(self, latents: torch.Tensor) -> torch.Tensor:
        from diffusers import FluxPipeline

        b, c, h, w = latents.shape
        return FluxPipeline._pack_latents(latents, b, c, h, w)

    def to_latents(self, state: torch.Tensor) -> torch.Tensor:
        from diffusers import FluxPipeline

        return FluxPipeline._unpack_latents(state, self.resolution, self.resolution, self.vae_scale_factor)

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[Any],
        *,
        generator: torch.Generator | None = None,
        record: bool = True,
        initial: torch.Tensor | None = None,
        sampler: Sampler | None = None,
    ) -> Trajectory:
        """Sample packed latents; the initial noise is drawn unpacked and packed, as `FluxPipeline` draws it."""
        if initial is None:
            noise = (sampler or self.sampler).initial_noise(
                (len(prompts), *self.latent_shape), generator, self.device
            )
            initial = self.to_state(noise)
        return super().sample(prompts, generator=generator, record=record, initial=initial, sampler=sampler)

    # ---------------------------------------------------------------------------------- conditioning
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """`prompt_embeds` (T5 tokens) and `pooled_prompt_embeds` (CLIP), as the pipeline's `encode_prompt`."""
        length = FLUX_MAX_SEQUENCE_LENGTH if self.max_sequence_length is None else self.max_sequence_length
        embeds, pooled, _ = self.pipeline.encode_prompt(
            list(prompts), None, device=self.device, max_sequence_length=length
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def predict(
        self, x: torch.Tensor, t: torch.Tensor, conditioning: Conditioning, *, guidance: float | None = None
    ) -> torch.Tensor:
        """Guidance-distilled models take the guidance scale as an input; others get classifier-free guidance."""
        if not self.guidance_embeds:
            return super().predict(x, t, conditioning, guidance=guidance)
        w = self.guidance_scale if guidance is None else guidance
        scale = torch.full((len(x),), float(w), device=x.device, dtype=torch.float32)
        return self.denoise(self._net(), x, t, {**conditioning, "guidance": scale})

    def denoise(self, net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, conditioning: Conditioning):
        """The velocity, called as FluxPipeline calls its transformer (timestep/1000, text and image position ids)."""
        from diffusers import FluxPipeline

        dtype = self.compute_dtype
        x, embeds = x.to(dtype), conditioning["prompt_embeds"].to(dtype)
        side = self.latent_shape[1] // 2
        image_ids = FluxPipeline._prepare_latent_image_ids(len(x), side, side, x.device, dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=dtype)
        return net(
            hidden_states=x,
            timestep=batch_timestep(t, len(x)).to(dtype) / 1000,
            guidance=conditioning.get("guidance"),
            pooled_projections=conditioning["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
