"""mDPO's two image-side terms as an add-on for any VLM preference algorithm (POVID, RLHF-V, mDPO).

mDPO (Wang et al., 2024) adds to a preference loss (1) a conditional image preference: the preferred response
scored under the real image is preferred over the same response under a corrupted image, so the model cannot
satisfy the preference from the text alone; (2) a reward anchor keeping the preferred response's implicit reward
above δ. `ImageTermsConfig` holds their settings (weights 0 = off; the algorithms' configs inherit it) and
`ImageTerms` appends the corrupted sequences to an algorithm's batch and turns the scores into losses. The
corrupted image comes from the policy (`corrupt_pixel_values`: a random crop of at most 20% of the image as in the
paper, or POVID's diffusion noise), drawn afresh every step from torch's seeded, checkpointed generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from mmalign.core.policy import ImageSequencePolicy
from mmalign.objectives import preference as P

CORRUPTIONS = ("crop", "noise")


class CorruptibleImagePolicy(ImageSequencePolicy, Protocol):
    """An image sequence policy that can corrupt its processed images (the VLM policy)."""

    def corrupt_pixel_values(self, pixels: torch.Tensor, how: str, **options: Any) -> torch.Tensor: ...


@dataclass
class ImageTermsConfig:
    """mDPO's image-side terms, which any VLM preference algorithm's `algorithm:` section can switch on.

    `conditional_weight` scales ℓ_CoPO (same response, real vs corrupted image), `anchor_weight` the reward anchor
    ℓ_AnchPO with margin `anchor_delta`; 0 turns a term off. `corruption` is `crop` (a random crop of at most
    `crop_max_area` of the image, resized back: the paper's) or `noise` (forward diffusion to `noise_step`).
    """

    conditional_weight: float = 0.0
    anchor_weight: float = 0.0
    anchor_delta: float = 0.0
    corruption: str = "crop"
    crop_max_area: float = 0.2
    noise_step: int = 500

    def __post_init__(self) -> None:
        for key in ("conditional_weight", "anchor_weight"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"algorithm.{key} must be >= 0, got {getattr(self, key)}")
        if self.corruption not in CORRUPTIONS:
            raise ValueError(f"algorithm.corruption must be one of {CORRUPTIONS}, got {self.corruption!r}")
        if not 0 < self.crop_max_area <= 1:
            raise ValueError(f"algorithm.crop_max_area must be in (0, 1], got {self.crop_max_area}")
        if not 0 <= self.noise_step < 1000:
            raise ValueError(f"algorithm.noise_step must be in [0, 1000), got {self.noise_step}")


class ImageTerms:
    """Adds ℓ_CoPO and ℓ_AnchPO to an algorithm's per-sample losses, with β the algorithm's chosen-side scale."""

    def __init__(self, policy: CorruptibleImagePolicy, config: ImageTermsConfig, beta: float):
        self.policy, self.config, self.beta = policy, config, beta
        self.conditional = config.conditional_weight > 0
        self.anchor = config.anchor_weight > 0
        if self.conditional and not hasattr(policy, "corrupt_pixel_values"):
            raise ValueError(
                f"algorithm.conditional_weight > 0 needs a policy that reads images; {type(policy).__name__} "
                "has no corrupt_pixel_values"
            )

    def corrupted_sequences(self, examples: Sequence[dict[str, Any]]) -> list[tuple[Any, Any, torch.Tensor]]:
        """(prompt ids, chosen ids, corrupted pixels) per example, to append to the batch; none if CoPO is off."""
        if not self.conditional:
            return []
        cfg = self.config
        pixels = torch.stack([e["pixel_values"] for e in examples])
        options = (
            {"max_area": cfg.crop_max_area} if cfg.corruption == "crop" else {"noise_step": cfg.noise_step}
        )
        corrupted = self.policy.corrupt_pixel_values(pixels, cfg.corruption, **options)
        return [(e["prompt_ids"], e["chosen_ids"], px) for e, px in zip(examples, corrupted, strict=True)]

    def losses(
        self, chosen_logratios: torch.Tensor, corrupted_logratios: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted ℓ_CoPO + ℓ_AnchPO per sample, and their metrics (image-conditional margin and accuracy)."""
        cfg, metrics = self.config, {}
        total = torch.zeros_like(chosen_logratios)
        if self.conditional:
            assert corrupted_logratios is not None
            total = total + cfg.conditional_weight * P.conditional_image_loss(
                chosen_logratios, corrupted_logratios, self.beta
            )
            margin = self.beta * (chosen_logratios - corrupted_logratios).detach()
            metrics["rewards/image_margin"] = margin.mean()
            metrics["rewards/image_accuracy"] = (margin > 0).float().mean()
        if self.anchor:
            total = total + cfg.anchor_weight * P.reward_anchor_loss(
                chosen_logratios, self.beta, cfg.anchor_delta
            )
        return total, metrics
