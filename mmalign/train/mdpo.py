"""mDPO (Wang et al., 2024): DPO + conditional image preference + reward anchor, for VLM sequence policies.

The image-side terms live in `mmalign.train.image_terms`, where POVID and RLHF-V take them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmalign.core.data import Row
from mmalign.objectives import preference as P
from mmalign.objectives.sequence import sequence_logps
from mmalign.train.algorithm import AlgorithmBase
from mmalign.train.image_terms import CorruptibleImagePolicy, ImageTerms, ImageTermsConfig
from mmalign.train.povid import nll_term


@dataclass
class MDPOConfig(ImageTermsConfig):
    """`algorithm:` of mDPO (Wang et al., 2024, Eq. 4): DPO + conditional image preference + reward anchor, one β.

    The paper's weights are 1 and 1; `sft_weight` (0 = the paper) adds the NLL anchor POVID and RLHF-V use here.
    """

    name: str = "mdpo"
    beta: float = 0.1
    conditional_weight: float = 1.0
    anchor_weight: float = 1.0
    sft_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise ValueError(f"algorithm.beta must be > 0, got {self.beta}")
        if not self.sft_weight >= 0:
            raise ValueError(f"algorithm.sft_weight must be >= 0, got {self.sft_weight}")


class MDPOAlgorithm(AlgorithmBase):
    """Rows (image, prompt, chosen, rejected) → mDPO losses; chosen, rejected and corrupted-image chosen in one
    forward pass, the reference on the same batch (same corrupted pixels)."""

    online = False

    def __init__(self, policy: CorruptibleImagePolicy, rows: Sequence[Row], config: MDPOConfig):
        self.policy, self.config = policy, config
        self.terms = ImageTerms(policy, config, config.beta)
        self.train_examples = []
        for i, row in enumerate(rows):
            e = policy.encode_row_prompt(row)
            e["index"] = i
            for field in ("chosen", "rejected"):
                e[f"{field}_ids"] = policy.encode_response(row, e["prompt_ids"], field)
            self.train_examples.append(e)

    def loss(self, examples: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, n = self.config, len(examples)
        seqs = [(e["prompt_ids"], e["chosen_ids"], e["pixel_values"]) for e in examples]
        seqs += [(e["prompt_ids"], e["rejected_ids"], e["pixel_values"]) for e in examples]
        seqs += self.terms.corrupted_sequences(examples)
        batch = self.policy.collate(seqs)
        lp = self.policy.sequence_logprobs(batch)
        scores = sequence_logps(lp.token_logps, lp.mask)
        with torch.no_grad(), self.policy.reference():
            ref = self.policy.sequence_logprobs(batch)
        ratios = scores - sequence_logps(ref.token_logps, ref.mask)
        h_w, h_l = ratios[:n], ratios[n : 2 * n]
        h_c = ratios[2 * n :] if self.terms.conditional else None
        losses = P.dpo_loss(h_w, h_l, cfg.beta)
        extra, metrics = self.terms.losses(h_w, h_c)
        losses = losses + extra
        if cfg.sft_weight:
            losses = losses + nll_term(lp, n, cfg.sft_weight)
        metrics.update(P.preference_metrics(cfg.beta * h_w.detach(), cfg.beta * h_l.detach()))
        metrics["logps/chosen"] = scores[:n].detach().mean()
        metrics["logps/rejected"] = scores[n : 2 * n].detach().mean()
        return losses, metrics
