"""Stable Diffusion (1.x/2.x layout) as a `DiffusionPolicy`: trajectories, step log-probs, denoising loss.

Loaded from a hub id or a local pipeline directory. LoRA on the UNet through diffusers' peft integration
(reference = adapters disabled) or full fine-tuning of the UNet (reference = frozen copy). Sampling uses DDIM (any
η > 0 records log-probs) or DDPM with classifier-free guidance; trained LoRA weights are saved in the diffusers
format, so `StableDiffusionPipeline.load_lora_weights` reproduces the trained samples. SDXL needs extra
conditioning (pooled text embeddings, time ids): that is a subclass overriding `encode_prompts` and `_unet_kwargs`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mmalign.core.data import Row
from mmalign.core.diffusion import denoising_loss, make_scheduler, sample_trajectory, step_distribution
from mmalign.core.params import LoraSpec, TrainableModule
from mmalign.core.types import SequenceLogProbs, Trajectory

UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class DiffusionImagePolicy(TrainableModule):
    """A text-to-image latent diffusion model whose UNet is the policy."""

    deterministic_scores = False  # preference scores draw fresh (noise, t) per batch

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
        self.lora = lora
        if lora is not None:
            from peft import LoraConfig

            targets = UNET_LORA_TARGETS if lora.target_modules == "all-linear" else lora.target_modules
            unet.requires_grad_(False)
            unet.add_adapter(
                LoraConfig(
                    r=lora.r,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    init_lora_weights="gaussian",
                    target_modules=targets,
                )
            )
            self._reference_unet = None
        else:
            self._reference_unet = copy.deepcopy(unet).requires_grad_(False).eval()
        self.module = unet
        self.model: torch.nn.Module = unet
        self.scheduler = make_scheduler(sampler, pipeline.scheduler.config)
        self.train_scheduler = make_scheduler(
            "ddpm", {**pipeline.scheduler.config, "variance_type": "fixed_small"}
        )
        self.num_steps, self.eta, self.guidance_scale = num_steps, eta, guidance_scale
        self.latent_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        self._use_reference = False
        self._negative: torch.Tensor | None = None

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, *, dtype: str = "float32", **kwargs: Any
    ) -> DiffusionImagePolicy:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            name_or_path, dtype=getattr(torch, dtype), safety_checker=None, requires_safety_checker=False
        )
        return cls(pipe, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    # ---------------------------------------------------------------------------------- policy protocol
    @contextmanager
    def reference(self) -> Iterator[None]:
        """Inside, the UNet is the frozen base: adapters disabled (LoRA) or the frozen copy (full)."""
        if self.lora is not None:
            self.module.disable_adapters()
            try:
                yield
            finally:
                self.module.enable_adapters()
        else:
            self._use_reference = True
            try:
                yield
            finally:
                self._use_reference = False

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
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings [B, L, D] from the frozen text encoder, as the pipeline computes them."""
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder(tokens.input_ids.to(self.device))[0]

    def _negative_embeds(self, n: int) -> torch.Tensor:
        if self._negative is None:
            self._negative = self.encode_prompts([""])
        return self._negative.expand(n, -1, -1)

    def _unet(self) -> torch.nn.Module:
        return self._reference_unet if self._use_reference else self.model

    def predict(
        self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, *, guidance: float | None = None
    ):
        """Noise prediction with classifier-free guidance (uncond + w·(cond − uncond))."""
        w = self.guidance_scale if guidance is None else guidance
        unet = self._unet()
        if w == 1.0:
            return unet(x, t, encoder_hidden_states=embeds).sample
        both = unet(
            torch.cat([x, x]), t, encoder_hidden_states=torch.cat([self._negative_embeds(len(x)), embeds])
        )
        uncond, cond = both.sample.chunk(2)
        return uncond + w * (cond - uncond)

    # ------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self, prompts: Sequence[str], *, generator: torch.Generator | None = None, record: bool = True
    ) -> Trajectory:
        """Sample latents for `prompts`, recording the trajectory (x_t, x_{t−1}, t, log-prob) of every step."""
        embeds = self.encode_prompts(prompts)
        initial = torch.randn((len(prompts), *self.latent_shape), generator=generator).to(self.device)
        initial = initial * self.scheduler.init_noise_sigma
        was = self.module.training
        self.module.eval()
        traj = sample_trajectory(
            lambda x, t: self.predict(x, t, embeds),
            self.scheduler,
            initial,
            num_steps=self.num_steps,
            eta=self.eta,
            generator=generator,
            record=record,
        )
        self.module.train(was)
        traj.conditioning["prompt_embeds"] = embeds
        return traj

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], shape [B, 3, H, W] (what image rewards take)."""
        images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return images.clamp(-1, 1)

    @staticmethod
    def to_pil(images: torch.Tensor) -> list[Image.Image]:
        arr = ((images.detach().cpu().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr]

    # ------------------------------------------------------------------------ policy gradient (steps)
    def conditioning_of(self, trajectory: Trajectory, i: int) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": trajectory.conditioning["prompt_embeds"][i], "final": trajectory.final[i]}

    def step_batch(self, examples: Sequence[dict[str, Any]], j: int) -> dict[str, torch.Tensor]:
        """The j-th trained step of every example (all examples of a rollout share their step indices)."""
        t = examples[0]["timesteps"][j]
        return {
            "latents": torch.stack([e["latents"][j] for e in examples]).to(self.device),
            "next_latents": torch.stack([e["next_latents"][j] for e in examples]).to(self.device),
            "timestep": t,
            "prompt_embeds": torch.stack([e["conditioning"]["prompt_embeds"] for e in examples]).to(
                self.device
            ),
            "final": torch.stack([e["conditioning"]["final"] for e in examples]).to(self.device),
        }

    def step_distribution(self, step: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and σ of the step under the current (or, in `reference()`, the base) weights."""
        if self.scheduler.num_inference_steps != self.num_steps:
            self.scheduler.set_timesteps(self.num_steps, device=self.device)
        x, t = step["latents"], step["timestep"]
        return step_distribution(self.scheduler, self.predict(x, t, step["prompt_embeds"]), t, x, self.eta)

    def trajectory_denoising_loss(self, step: dict[str, torch.Tensor]) -> torch.Tensor:
        """DLPO's penalty: ‖ε̃ − ε_θ(x_t, c, t)‖² with ε̃ the noise that takes the final sample to the recorded x_t."""
        x, t, x0 = step["latents"], step["timestep"], step["final"]
        abar = self.train_scheduler.alphas_cumprod.to(x.device)[t]
        target = ((x - abar.sqrt() * x0) / (1 - abar).sqrt()).detach()
        output = self.predict(x, t.expand(len(x)), step["prompt_embeds"], guidance=1.0)
        return ((output - target) ** 2).flatten(1).mean(1)

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

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def collate_pairs(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Preferred then rejected latents; each pair shares one noise draw and one timestep (Diffusion-DPO)."""
        n = len(examples)
        latents = torch.stack([e["latents_w"] for e in examples] + [e["latents_l"] for e in examples])
        noise = torch.randn((n, *latents.shape[1:])).repeat(2, 1, 1, 1)
        t = torch.randint(0, self.train_scheduler.config.num_train_timesteps, (n,)).repeat(2)
        prompts = [e["prompt"] for e in examples]
        embeds = self.encode_prompts(prompts + prompts)
        return {"latents": latents, "noise": noise, "timesteps": t, "prompt_embeds": embeds}

    def sequence_logprobs(
        self, batch: dict[str, torch.Tensor], *, entropies: bool = False
    ) -> SequenceLogProbs:
        """Diffusion-DPO's per-sample log-likelihood surrogate −½‖ε − ε_θ(x_t, t)‖² as a one-"token" sequence.

        With it, the preference objectives compute Diffusion-DPO (Wallace et al. 2023; seed 004 §5.2.1): the
        log-ratio of the preferred image minus the rejected one is −½[(‖ε_w − ε_θ‖² − ‖ε_w − ε_ref‖²) −
        (‖ε_l − ε_θ‖² − ‖ε_l − ε_ref‖²)], and β absorbs the paper's T·ω(λ_t) weighting.
        """
        if entropies:
            raise ValueError("Mallows-DPO needs token entropies; diffusion policies have none")
        dev = self.device
        embeds = batch["prompt_embeds"].to(dev)
        loss = denoising_loss(
            lambda x, t: self.predict(x, t, embeds, guidance=1.0),
            self.train_scheduler,
            batch["latents"].to(dev),
            batch["noise"].to(dev),
            batch["timesteps"].to(dev),
        )
        logp = (-0.5 * loss).unsqueeze(-1)
        return SequenceLogProbs(logp, torch.ones_like(logp))
