"""Online Diffusion-DPO: two samples per prompt from the policy itself, ranked by a reward, trained with the
Diffusion-DPO objective (seed 004 §5.2.1 applied online, as OAIF does for text in §4.2.1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmalign.core.data import Row
from mmalign.core.reward import score
from mmalign.train.online import OnlineDPO, OnlineDPOConfig

__all__ = ["OnlineDPOConfig", "OnlineDiffusionDPO"]


class OnlineDiffusionDPO(OnlineDPO):
    """`OnlineDPO` whose samples are final latents of a diffusion policy (ties get weight 0)."""

    @torch.no_grad()
    def rollout(self, rows: Sequence[Row]) -> tuple[list[dict[str, Any]], dict[str, float]]:
        prompts = [r.data["prompt"] for r in rows for _ in range(2)]
        final = self.policy.sample(prompts, record=False).final
        rewards = score(self.reward, prompts, self.policy.decode(final)).float().view(-1, 2)
        examples = []
        for i, pair in enumerate(rewards):
            first_wins = bool(pair[0] >= pair[1])
            win, lose = (2 * i, 2 * i + 1) if first_wins else (2 * i + 1, 2 * i)
            examples.append(
                {
                    "prompt": prompts[2 * i],
                    "latents_w": final[win].cpu(),
                    "latents_l": final[lose].cpu(),
                    "weight": float(pair[0] != pair[1]),
                }
            )
        ties = sum(e["weight"] == 0 for e in examples) / len(examples)
        return examples, {"rollout/reward": rewards.mean().item(), "rollout/tie_fraction": ties}
