"""Text-to-image flow-matching transformers (Stable Diffusion 3, FLUX) as diffusion policies.

A flow model is the diffusion policy kind with the flow-matching sampler family: the policy owns a
`FlowMatchSampler` (Euler ODE, or Flow-GRPO / DanceGRPO SDE steps with log-probs) and a `FlowMatchForwardProcess`
(x_σ = (1 − σ)·x₀ + σ·ε, velocity target ε − x₀), so every diffusion algorithm (the policy gradient over SDE steps,
Diffusion-DPO through the forward process, DiffusionNFT, reward backprop) runs on it unchanged. This base class
holds what SD3 and FLUX share: the VAE with its shift and scale, the diffusers LoRA format of the transformer, image
pairs, and a second, deterministic sampler on the same grid (`eval_sampler`: the plain pipeline's Euler steps).
Subclasses say how prompts become conditioning, how the transformer is called and how latents are laid out.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmalign.core.data import Row
from mmalign.core.diffusion_policy import DenoisingPolicy
from mmalign.core.flow import SDE_TYPES, TIMESTEP_SAMPLING, FlowMatchForwardProcess, FlowMatchSampler
from mmalign.core.params import LoraSpec
from mmalign.core.sampler import Sampler

# The MM-DiT attention projections of both streams (image: to_*, text: add_*_proj / to_add_out), Flow-GRPO's set.
MMDIT_LORA_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
]
SDE_ALIASES = {"sde": "flow_grpo"}  # Flow-GRPO's `sample.sde_type: sde`
EVAL_SAMPLERS = ("ode", "train")
DDPM_SAMPLERS = ("ddim", "ddpm")


@dataclass
class FlowModelConfig:
    """`model:` of the flow-matching kinds: pipeline, sampler grid and SDE, and the training-time σ density.

    There is no `eta` (DDIM's noise knob) and no DDPM scheduler choice: the SDE is `sde_type` with `noise_level`
    (Flow-GRPO's a in σ_t = a·sqrt(σ/(1 − σ)), DanceGRPO's constant η), only inside `sde_window` [start, end) of the
    `num_steps` steps when set. Evaluation samples with the ODE (the plain pipeline's Euler steps) unless
    `eval_sampler: train`.
    """

    kind: str = "diffusion_sd3"
    name_or_path: str = ""
    lora: dict[str, Any] | None = (
        None  # LoRA on the transformer's attention projections; null = full fine-tuning
    )
    dtype: str = "float32"
    num_steps: int = 10
    guidance_scale: float = 4.5
    sde_type: str = "flow_grpo"  # ode | flow_grpo (alias: sde) | dance_grpo
    noise_level: float = 0.7
    sde_window: tuple[int, int] | None = None  # null = every step is an SDE step
    eval_sampler: str = "ode"  # ode | train
    resolution: int | None = None  # image side in pixels; null = the pipeline's default
    max_sequence_length: int | None = None  # T5 tokens; null = the pipeline's default
    timestep_sampling: str = "logit_normal"  # σ density of training losses (Diffusion-DPO, DiffusionNFT)

    def __post_init__(self) -> None:
        if self.sde_type in DDPM_SAMPLERS:
            raise ValueError(
                f"model.sde_type {self.sde_type!r} is a DDPM-family scheduler; flow-matching models sample with "
                f"{', '.join(SDE_TYPES)}"
            )
        self.sde_type = SDE_ALIASES.get(self.sde_type, self.sde_type)
        if self.sde_type not in SDE_TYPES:
            raise ValueError(f"model.sde_type must be one of {SDE_TYPES} (or 'sde'), got {self.sde_type!r}")
        if self.num_steps < 1:
            raise ValueError(f"model.num_steps must be >= 1, got {self.num_steps}")
        if not self.noise_level >= 0:
            raise ValueError(f"model.noise_level must be >= 0, got {self.noise_level}")
        if self.sde_window is not None:
            window = tuple(self.sde_window)
            if len(window) != 2 or not 0 <= window[0] < window[1] <= self.num_steps:
                raise ValueError(
                    f"model.sde_window must be [start, end] with 0 <= start < end <= num_steps={self.num_steps}, "
                    f"got {list(self.sde_window)}"
                )
            self.sde_window = (int(window[0]), int(window[1]))
        if self.eval_sampler not in EVAL_SAMPLERS:
            raise ValueError(f"model.eval_sampler must be one of {EVAL_SAMPLERS}, got {self.eval_sampler!r}")
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"model.resolution must be >= 1, got {self.resolution}")
        if self.max_sequence_length is not None and self.max_sequence_length < 0:
            raise ValueError(f"model.max_sequence_length must be >= 0, got {self.max_sequence_length}")
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(
                f"model.timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {self.timestep_sampling!r}"
            )
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"model.dtype must be float32, float16 or bfloat16, got {self.dtype!r}")

    def policy_kwargs(self) -> dict[str, Any]:
        """The sampler and pipeline settings a flow policy's constructor takes."""
        return {
            "num_steps": self.num_steps,
            "guidance_scale": self.guidance_scale,
            "sde_type": self.sde_type,
            "noise_level": self.noise_level,
            "sde_window": self.sde_window,
            "eval_sampler": self.eval_sampler,
            "resolution": self.resolution,
            "max_sequence_length": self.max_sequence_length,
            "timestep_sampling": self.timestep_sampling,
        }


def absent_components(name_or_path: str) -> dict[str, None]:
    """Components a saved pipeline directory lists as null (SD3 saved without T5), to pass as None when loading."""
    import json

    index = Path(name_or_path) / "model_index.json"
    if not index.is_file():
        return {}
    entries = json.loads(index.read_text())
    return {
        name: None
        for name, value in entries.items()
        if not name.startswith("_") and isinstance(value, list) and value[0] is None
    }


def batch_timestep(t: torch.Tensor, n: int) -> torch.Tensor:
    """A timestep per sample: a scalar expanded, or a per-sample vector repeated over the CFG branches."""
    t = torch.as_tensor(t)
    if t.dim() == 0:
        return t.expand(n)
    return t if len(t) == n else t.repeat(n // len(t))


class FlowImagePolicy(DenoisingPolicy):
    """A flow-matching text-to-image pipeline whose transformer is the policy (SD3 and FLUX share this)."""

    lora_targets = MMDIT_LORA_TARGETS
    layout = "sd3"  # the pipeline whose σ grid FlowMatchSampler reproduces

    def __init__(
        self,
        pipeline: Any,
        *,
        lora: LoraSpec | None = None,
        num_steps: int = 10,
        guidance_scale: float = 4.5,
        sde_type: str = "flow_grpo",
        noise_level: float = 0.7,
        sde_window: tuple[int, int] | None = None,
        eval_sampler: str = "ode",
        resolution: int | None = None,
        max_sequence_length: int | None = None,
        timestep_sampling: str = "logit_normal",
    ):
        self.pipeline = pipeline
        self.vae = pipeline.vae
        self.compute_dtype = pipeline.transformer.dtype  # what the transformer's inputs are cast to
        for frozen in self.encoders():
            frozen.requires_grad_(False).eval()
        self.resolution = resolution or self.default_resolution()
        side = self.resolution // self.vae_scale_factor
        if side * self.vae_scale_factor != self.resolution:
            raise ValueError(
                f"model.resolution {self.resolution} is not a multiple of the VAE's scale factor "
                f"{self.vae_scale_factor}"
            )
        self.latent_shape = (self.vae.config.latent_channels, side, side)
        self.max_sequence_length = max_sequence_length
        config = {**pipeline.scheduler.config, "_class_name": type(pipeline.scheduler).__name__}
        grid = {"layout": self.layout, "image_seq_len": self.image_seq_len()}
        sampler = FlowMatchSampler(
            config, num_steps, sde_type=sde_type, noise_level=noise_level, sde_window=sde_window, **grid
        )
        self.ode_sampler = FlowMatchSampler(config, num_steps, sde_type="ode", **grid)
        self.eval_sampler: Sampler = self.ode_sampler if eval_sampler == "ode" else sampler
        super().__init__(
            pipeline.transformer,
            sampler,
            FlowMatchForwardProcess(config, timestep_sampling=timestep_sampling),
            self.state_shape(),
            lora=lora,
            guidance_scale=guidance_scale,
        )
        if (
            lora is not None
        ):  # LoRA weights train in float32 on a half-precision base (diffusers' training scripts)
            for param in self.trainable_parameters():
                param.data = param.data.float()

    # ------------------------------------------------------------------------------- family hooks
    @abstractmethod
    def encoders(self) -> list[torch.nn.Module]:
        """The frozen text encoders that are present."""

    @abstractmethod
    def default_resolution(self) -> int:
        """The image side the pipeline generates when called without height/width."""

    @abstractmethod
    def image_seq_len(self) -> int:
        """The transformer's image token count (what shifts the σ grid where μ is used)."""

    def state_shape(self) -> tuple[int, ...]:
        """The shape of one sample's state in the sampler (the latents; FLUX packs them)."""
        return self.latent_shape

    def to_latents(self, state: torch.Tensor) -> torch.Tensor:
        """VAE latents [B, C, h, w] from sampler states."""
        return state

    def to_state(self, latents: torch.Tensor) -> torch.Tensor:
        """Sampler states from VAE latents [B, C, h, w]."""
        return latents

    # ------------------------------------------------------------------------------------ plumbing
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [*super().frozen_modules(), self.vae, *self.encoders()]

    @contextmanager
    def sampling_with(self, sampler: Sampler) -> Iterator[None]:
        """Inside, `self.sampler` is `sampler` (what evaluation uses to sample with `eval_sampler`)."""
        own = self.sampler
        self.sampler = sampler
        try:
            yield
        finally:
            self.sampler = own

    def save_pretrained(self, path: str) -> None:
        """LoRA: diffusers-format `pytorch_lora_weights.safetensors` (with r and alpha); full: the whole pipeline."""
        if self.lora is None:
            self.pipeline.save_pretrained(path)
            return
        from peft.utils import get_peft_model_state_dict

        # the transformers' loaders read peft's key names (diffusers' SD3/FLUX training scripts save them as is)
        type(self.pipeline).save_lora_weights(
            path,
            transformer_lora_layers=get_peft_model_state_dict(self.module),
            transformer_lora_adapter_metadata=self.module.peft_config["default"].to_dict(),
        )

    # ------------------------------------------------------------------------------------- outputs
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], [B, 3, H, W], as the pipelines decode (x / scale + shift); differentiable."""
        config = self.vae.config
        z = self.to_latents(latents) / config.scaling_factor + (config.shift_factor or 0.0)
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)

    def write_outputs(
        self, outputs: torch.Tensor, prompts: Sequence[Any], out_dir: str, stem: str
    ) -> list[str]:
        """One PNG per image: `<out_dir>/<stem>_<i>.png`."""
        from mmalign.vision.diffusion_policy import DiffusionImagePolicy

        paths = []
        for i, image in enumerate(DiffusionImagePolicy.to_pil(outputs)):
            path = Path(out_dir) / f"{stem}_{i:03d}.png"
            image.save(path)
            paths.append(str(path))
        return paths

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Sampler states of images in [-1, 1] (the VAE posterior mean, shifted and scaled as in training)."""
        config = self.vae.config
        with torch.no_grad():
            z = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist.mean
        return self.to_state(((z - (config.shift_factor or 0.0)) * config.scaling_factor).float())

    def encode_pair(self, row: Row) -> dict[str, Any]:
        """A pair's two images (validated, at the model's resolution) as sampler states, encoded once."""
        from mmalign.vision.images import load_image_tensor

        base = Path(row.source).parent if row.source and not row.source.startswith("<") else Path(".")
        images = [load_image_tensor(row, field, base, self.resolution) for field in ("image_w", "image_l")]
        states = self.encode_images(torch.stack(images)).cpu()
        return {"prompt": row.data["prompt"], "latents_w": states[0], "latents_l": states[1]}


class EvalSamplerEvaluation:
    """An evaluator of a flow policy that samples with the policy's `eval_sampler` (by default the ODE), so every
    method is measured as the plain pipeline samples, whatever SDE it trained with."""

    def __init__(self, evaluator: Any):
        self.evaluator = evaluator

    def evaluate(self, policy: FlowImagePolicy) -> dict[str, float]:
        with policy.sampling_with(policy.eval_sampler):
            return self.evaluator.evaluate(policy)

    def samples(self, policy: FlowImagePolicy) -> list[dict[str, Any]]:
        with policy.sampling_with(policy.eval_sampler):
            return self.evaluator.samples(policy)

    def by_prompt(self, policy: FlowImagePolicy) -> list[dict[str, Any]]:
        with policy.sampling_with(policy.eval_sampler):
            return self.evaluator.by_prompt(policy)
