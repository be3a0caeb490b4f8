"""Online Diffusion-DPO: samples from the policy itself, the best and worst of each prompt's by a reward, trained
with the Diffusion-DPO objective (seed 004 §5.2.1 applied online, as OAIF does for text in §4.2.1)."""

from __future__ import annotations

from typing import Any

import torch

from mmalign.core.data import Row
from mmalign.core.policy import DiffusionPolicy
from mmalign.core.reward import Reward
from mmalign.train.diffusion_preference import PairDenoisingScores
from mmalign.train.online import OnlineDPO, OnlineDPOConfig

__all__ = ["OnlineDPOConfig", "OnlineDiffusionDPO"]


class OnlineDiffusionDPO(OnlineDPO):
    """`OnlineDPO` whose samples are final latents of a diffusion policy (ties get weight 0)."""

    def __init__(self, policy: DiffusionPolicy, prompts: list[Row], reward: Reward, config: OnlineDPOConfig):
        super().__init__(policy, prompts, reward, config, scorer=PairDenoisingScores(policy))

    def _draw(self, prompts: list[Any], k: int) -> tuple[torch.Tensor, Any]:
        final = self.policy.sample([p for p in prompts for _ in range(k)], record=False).final
        return final, self.policy.decode(final)

    def _pair(self, prompt: Any, win: torch.Tensor, lose: torch.Tensor) -> dict[str, Any]:
        return {"prompt": prompt, "latents_w": win.cpu(), "latents_l": lose.cpu()}
