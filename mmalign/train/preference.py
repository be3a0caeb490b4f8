"""Offline preference optimisation (DPO and its variants) for any policy that scores pairs of outputs.

The policy supplies per-token log-probs of chosen and rejected outputs in one concatenated batch (chosen
first); this module reduces them to sequence scores, takes the reference's in a no-grad pass (or from a
precomputed cache) and hands tensors to a pure loss in `mmalign.objectives.preference`.
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

REFERENCE_FREE = {"orpo", "simpo", "cpo"}
LOSSES = (
    "dpo",
    "ipo",
    "hinge",
    "rdpo",
    "odpo",
    "fdpo",
    "dpop",
    "beta_dpo",
    "mallows",
    "orpo",
    "simpo",
    "cpo",
    "rainbow",
)


@dataclass
class PreferenceConfig:
    """The `algorithm:` section of a preference recipe; fields not used by `loss` are ignored by it.

    loss: dpo (sigmoid; label_smoothing>0 is cDPO) · ipo · hinge (SLiC) · rdpo (length offset α(|y_w|−|y_l|)) ·
    odpo (offset α·f(score_w − score_l) from the rows' score fields) · fdpo (divergence, alpha) · dpop (lam) ·
    beta_dpo (alpha) · mallows (dispersion from reference entropies) · orpo (lam) · simpo (gamma) · cpo (lam) ·
    rainbow (loss_type, length_normalize, ref_mix_alpha, gamma, mallows, label_smoothing composed).
    """

    name: str = "preference"
    loss: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    length_normalize: bool = False
    alpha: float = 0.0
    gamma: float = 0.0
    lam: float = 1.0
    divergence: str = "reverse_kl"
    offset_transform: str = "log1p"
    loss_type: str = "sigmoid"
    ref_mix_alpha: float = 1.0
    mallows: bool = False
    precompute_reference: bool = False

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"algorithm.loss must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        if self.loss == "beta_dpo" and self.alpha <= 0:
            raise ValueError("algorithm.alpha must be > 0 for beta_dpo (0 would be plain DPO)")


class PreferenceAlgorithm(AlgorithmBase):
    """Pairs in, per-pair losses out; works for every policy kind that implements `sequence_logprobs`."""

    online = False

    def __init__(self, policy: Any, rows: Sequence[Row], config: PreferenceConfig):
        self.policy, self.config = policy, config
        if config.loss == "odpo" and any("score_chosen" not in r.data for r in rows):
            missing = next(r for r in rows if "score_chosen" not in r.data)
            raise missing.error("score_chosen", "odpo needs score_chosen and score_rejected on every row")
        self.train_examples = []
        for i, row in enumerate(rows):
            example = policy.encode_pair(row)
            example["index"] = i
            if config.loss == "odpo":
                example["score_diff"] = float(row.data["score_chosen"]) - float(row.data["score_rejected"])
            self.train_examples.append(example)
        self.needs_reference = config.loss not in REFERENCE_FREE
        self.needs_entropy = config.loss == "mallows" or (config.loss == "rainbow" and config.mallows)
        self.beta_controller = (
            P.BetaDPOController(config.beta, config.alpha) if config.loss == "beta_dpo" else None
        )
        self._ref_cache: dict[int, tuple[float, float]] | None = None

    # ---------------------------------------------------------------------------------- reference
    def setup(self) -> None:
        """Precompute reference scores of every pair once, if asked, then drop the frozen copy."""
        if not (self.config.precompute_reference and self.needs_reference) or self.needs_entropy:
            return
        if not getattr(self.policy, "deterministic_scores", True):
            raise ValueError(
                "precompute_reference needs deterministic scores; this policy draws fresh noise every batch "
                "(diffusion), so its reference must be computed on the same draw"
            )
        cache = {}
        for start in range(0, len(self.train_examples), 64):
            chunk = self.train_examples[start : start + 64]
            ref_c, ref_r, _ = self._reference_scores(self.policy.collate_pairs(chunk), len(chunk))
            for e, c, r in zip(chunk, ref_c.tolist(), ref_r.tolist(), strict=True):
                cache[e["index"]] = (c, r)
        self._ref_cache = cache
        if hasattr(self.policy, "release_reference"):
            self.policy.release_reference()

    @torch.no_grad()
    def _reference_scores(self, batch: dict[str, torch.Tensor], n: int):
        """Reference scores on the very batch the policy saw (same tokens; for diffusion, same noise and t)."""
        with self.policy.reference():
            lp = self.policy.sequence_logprobs(batch, entropies=self.needs_entropy)
        chosen, rejected = lp.split(n)
        return (
            sequence_logps(chosen.token_logps, chosen.mask),
            sequence_logps(rejected.token_logps, rejected.mask),
            lp,
        )

    # ----------------------------------------------------------------------------------------- loss
    def loss(self, examples: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, n = self.config, len(examples)
        batch = self.policy.collate_pairs(examples)
        lp = self.policy.sequence_logprobs(batch)
        chosen, rejected = lp.split(n)
        cl, rl = chosen.lengths, rejected.lengths
        sc, sr = (
            sequence_logps(chosen.token_logps, chosen.mask),
            sequence_logps(rejected.token_logps, rejected.mask),
        )
        ref_lp = None
        if not self.needs_reference:
            ref_sc = ref_sr = torch.zeros_like(sc)
        elif self._ref_cache is not None:
            ref = torch.tensor(
                [self._ref_cache[e["index"]] for e in examples], device=sc.device, dtype=sc.dtype
            )
            ref_sc, ref_sr = ref[:, 0], ref[:, 1]
        else:
            ref_sc, ref_sr, ref_lp = self._reference_scores(batch, n)
        norm_c, norm_r = (cl, rl) if cfg.length_normalize else (1.0, 1.0)
        lc, lr = (sc - ref_sc) / norm_c, (sr - ref_sr) / norm_r  # (length-normalised) log-ratios
        beta = cfg.beta
        metrics: dict[str, torch.Tensor] = {}

        if cfg.loss == "dpo":
            losses = P.dpo_loss(lc, lr, beta, label_smoothing=cfg.label_smoothing)
        elif cfg.loss == "ipo":
            losses = P.ipo_loss(lc, lr, beta)
        elif cfg.loss == "hinge":
            losses = P.hinge_loss(lc, lr, beta)
        elif cfg.loss == "rdpo":
            losses = P.dpo_loss(lc, lr, beta, offset=P.length_offset(cl, rl, cfg.alpha))
        elif cfg.loss == "odpo":
            diff = torch.tensor([e["score_diff"] for e in examples], device=sc.device, dtype=sc.dtype)
            offset = P.odpo_offset(diff, torch.zeros_like(diff), cfg.alpha, transform=cfg.offset_transform)
            losses = P.dpo_loss(lc, lr, beta, offset=offset)
        elif cfg.loss == "fdpo":
            losses = P.fdpo_loss(lc, lr, beta, divergence=cfg.divergence, alpha=cfg.alpha or 0.5)
        elif cfg.loss == "dpop":
            losses = P.dpop_loss(lc, lr, beta, cfg.lam)
        elif cfg.loss == "beta_dpo":
            beta = self.beta_controller.beta(self._gathered((lc - lr).detach() * cfg.beta))
            losses = P.dpo_loss(lc, lr, beta)
            metrics["beta"] = torch.tensor(beta)
        elif cfg.loss == "mallows":
            losses = P.mallows_dpo_loss(lc, lr, beta, self._dispersion(ref_lp, n))
        elif cfg.loss == "orpo":
            losses = P.orpo_loss(sc / cl, sr / rl, cfg.lam)
        elif cfg.loss == "simpo":
            losses = P.simpo_loss(sc / cl, sr / rl, beta, cfg.gamma)
        elif cfg.loss == "cpo":
            losses = P.cpo_loss(sc / norm_c, sr / norm_r, beta, lam=cfg.lam)
        else:  # rainbow: the composition applies its own length normalisation to summed log-probs
            losses = P.composed_preference_loss(
                sc,
                sr,
                ref_sc,
                ref_sr,
                cl,
                rl,
                beta=beta,
                loss_type=cfg.loss_type,
                length_normalize=cfg.length_normalize,
                ref_mix_alpha=cfg.ref_mix_alpha,
                gamma=cfg.gamma,
                label_smoothing=cfg.label_smoothing,
                dispersion=self._dispersion(ref_lp, n) if cfg.mallows else None,
            )
        metrics.update(P.preference_metrics(beta * lc.detach(), beta * lr.detach()))
        metrics["logps/chosen"] = sc.detach().mean()
        metrics["logps/rejected"] = sr.detach().mean()
        return losses, metrics

    def _dispersion(self, ref_lp, n: int) -> torch.Tensor:
        """Mallows φ(x): reference entropies of both responses of each pair, side by side."""
        rc, rr = ref_lp.split(n)
        entropies = torch.cat([rc.entropies, rr.entropies], dim=-1)
        mask = torch.cat([rc.mask, rr.mask], dim=-1)
        vocab = self.policy.vocab_size
        return P.mallows_dispersion(entropies, mask, vocab)

    def _gathered(self, values: torch.Tensor) -> torch.Tensor:
        """All processes' values, so batch statistics (β-DPO) agree across ranks."""
        from accelerate.state import PartialState

        if PartialState().num_processes == 1:
            return values
        from accelerate.utils import gather

        return gather(values)

    # ------------------------------------------------------------------------------------ resumable
    def state_dict(self) -> dict[str, Any]:
        return {"beta_controller": self.beta_controller.state_dict()} if self.beta_controller else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.beta_controller and "beta_controller" in state:
            self.beta_controller.load_state_dict(state["beta_controller"])
