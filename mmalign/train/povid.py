"""Hallucination-targeted preference algorithms for sequence policies: POVID and RLHF-V's dense DPO.

Both are offline preference algorithms like `PreferenceAlgorithm`: the reference is scored under
`policy.reference()` on the very batch the policy saw, and the losses are the pure functions of
`mmalign.objectives.preference` (`povid_loss`; `dpo_loss` on token-weighted scores from `dense_token_weights`).
They work for any policy with `encode_row_prompt` / `encode_response` / `collate` (the VLM policy; rows carry an
image) — nothing here knows about images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmalign.core.corrections import apply_corrections
from mmalign.core.data import Row
from mmalign.objectives import preference as P
from mmalign.objectives.sequence import sequence_logps
from mmalign.train.algorithm import AlgorithmBase
from mmalign.train.image_terms import CorruptibleImagePolicy, ImageTerms, ImageTermsConfig

NOISY_CONTEXTS = ("clean", "noisy")


@dataclass
class POVIDConfig(ImageTermsConfig):
    """`algorithm:` of POVID (seed 004 §5.2.2): α on the preferred response, β₁ on the hallucination-injected
    one, β₂ on the noisy-image one (β₂ = 0 is the text-injection-only ablation; the noisy sequences are then not
    scored at all). `noisy_context` is the image the noisy-image response is scored under: `clean` (default, the
    issue's choice: lower the chance of saying it when looking at the real image) or `noisy` (the seed's printed
    π(y_l^n | x^n), which needs a `noisy_image` column). mDPO's image terms (`ImageTermsConfig`) scale with α."""

    name: str = "povid"
    alpha: float = 0.1
    beta1: float = 0.1
    beta2: float = 0.1
    noisy_context: str = "clean"
    sft_weight: float = (
        0.0  # λ of an optional NLL term on the preferred response (see `nll_term`); 0 = the seed
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.noisy_context not in NOISY_CONTEXTS:
            raise ValueError(
                f"algorithm.noisy_context must be one of {NOISY_CONTEXTS}, got {self.noisy_context!r}"
            )


def _scores(lp, weights: torch.Tensor | None = None, normalize: bool = False) -> torch.Tensor:
    return sequence_logps(lp.token_logps, lp.mask, weights, normalize)


def nll_term(lp, n: int, weight: float) -> torch.Tensor:
    """λ · mean-token NLL of the first n sequences (the preferred ones), added per sample to a preference loss.

    Keeps DPO-style losses from lowering the preferred response's likelihood on small-edit pairs (where the
    shared tokens' gradients nearly cancel and the policy drifts), as RPO does (Pang et al., 2024: DPO + NLL).
    """
    if weight < 0:
        raise ValueError(f"sft_weight must be >= 0, got {weight}")
    chosen = lp.split(n)[0]
    return -weight * sequence_logps(chosen.token_logps, chosen.mask, normalize=True)


class POVIDAlgorithm(AlgorithmBase):
    """Rows (image, prompt, chosen, rejected, rejected_noisy?) → POVID losses; one forward per batch."""

    online = False

    def __init__(self, policy: CorruptibleImagePolicy, rows: Sequence[Row], config: POVIDConfig):
        self.policy, self.config = policy, config
        self.terms = ImageTerms(policy, config, config.alpha)
        self.use_noisy = config.beta2 > 0
        self.train_examples = []
        for i, row in enumerate(rows):
            e = policy.encode_row_prompt(row)
            e["index"] = i
            e["chosen_ids"] = policy.encode_response(row, e["prompt_ids"], "chosen")
            e["rejected_ids"] = policy.encode_response(row, e["prompt_ids"], "rejected")
            e["noisy_ids"] = None
            if self.use_noisy and row.data.get("rejected_noisy") is not None:
                ctx = e
                if config.noisy_context == "noisy":
                    ctx = policy.encode_row_prompt(row, "noisy_image")
                    e["noisy_prompt_ids"], e["noisy_pixel_values"] = ctx["prompt_ids"], ctx["pixel_values"]
                e["noisy_ids"] = policy.encode_response(row, ctx["prompt_ids"], "rejected_noisy")
            self.train_examples.append(e)
        if self.use_noisy and not any(e["noisy_ids"] for e in self.train_examples):
            raise ValueError(
                "beta2 > 0 but no row has a rejected_noisy response (set beta2: 0 for text-only)"
            )

    def setup(self) -> None:
        """Nothing to precompute: the reference is scored on every batch."""

    def _batch(self, examples: Sequence[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Chosen, injected, noisy-image (where present), then the corrupted-image chosen (mDPO's term, if on)."""
        seqs = [(e["prompt_ids"], e["chosen_ids"], e["pixel_values"]) for e in examples]
        seqs += [(e["prompt_ids"], e["rejected_ids"], e["pixel_values"]) for e in examples]
        noisy = [i for i, e in enumerate(examples) if e["noisy_ids"]]
        for i in noisy:
            e = examples[i]
            if "noisy_prompt_ids" in e:
                seqs.append((e["noisy_prompt_ids"], e["noisy_ids"], e["noisy_pixel_values"]))
            else:
                seqs.append((e["prompt_ids"], e["noisy_ids"], e["pixel_values"]))
        seqs += self.terms.corrupted_sequences(examples)
        return self.policy.collate(seqs), noisy

    def loss(self, examples: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, n = self.config, len(examples)
        batch, noisy = self._batch(examples)
        lp = self.policy.sequence_logprobs(batch)
        scores = _scores(lp)
        with torch.no_grad(), self.policy.reference():
            ref = _scores(self.policy.sequence_logprobs(batch))
        ratios = scores - ref
        h_w, h_t = ratios[:n], ratios[n : 2 * n]
        end = 2 * n + len(noisy)
        h_n = torch.zeros_like(h_w)
        mask = torch.zeros_like(h_w)
        if noisy:
            idx = torch.tensor(noisy, device=h_w.device)
            h_n = h_n.index_put((idx,), ratios[2 * n : end])
            mask = mask.index_put((idx,), torch.ones(len(noisy), device=h_w.device, dtype=h_w.dtype))
        losses = P.povid_loss(h_w, h_t, h_n, cfg.alpha, cfg.beta1, cfg.beta2, noisy_mask=mask)
        extra, image_metrics = self.terms.losses(h_w, ratios[end:] if self.terms.conditional else None)
        losses = losses + extra
        if cfg.sft_weight:
            losses = losses + nll_term(lp, n, cfg.sft_weight)
        metrics = P.preference_metrics(cfg.alpha * h_w.detach(), cfg.beta1 * h_t.detach())
        metrics.update(image_metrics)
        if noisy:
            metrics["rewards/noisy"] = (cfg.beta2 * h_n.detach()[mask.bool()]).mean()
        metrics["noisy_share"] = mask.mean()
        metrics["logps/chosen"] = scores[:n].detach().mean()
        return losses, metrics

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class DenseDPOConfig(ImageTermsConfig):
    """`algorithm:` of RLHF-V's dense DPO: DPO with β on scores where corrected tokens weigh γ (policy and
    reference alike); `length_normalize` divides by the weighted length N = |y_u| + γ|y_c| as the paper does.
    mDPO's image terms (`ImageTermsConfig`) use β and the same token-weighted score of the corrected response."""

    name: str = "rlhfv"
    beta: float = 0.5
    gamma: float = 5.0
    length_normalize: bool = True
    sft_weight: float = 0.0  # λ of an optional NLL term on the corrected response (see `nll_term`); 0 = paper


def changed_tokens(tokenizer: Any, text: str, spans: Sequence[tuple[int, int]], ids: list[int]) -> list[int]:
    """1 for each token of `ids` (the text's tokens plus a trailing eos) overlapping a changed character span."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if enc["input_ids"] != ids[: len(enc["input_ids"])]:
        raise ValueError("offset tokenisation differs from the response tokenisation")
    flags = [int(any(s < e2 and s2 < e for s2, e2 in spans)) for s, e in enc["offset_mapping"]]
    return flags + [0] * (len(ids) - len(flags))


class DenseDPOAlgorithm(AlgorithmBase):
    """RLHF-V rows (image, prompt, response, corrections) → dense DPO losses: corrected response preferred."""

    online = False

    def __init__(self, policy: CorruptibleImagePolicy, rows: Sequence[Row], config: DenseDPOConfig):
        if config.gamma < 0:
            raise ValueError(f"algorithm.gamma must be >= 0, got {config.gamma}")
        self.policy, self.config = policy, config
        self.terms = ImageTerms(policy, config, config.beta)
        self.train_examples = []
        for i, row in enumerate(rows):
            fixed = apply_corrections(row)
            e = policy.encode_row_prompt(row)
            e["index"] = i
            for side, text, spans in (
                ("chosen", fixed.chosen, fixed.chosen_spans),
                ("rejected", fixed.rejected, fixed.rejected_spans),
            ):
                data = dict(row.data, **{side: text})
                ids = policy.encode_response(Row(row.source, row.line, data, row.unit), e["prompt_ids"], side)
                e[f"{side}_ids"] = ids
                e[f"{side}_changed"] = changed_tokens(policy.tokenizer, text, spans, ids)
            self.train_examples.append(e)

    def setup(self) -> None:
        """Nothing to precompute: the reference is scored on every batch."""

    def _weights(
        self, examples: Sequence[dict[str, Any]], width: int, corrupted: bool = False
    ) -> torch.Tensor:
        """Token weights aligned with the shifted per-token log-probs ([2B, width − 1], chosen first; with
        `corrupted`, [3B, ...]: the corrupted-image copies of the chosen responses last)."""
        sides = [("chosen", 0), ("rejected", len(examples))] + (
            [("chosen", 2 * len(examples))] if corrupted else []
        )
        changed = torch.zeros(len(sides) * len(examples), width)
        for side, offset in sides:
            for b, e in enumerate(examples):
                start = len(e["prompt_ids"])
                flags = e[f"{side}_changed"]
                changed[offset + b, start : start + len(flags)] = torch.tensor(flags, dtype=torch.float)
        return P.dense_token_weights(changed[:, 1:], self.config.gamma)

    def loss(self, examples: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, n = self.config, len(examples)
        seqs = [(e["prompt_ids"], e["chosen_ids"], e["pixel_values"]) for e in examples]
        seqs += [(e["prompt_ids"], e["rejected_ids"], e["pixel_values"]) for e in examples]
        seqs += self.terms.corrupted_sequences(examples)
        batch = self.policy.collate(seqs)
        lp = self.policy.sequence_logprobs(batch)
        width = batch["input_ids"].shape[1]
        weights = self._weights(examples, width, self.terms.conditional).to(lp.token_logps)
        scores = _scores(lp, weights, cfg.length_normalize)
        with torch.no_grad(), self.policy.reference():
            ref = _scores(self.policy.sequence_logprobs(batch), weights, cfg.length_normalize)
        ratios = scores - ref
        h_w, h_l = ratios[:n], ratios[n : 2 * n]
        losses = P.dpo_loss(h_w, h_l, cfg.beta)
        extra, image_metrics = self.terms.losses(h_w, ratios[2 * n :] if self.terms.conditional else None)
        losses = losses + extra
        if cfg.sft_weight:
            losses = losses + nll_term(lp, n, cfg.sft_weight)
        metrics = P.preference_metrics(cfg.beta * h_w.detach(), cfg.beta * h_l.detach())
        metrics.update(image_metrics)
        metrics["logps/chosen"] = scores[:n].detach().mean()
        metrics["logps/rejected"] = scores[n : 2 * n].detach().mean()
        return losses, metrics

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
