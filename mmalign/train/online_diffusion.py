"""Online Diffusion-DPO: samples from the policy itself, the best and worst of each prompt's by a reward, trained
with the Diffusion-DPO objective (seed 004 §5.2.1 applied online, as OAIF does for text in §4.2.1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmalign.core.data import Row
from mmalign.core.reward import score
from mmalign.train.online import OnlineDPO, OnlineDPOConfig, best_and_worst

__all__ = ["OnlineDPOConfig", "OnlineDiffusionDPO"]


class OnlineDiffusionDPO(OnlineDPO):
    """`OnlineDPO` whose samples are final latents of a diffusion policy (ties get weight 0)."""

    @torch.no_grad()
    def rollout(self, rows: Sequence[Row]) -> tuple[list[dict[str, Any]], dict[str, float]]:
        k = self.samples_per_prompt
        prompts = [r.data["prompt"] for r in rows for _ in range(k)]
        final = self.policy.sample(prompts, record=False).final
        rewards = score(self.reward, prompts, self.policy.decode(final)).float().view(-1, k)
        examples = [
            {
                "prompt": prompts[k * i],
                "latents_w": final[k * i + win].cpu(),
                "latents_l": final[k * i + lose].cpu(),
                "weight": weight,
            }
            for i, (win, lose, weight) in enumerate(best_and_worst(rewards))
        ]
        ties = sum(e["weight"] == 0 for e in examples) / len(examples)
        return examples, {"rollout/reward": rewards.mean().item(), "rollout/tie_fraction": ties}
