"""The modality-free part of every diffusion policy: weights and reference, guided prediction, sampling.

An adapter (text-to-image, text-to-speech) subclasses `DenoisingPolicy` and supplies what is modal: how prompts
become conditioning (`encode_prompts`), how the denoiser is called with it (`denoise`), how final latents become
outputs (`decode`), how a row's files become latents (`encode_pair`, `encode_target`), how outputs are written
(`write_outputs`) and how trained weights are saved. The policy owns its `sampler` and `forward_process`; the
objective math (step log-probs, KLs, Diffusion-DPO, DLPO's terms) is composed by the algorithms from these parts.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch

from mmalign.core.config import check_dtype
from mmalign.core.data import Row
from mmalign.core.params import LoraSpec, TrainableModule, check_lora_targets
from mmalign.core.sampler import ForwardProcess, Sampler
from mmalign.core.sampling import sample_trajectory
from mmalign.core.types import Conditioning, Trajectory

if TYPE_CHECKING:
    from diffusers.loaders.peft import PeftAdapterMixin
    from diffusers.models.modeling_utils import ModelMixin

    class Denoiser(ModelMixin, PeftAdapterMixin):
        """What every denoiser is (UNets, DiT transformers, the mel denoiser): a diffusers model with adapters."""


UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
SAMPLERS = ("ddim", "ddpm")


@dataclass
class DiffusionModelConfig:
    """`model:` of the DDPM-family diffusion model kinds (Stable Diffusion, mel TTS, AudioLDM 2): pipeline and sampler."""

    kind: str = "diffusion_image"
    name_or_path: str = ""
    lora: dict[str, Any] | None = None  # LoRA on the UNet attention projections; null = full UNet fine-tuning
    dtype: str = "float32"
    sampler: str = "ddim"  # ddim | ddpm
    num_steps: int = 20
    eta: float = 1.0  # DDIM's η: 0 is deterministic (reward backprop, evaluation), > 0 gives log-probs
    guidance_scale: float = 5.0

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"model.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.num_steps < 1:
            raise ValueError(f"model.num_steps must be >= 1, got {self.num_steps}")
        if self.eta < 0:
            raise ValueError(f"model.eta must be >= 0, got {self.eta}")
        check_dtype(self.dtype)


def concat_conditioning(*parts: Conditioning) -> Conditioning:
    """Conditioning of several batches as one batch (e.g. unconditional then conditional for guidance)."""
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def select_conditioning(conditioning: Conditioning, index: Any) -> Conditioning:
    """The conditioning of some samples of a batch."""
    return {key: value[index] for key, value in conditioning.items()}


class DenoisingPolicy(TrainableModule, ABC):
    """A text-conditioned denoiser (a diffusers model) as a policy over denoising trajectories.

    LoRA through diffusers' peft integration (reference = adapters disabled) or full fine-tuning (reference =
    frozen copy). Predictions use classifier-free guidance with the empty prompt as the unconditional branch.
    """

    lora_targets: list[str] = UNET_LORA_TARGETS

    def __init__(
        self,
        denoiser: torch.nn.Module,
        sampler: Sampler,
        forward_process: ForwardProcess,
        sample_shape: tuple[int, ...],
        *,
        lora: LoraSpec | None = None,
        guidance_scale: float = 5.0,
    ):
        self.lora = lora
        # a diffusers model with peft adapters (what the adapters build); typed as torch's for callers
        network = cast("Denoiser", denoiser)
        if lora is not None:
            from peft import LoraConfig

            targets = self.lora_targets if lora.target_modules == "all-linear" else lora.target_modules
            check_lora_targets(network, targets)
            network.requires_grad_(False)
            network.add_adapter(
                LoraConfig(
                    r=lora.r,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    init_lora_weights="gaussian",
                    target_modules=targets,
                )
            )
            self._reference_model: torch.nn.Module | None = None
        else:
            self._reference_model = copy.deepcopy(network).requires_grad_(False).eval()
        self.module: Denoiser = network
        self.model: torch.nn.Module = network
        self.sampler, self.forward_process = sampler, forward_process
        self.guidance_scale = guidance_scale
        self.sample_shape = tuple(sample_shape)
        self._use_reference = False
        self._negative: Conditioning | None = None

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def attach(self, model: torch.nn.Module) -> None:
        self.model = model

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the denoiser's activations in the backward pass (diffusers' checkpointing; same gradients)."""
        self.module.enable_gradient_checkpointing()

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Modules that never train but run beside the denoiser (adapters add their encoders and decoders)."""
        return [] if self._reference_model is None else [self._reference_model]

    def move_frozen_to(self, device: torch.device | str) -> None:
        """Put the frozen parts on the device the trainer placed the denoiser on (a GPU run moves only that)."""
        for module in self.frozen_modules():
            module.to(device)
        self._negative = None

    # ------------------------------------------------------------------------------ modality hooks
    @abstractmethod
    def encode_prompts(self, prompts: Sequence[Any]) -> Conditioning:
        """Conditioning tensors `{name: [B, ...]}` of prompts from the frozen encoders."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> Any:
        """The modality's outputs (what its rewards take) from final latents."""

    @abstractmethod
    def encode_pair(self, row: Row) -> dict[str, Any]:
        """A preference row's two outputs as latents: {prompt, latents_w, latents_l}."""

    @abstractmethod
    def save_pretrained(self, path: str) -> None:
        """Trained weights in the model family's own format."""

    @abstractmethod
    def write_outputs(self, outputs: Any, prompts: Sequence[Any], out_dir: str, stem: str) -> list[str]:
        """Decoded outputs saved as files (PNG, WAV); returns their paths."""

    def encode_target(self, row: Row) -> dict[str, Any]:
        """A real output of a row's prompt as latents; adapters that can read real outputs override this."""
        raise row.error(None, f"{type(self).__name__} cannot read real outputs (data.targets)")

    def denoise(self, net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, conditioning: Conditioning):
        """One forward of the denoiser; adapters with other conditioning inputs override this."""
        return net(x, t, encoder_hidden_states=conditioning["prompt_embeds"]).sample

    def negative_conditioning(self) -> Conditioning:
        """Conditioning of the unconditional branch for one sample (the empty prompt)."""
        return self.encode_prompts([""])

    def prompt_of(self, row: Row) -> Any:
        return row.data["prompt"]

    def reward_prompt(self, row: Row) -> Any:
        return row.data["prompt"]

    # ---------------------------------------------------------------------------------- policy protocol
    @contextmanager
    def reference(self) -> Iterator[None]:
        """Inside, the denoiser is the frozen base: adapters disabled (LoRA) or the frozen copy (full)."""
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

    def unconditional(self, n: int) -> Conditioning:
        """The unconditional branch's conditioning for a batch of n (computed once, then expanded)."""
        if self._negative is None:
            with torch.no_grad():
                self._negative = self.negative_conditioning()
        return {key: value.expand(n, *value.shape[1:]) for key, value in self._negative.items()}

    def _net(self) -> torch.nn.Module:
        return (
            self._reference_model if self._use_reference and self._reference_model is not None else self.model
        )

    def predict(
        self, x: torch.Tensor, t: torch.Tensor, conditioning: Conditioning, *, guidance: float | None = None
    ) -> torch.Tensor:
        """The denoiser's output with classifier-free guidance (uncond + w·(cond − uncond)); w = 1 is unguided."""
        w = self.guidance_scale if guidance is None else guidance
        net = self._net()
        if w == 1.0:
            return self.denoise(net, x, t, conditioning)
        both = self.denoise(
            net, torch.cat([x, x]), t, concat_conditioning(self.unconditional(len(x)), conditioning)
        )
        uncond, cond = both.chunk(2)
        return uncond + w * (cond - uncond)

    # ------------------------------------------------------------------------------------------ sampling
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
        """Sample latents for `prompts`, recording the trajectory (x_i, x_{i+1}, t, log-prob) of every step.

        `sampler` replaces the policy's own for this call (e.g. one rollout's SDE window, or the ODE for evaluation).
        """
        sampler = self.sampler if sampler is None else sampler
        conditioning = self.encode_prompts(prompts)
        if initial is None:
            initial = sampler.initial_noise((len(prompts), *self.sample_shape), generator, self.device)
        was = self.module.training
        self.module.eval()
        traj = sample_trajectory(
            lambda x, t: self.predict(x, t, conditioning),
            sampler,
            initial,
            generator=generator,
            record=record,
        )
        self.module.train(was)
        traj.conditioning = conditioning
        return traj
