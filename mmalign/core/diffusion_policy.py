"""The modality-free part of every diffusion policy: CFG prediction, recorded sampling, per-step terms, Diffusion-DPO.

An adapter (text-to-image, text-to-speech) subclasses `DenoisingPolicy` and supplies what is modal: how prompts
become conditioning (`encode_prompts`), how final latents become outputs (`decode`), how a preference pair's files
become latents (`encode_pair`) and how trained weights are saved. Everything the algorithms call on a diffusion
policy (`sample`, `conditioning_of`, `step_batch`, `step_distribution`, `trajectory_denoising_loss`,
`data_denoising_loss`, `collate_pairs`, `sequence_logprobs`) lives here once, shape-generic over the latent layout.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from mmalign.core.diffusion import denoising_loss, make_scheduler, sample_trajectory, step_distribution
from mmalign.core.params import LoraSpec, TrainableModule
from mmalign.core.types import SequenceLogProbs, Trajectory

UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class DenoisingPolicy(TrainableModule, ABC):
    """A text-conditioned ε-prediction denoiser (a diffusers model) as a policy over denoising trajectories.

    LoRA through diffusers' peft integration (reference = adapters disabled) or full fine-tuning (reference =
    frozen copy). Sampling uses DDIM (any η > 0 records log-probs) or DDPM with classifier-free guidance.
    """

    deterministic_scores = False  # preference scores draw fresh (noise, t) per batch
    lora_targets: list[str] = UNET_LORA_TARGETS

    def __init__(
        self,
        denoiser: torch.nn.Module,
        scheduler_config: dict[str, Any],
        sample_shape: tuple[int, ...],
        *,
        lora: LoraSpec | None = None,
        sampler: str = "ddim",
        num_steps: int = 20,
        eta: float = 1.0,
        guidance_scale: float = 5.0,
    ):
        self.lora = lora
        if lora is not None:
            from peft import LoraConfig

            targets = self.lora_targets if lora.target_modules == "all-linear" else lora.target_modules
            denoiser.requires_grad_(False)
            denoiser.add_adapter(
                LoraConfig(
                    r=lora.r,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    init_lora_weights="gaussian",
                    target_modules=targets,
                )
            )
            self._reference_model = None
        else:
            self._reference_model = copy.deepcopy(denoiser).requires_grad_(False).eval()
        self.module = denoiser
        self.model: torch.nn.Module = denoiser
        self.scheduler = make_scheduler(sampler, scheduler_config)
        self.train_scheduler = make_scheduler("ddpm", {**scheduler_config, "variance_type": "fixed_small"})
        self.num_steps, self.eta, self.guidance_scale = num_steps, eta, guidance_scale
        self.sample_shape = tuple(sample_shape)
        self._use_reference = False
        self._negative: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

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
    def encode_prompts(self, prompts: Sequence[Any]) -> torch.Tensor:
        """Conditioning `[B, ...]` of prompts from the frozen text encoder."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> Any:
        """The modality's outputs (what its rewards take) from final latents."""

    @abstractmethod
    def encode_pair(self, row: Any) -> dict[str, Any]:
        """A preference row's two outputs as latents: {prompt, latents_w, latents_l}."""

    @abstractmethod
    def save_pretrained(self, path: str) -> None:
        """Trained weights in the model family's own format."""

    def _denoise(self, net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor):
        """One forward of the denoiser; adapters with other conditioning inputs override this."""
        return net(x, t, encoder_hidden_states=embeds).sample

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

    def _negative_embeds(self, n: int) -> torch.Tensor:
        if self._negative is None:
            self._negative = self.encode_prompts([""])
        return self._negative.expand(n, *self._negative.shape[1:])

    def _net(self) -> torch.nn.Module:
        return self._reference_model if self._use_reference else self.model

    def predict(
        self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, *, guidance: float | None = None
    ):
        """Noise prediction with classifier-free guidance (uncond + w·(cond − uncond))."""
        w = self.guidance_scale if guidance is None else guidance
        net = self._net()
        if w == 1.0:
            return self._denoise(net, x, t, embeds)
        both = self._denoise(net, torch.cat([x, x]), t, torch.cat([self._negative_embeds(len(x)), embeds]))
        uncond, cond = both.chunk(2)
        return uncond + w * (cond - uncond)

    # ------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self, prompts: Sequence[Any], *, generator: torch.Generator | None = None, record: bool = True
    ) -> Trajectory:
        """Sample latents for `prompts`, recording the trajectory (x_t, x_{t−1}, t, log-prob) of every step."""
        embeds = self.encode_prompts(prompts)
        initial = torch.randn((len(prompts), *self.sample_shape), generator=generator).to(self.device)
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
            **(
                {"target": torch.stack([e["target"] for e in examples]).to(self.device)}
                if "target" in examples[0]
                else {}
            ),
        }

    def step_distribution(self, step: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and σ of the step under the current (or, in `reference()`, the base) weights."""
        if self.scheduler.num_inference_steps != self.num_steps:
            self.scheduler.set_timesteps(self.num_steps, device=self.device)
        x, t = step["latents"], step["timestep"]
        return step_distribution(self.scheduler, self.predict(x, t, step["prompt_embeds"]), t, x, self.eta)

    def trajectory_denoising_loss(self, step: dict[str, torch.Tensor]) -> torch.Tensor:
        """DLPO's penalty read literally on the sampled trajectory: ‖ε̃ − ε_θ(x_t, c, t)‖², ε̃ the noise that takes the
        final sample to the recorded x_t. It regresses the model onto its own (guided) samples, whatever they are."""
        x, t, x0 = step["latents"], step["timestep"], step["final"]
        abar = self.train_scheduler.alphas_cumprod.to(x.device)[t]
        target = ((x - abar.sqrt() * x0) / (1 - abar).sqrt()).detach()
        output = self.predict(x, t.expand(len(x)), step["prompt_embeds"], guidance=1.0)
        return ((output - target) ** 2).flatten(1).mean(1)

    def data_denoising_loss(self, step: dict[str, torch.Tensor]) -> torch.Tensor:
        """DLPO's penalty on real data: the pretraining ε-loss of the step's target outputs (seed 004 §4.5.6).

        ‖ε − ε_θ(x_t, c, t)‖² with x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε, x_0 a real output for the prompt, fresh ε
        and t ~ U{0, T−1}, as DLPO's reference implementation noises the prompt's recording. The sampler guides
        with the empty prompt too, so its branch gets the same loss: per sample ½(‖ε − ε_θ(x_t, c)‖² +
        ‖ε − ε_θ(x_t, ∅)‖²), both on the same (ε, t).
        """
        x0 = step["target"]
        n = len(x0)
        noise = torch.randn(x0.shape, dtype=x0.dtype).to(x0.device)
        t = torch.randint(0, self.train_scheduler.config.num_train_timesteps, (n,)).to(x0.device)
        embeds = torch.cat([step["prompt_embeds"], self._negative_embeds(n)])
        loss = denoising_loss(
            lambda x, tt: self._denoise(self._net(), x, tt, embeds),
            self.train_scheduler,
            torch.cat([x0, x0]),
            torch.cat([noise, noise]),
            torch.cat([t, t]),
        )
        cond, uncond = loss.chunk(2)
        return 0.5 * (cond + uncond)

    # ---------------------------------------------------------------------- preference (Diffusion-DPO)
    def collate_pairs(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Preferred then rejected latents; each pair shares one noise draw and one timestep (Diffusion-DPO)."""
        n = len(examples)
        latents = torch.stack([e["latents_w"] for e in examples] + [e["latents_l"] for e in examples])
        noise = torch.randn((n, *latents.shape[1:])).repeat(2, *[1] * (latents.dim() - 1))
        t = torch.randint(0, self.train_scheduler.config.num_train_timesteps, (n,)).repeat(2)
        prompts = [e["prompt"] for e in examples]
        embeds = self.encode_prompts(prompts + prompts)
        return {"latents": latents, "noise": noise, "timesteps": t, "prompt_embeds": embeds}

    def sequence_logprobs(
        self, batch: dict[str, torch.Tensor], *, entropies: bool = False
    ) -> SequenceLogProbs:
        """Diffusion-DPO's per-sample log-likelihood surrogate −½‖ε − ε_θ(x_t, t)‖² as a one-"token" sequence.

        With it, the preference objectives compute Diffusion-DPO (Wallace et al. 2023; seed 004 §5.2.1): the
        log-ratio of the preferred output minus the rejected one is −½[(‖ε_w − ε_θ‖² − ‖ε_w − ε_ref‖²) −
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
