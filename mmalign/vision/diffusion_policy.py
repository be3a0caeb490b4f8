"""Stable Diffusion (1.x/2.x layout) as a diffusion policy: text encoder + VAE around the shared denoising policy.

Loaded from a hub id or a local pipeline directory. Guided prediction and sampling come from
`mmalign.core.diffusion_policy.DenoisingPolicy`; this adapter adds what is specific to images: CLIP prompt
encoding, VAE decoding, image pairs and the diffusers LoRA format, so `StableDiffusionPipeline.load_lora_weights`
reproduces the trained samples. SDXL's extra conditioning (pooled text embeddings, time ids) is more entries of the
conditioning dict: a subclass overriding `encode_prompts` and `denoise`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mmalign.core.data import DataError, Row
from mmalign.core.diffusion_policy import UNET_LORA_TARGETS, DenoisingPolicy
from mmalign.core.params import LoraSpec
from mmalign.core.sampler import DDPMFamilySampler, DDPMForwardProcess
from mmalign.core.types import Conditioning

__all__ = ["UNET_LORA_TARGETS", "DiffusionImagePolicy"]


class DiffusionImagePolicy(DenoisingPolicy):
    """A text-to-image latent diffusion model whose UNet is the policy."""

    def __init__(
        self,
        pipeline: Any,
        *,
        lora: LoraSpec | None = None,
        sampler: str = "ddim",
        num_steps: int = 20,
        eta: float = 1.0,
        guidance_scale: float = 5.0,
    ):
        self.pipeline = pipeline
        self.vae, self.text_encoder, self.tokenizer = pipeline.vae, pipeline.text_encoder, pipeline.tokenizer
        for frozen in (self.vae, self.text_encoder):
            frozen.requires_grad_(False).eval()
        unet = pipeline.unet
        self.latent_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        super().__init__(
            unet,
            DDPMFamilySampler(pipeline.scheduler.config, sampler, num_steps, eta),
            DDPMForwardProcess(pipeline.scheduler.config),
            self.latent_shape,
            lora=lora,
            guidance_scale=guidance_scale,
        )

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [*super().frozen_modules(), self.vae, self.text_encoder]

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, *, dtype: str = "float32", **kwargs: Any
    ) -> DiffusionImagePolicy:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            name_or_path, dtype=getattr(torch, dtype), safety_checker=None, requires_safety_checker=False
        )
        return cls(pipe, **kwargs)

    def save_pretrained(self, path: str) -> None:
        """LoRA: diffusers-format `pytorch_lora_weights.safetensors`; full fine-tuning: the whole pipeline."""
        if self.lora is not None:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.module))
            type(self.pipeline).save_lora_weights(path, unet_lora_layers=layers)
        else:
            self.pipeline.save_pretrained(path)

    # ------------------------------------------------------------------------------------- conditioning
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Text embeddings `prompt_embeds` [B, L, D] from the frozen text encoder, as the pipeline computes them.

        A prompt longer than the encoder's window is an error, not silently cut as the pipeline would."""
        limit = self.tokenizer.model_max_length
        for prompt, ids in zip(prompts, self.tokenizer(list(prompts))["input_ids"], strict=True):
            if len(ids) > limit:
                raise DataError(
                    "prompt",
                    None,
                    None,
                    f"{prompt!r} is {len(ids)} tokens; the text encoder reads at most {limit}",
                )
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return {"prompt_embeds": self.text_encoder(tokens.input_ids.to(self.device))[0]}

    # ------------------------------------------------------------------------------------------ outputs
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], shape [B, 3, H, W] (what image rewards take); differentiable in the latents."""
        images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return images.clamp(-1, 1)

    @staticmethod
    def to_pil(images: torch.Tensor) -> list[Image.Image]:
        arr = ((images.detach().cpu().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr]

    def write_outputs(
        self, outputs: torch.Tensor, prompts: Sequence[Any], out_dir: str, stem: str
    ) -> list[str]:
        """One PNG per image: `<out_dir>/<stem>_<i>.png`."""
        paths = []
        for i, image in enumerate(self.to_pil(outputs)):
            path = Path(out_dir) / f"{stem}_{i:03d}.png"
            image.save(path)
            paths.append(str(path))
        return paths

    # ---------------------------------------------------------------------- preference (Diffusion-DPO)
    def encode_pair(self, row: Row) -> dict[str, Any]:
        """Load a pair's images (validated: readable, RGB-convertible) and encode them to latents once."""
        from mmalign.vision.images import load_image_tensor

        size = self.latent_shape[-1] * self.vae_scale_factor
        base = Path(row.source).parent if row.source and not row.source.startswith("<") else Path(".")
        images = [load_image_tensor(row, field, base, size) for field in ("image_w", "image_l")]
        with torch.no_grad():
            latents = self.vae.encode(torch.stack(images).to(self.device)).latent_dist.mean
        latents = latents * self.vae.config.scaling_factor
        return {"prompt": row.data["prompt"], "latents_w": latents[0].cpu(), "latents_l": latents[1].cpu()}

    def encode_target(self, row: Row) -> dict[str, Any]:
        """A real image of a prompt (`image`) as its VAE latents: ReFL's and DLPO's pretraining data (`data.targets`)."""
        from mmalign.vision.images import load_image_tensor

        size = self.latent_shape[-1] * self.vae_scale_factor
        base = Path(row.source).parent if row.source and not row.source.startswith("<") else Path(".")
        image = load_image_tensor(row, "image", base, size)
        with torch.no_grad():
            latents = self.vae.encode(image[None].to(self.device)).latent_dist.mean
        return {"prompt": row.data["prompt"], "latents": (latents * self.vae.config.scaling_factor)[0].cpu()}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)
