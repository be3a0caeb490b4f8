"""Offline preference optimisation (DPO and its variants) for any policy that scores pairs of outputs.

The policy supplies per-token log-probs of chosen and rejected outputs in one concatenated batch (chosen
first); this module reduces them to sequence scores, takes the reference's in a no-grad pass (or from a
precomputed cache) and hands them to the loss that `mmalign.objectives.preference.PREFERENCE_LOSSES` names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmalign.core.data import Row
from mmalign.objectives import preference as P
from mmalign.objectives.sequence import sequence_logps
from mmalign.objectives.supervised import nll_loss
from mmalign.train.algorithm import AlgorithmBase

TRL_LOSS_TYPES: dict[str, tuple[str, bool]] = {
    "sigmoid": ("dpo", False),
    "sigmoid_norm": ("dpo", True),
    "ipo": ("ipo", True),
    "hinge": ("hinge", False),
    "robust": ("robust", False),
    "bco_pair": ("bco_pair", False),
    "sppo_hard": ("sppo_hard", False),
    "nca_pair": ("nca_pair", False),
    "apo_zero": ("apo_zero", False),
    "apo_down": ("apo_down", False),
    "exo_pair": ("exo_pair", False),
    "aot": ("aot", False),
    "aot_unpaired": ("aot_unpaired", False),
    "discopop": ("discopop", False),
}
"""trl 1.16 DPOTrainer `loss_type` → (mmalign `loss`, whether trl divides the log-ratios by their length)."""

_TRL_ONLY = {
    "sft": "trl's loss_type 'sft' alone is mmalign's algorithm sft; beside a preference loss ([sigmoid, sft] with "
    "loss_weights [1, α]) it is algorithm.rpo_alpha: α",
}
_TRL_RENAMED = {
    "f_divergence_type": "algorithm.divergence with loss fdpo (reverse_kl, forward_kl, js, alpha; trl's "
    "js_divergence is js, alpha_divergence is alpha)",
    "f_alpha_divergence_coef": "algorithm.alpha with loss fdpo and divergence alpha; it follows the f-DPO paper, "
    "so trl 1.16's coefficient c is alpha = 1 - c",
    "precompute_ref_log_probs": "algorithm.precompute_reference",
}
# None means "this loss's default"; a value given for a loss that does not read it is an error.
_PER_LOSS = ("alpha", "label_smoothing", "tau")


@dataclass
class PreferenceConfig:
    """The `algorithm:` section of a preference recipe.

    loss: any name of `PREFERENCE_LOSSES` (default dpo): dpo (label_smoothing>0 is cDPO) · ipo · hinge (SLiC) ·
    robust (rDPO, label_smoothing = flip rate) · bco_pair · sppo_hard · nca_pair · apo_zero · apo_down ·
    exo_pair (label_smoothing, default 1e-3) · aot · aot_unpaired (label_smoothing) · discopop (tau, default
    0.05) · rdpo (alpha: length penalty) · odpo (alpha, offset_transform; score_chosen/score_rejected on the
    rows) · fdpo (divergence, alpha default 0.5) · dpop (lam) · beta_dpo (alpha) · mallows · orpo (lam) ·
    simpo (gamma) · cpo (lam) · rainbow (rainbow_shape, length_normalize, ref_mix_alpha, gamma, mallows,
    label_smoothing composed). alpha, label_smoothing and tau are None until a loss that reads them gives them
    its default; rdpo, odpo and beta_dpo have no default alpha; a value given for a loss that does not read it is
    an error.

    rpo_alpha: RPO's anchor (Pang et al., 2024, "Iterative Reasoning Preference Optimization", Eq. (1)): the
    loss plus α times the negative log-likelihood of the chosen response, averaged over its tokens,

        ℓ = ℓ_pref + α · (−Σ_t log π(y_w,t | x, y_w,<t) / |y_w|)

    per pair (the paper also counts the prompt's tokens in |·|; only response tokens are trained on here, as in
    trl). trl (its old `rpo_alpha`, now `loss_type: [sigmoid, sft]` with `loss_weights: [1, α]`) averages the NLL
    over all chosen tokens of a device batch instead of per pair: the two agree when chosen responses have equal
    lengths; per pair keeps the loss independent of how a batch is split over processes and accumulation steps.
    Sequence policies only (a diffusion policy's log-probability is not a likelihood); not with orpo or cpo,
    whose `lam` already weights an NLL term.

    trl 1.16's names: `loss_type` (sigmoid, sigmoid_norm, ipo, hinge and trl's other names, which equal
    mmalign's; sigmoid_norm and ipo also set length_normalize, as trl normalises them; a list of one of them and
    'sft' with `loss_weights` [1, α] is rpo_alpha α) and `discopop_tau`; f_divergence_type,
    f_alpha_divergence_coef and precompute_ref_log_probs are errors naming mmalign's key.

    Speed options, each giving the losses and gradients of the plain path (tests/test_dpo_fast.py):
    precompute_reference scores every pair under the frozen reference once before training and frees the copy
    (trl's precompute_ref_log_probs); share_prompt runs each pair as one sequence, prompt + chosen + rejected, the
    rejected tokens attending to the prompt but not the chosen ones, so the prompt is computed once, not twice;
    padding_free packs every sequence of a micro-batch into one row, position ids restarting per sequence, with
    an attention mask that keeps sequences apart (no padding tokens, but attention over the whole row: faster
    only where padding outweighs that, e.g. very unequal lengths). Both packing options need a token-only
    sequence policy (model.kind causal_lm) with attn_implementation sdpa or eager.
    """

    name: str = "preference"
    loss: str | None = None
    beta: float = 0.1
    label_smoothing: float | None = None
    length_normalize: bool = False
    alpha: float | None = None
    gamma: float = 0.0
    lam: float = 1.0
    divergence: str = "reverse_kl"
    offset_transform: str = "log1p"
    rainbow_shape: str = "sigmoid"
    ref_mix_alpha: float = 1.0
    mallows: bool = False
    tau: float | None = None
    precompute_reference: bool = False
    share_prompt: bool = False
    padding_free: bool = False
    rpo_alpha: float | None = None
    loss_type: str | list[str] | None = None
    loss_weights: list[float] | None = None
    discopop_tau: float | None = None
    f_divergence_type: str | None = None
    f_alpha_divergence_coef: float | None = None
    precompute_ref_log_probs: bool | None = None

    def __post_init__(self) -> None:
        self._take_trl_names()
        entry = P.PREFERENCE_LOSSES.get(self.loss_name)
        if entry is None:
            known = ", ".join(P.PREFERENCE_LOSSES)
            raise ValueError(f"algorithm.loss must be one of {known}; got {self.loss!r}")
        for key in _PER_LOSS:
            value = getattr(self, key)
            if key not in entry.reads and value not in (None, 0):
                raise ValueError(f"algorithm.{key} is not read by loss {self.loss!r}; got {value!r}")
            if value is None and key in entry.defaults:
                setattr(self, key, entry.defaults[key])
        P.check_loss_params(self.loss_name, self, where="algorithm.")
        if self.rpo_alpha is not None:
            if not (math.isfinite(self.rpo_alpha) and self.rpo_alpha >= 0):
                raise ValueError(f"algorithm.rpo_alpha must be >= 0, got {self.rpo_alpha}")
            if self.loss in ("orpo", "cpo") and self.rpo_alpha:
                raise ValueError(
                    f"algorithm.rpo_alpha: loss {self.loss!r} already has an NLL term on the chosen response "
                    "(weighted by algorithm.lam)"
                )

    def _take_trl_names(self) -> None:
        """Fold trl's spellings into mmalign's keys, or say which mmalign key to use."""
        for key, ours in _TRL_RENAMED.items():
            if getattr(self, key) is not None:
                raise ValueError(f"algorithm.{key} is trl's key; mmalign's is {ours}")
        if self.discopop_tau is not None:
            if self.tau is not None and self.tau != self.discopop_tau:
                raise ValueError(
                    f"algorithm.discopop_tau ({self.discopop_tau}) and algorithm.tau ({self.tau}) disagree"
                )
            self.tau = self.discopop_tau
        self._take_trl_loss_list()
        if self.loss_type is not None:
            if self.loss_type in _TRL_ONLY:
                raise ValueError(f"algorithm.loss_type: {_TRL_ONLY[self.loss_type]}")
            if self.loss_type not in TRL_LOSS_TYPES:
                raise ValueError(
                    f"algorithm.loss_type must be one of trl's loss types {', '.join(TRL_LOSS_TYPES)}; got "
                    f"{self.loss_type!r} (mmalign's own names go in algorithm.loss: "
                    f"{', '.join(P.PREFERENCE_LOSSES)})"
                )
            loss, normalized = TRL_LOSS_TYPES[self.loss_type]
            if self.loss is not None and self.loss != loss:
                raise ValueError(
                    f"algorithm.loss_type {self.loss_type!r} (trl's name for loss {loss!r}) disagrees with "
                    f"algorithm.loss {self.loss!r}; give one of them (algorithm.name sets algorithm.loss unless "
                    "it is 'preference')"
                )
            self.loss = loss
            self.length_normalize = self.length_normalize or normalized
        self.loss = self.loss or "dpo"

    @property
    def loss_name(self) -> str:
        """`loss` as __post_init__ resolves it (from trl's names, else "dpo"): always set on a built config."""
        if self.loss is None:
            raise ValueError("algorithm.loss is unset (PreferenceConfig.__post_init__ sets it)")
        return self.loss

    def _take_trl_loss_list(self) -> None:
        """trl's `loss_type: [<loss>, sft]` with `loss_weights: [1, α]` is `<loss>` with `rpo_alpha: α`."""
        if not isinstance(self.loss_type, list):
            if self.loss_weights is not None:
                raise ValueError(
                    "algorithm.loss_weights goes with a list algorithm.loss_type (trl's combination)"
                )
            return
        types = list(self.loss_type)
        weights = [1.0] * len(types) if self.loss_weights is None else [float(w) for w in self.loss_weights]
        if len(weights) != len(types):
            raise ValueError(
                f"algorithm.loss_weights has {len(weights)} weights for {len(types)} loss types {types}"
            )
        others = [(t, w) for t, w in zip(types, weights, strict=True) if t != "sft"]
        if len(others) != 1 or len(types) - len(others) > 1:
            raise ValueError(
                f"algorithm.loss_type {types}: mmalign combines one preference loss with trl's 'sft' term (which is "
                "algorithm.rpo_alpha); other combinations are not supported"
            )
        (loss_type, weight), alpha = others[0], dict(zip(types, weights, strict=True)).get("sft")
        if weight != 1.0:
            raise ValueError(
                f"algorithm.loss_weights: the weight of {loss_type!r} must be 1 (scale the sft term instead: its "
                f"weight is algorithm.rpo_alpha); got {weight}"
            )
        if alpha is not None:
            if self.rpo_alpha is not None and self.rpo_alpha != alpha:
                raise ValueError(
                    f"algorithm.loss_weights gives the sft term {alpha} but algorithm.rpo_alpha is {self.rpo_alpha}"
                )
            self.rpo_alpha = alpha
        self.loss_type, self.loss_weights = loss_type, None


class PreferenceAlgorithm(AlgorithmBase):
    """Pairs in, per-pair losses out; works for every policy kind that implements `sequence_logprobs`."""

    online = False

    def __init__(self, policy: Any, rows: Sequence[Row], config: PreferenceConfig):
        self.policy, self.config = policy, config
        self.entry = P.PREFERENCE_LOSSES[config.loss_name]
        self.packed = config.share_prompt or config.padding_free
        if self.packed and not hasattr(policy, "collate_pairs_packed"):
            key = "share_prompt" if config.share_prompt else "padding_free"
            raise ValueError(f"algorithm.{key} packs token sequences; {type(policy).__name__} does not")
        if self.entry.needs_score_diff and any("score_chosen" not in r.data for r in rows):
            missing = next(r for r in rows if "score_chosen" not in r.data)
            raise missing.error(
                "score_chosen", f"{config.loss} needs score_chosen and score_rejected on every row"
            )
        self.train_examples = []
        for i, row in enumerate(rows):
            example = policy.encode_pair(row)
            example["index"] = i
            if self.entry.needs_score_diff:
                example["score_diff"] = float(row.data["score_chosen"]) - float(row.data["score_rejected"])
            self.train_examples.append(example)
        self.needs_reference = self.entry.needs_reference
        self.needs_entropy = self.entry.entropies_needed(config)
        self.loss_state = self.entry.state(config) if self.entry.state else None
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
        size = (
            8 if self.config.padding_free else 64
        )  # a packed row's mask grows with the square of its length
        for start in range(0, len(self.train_examples), size):
            chunk = self.train_examples[start : start + size]
            ref_c, ref_r, _ = self._reference_scores(self._collate(chunk), len(chunk))
            for e, c, r in zip(chunk, ref_c.tolist(), ref_r.tolist(), strict=True):
                cache[e["index"]] = (c, r)
        self._ref_cache = cache
        if hasattr(self.policy, "release_reference"):
            self.policy.release_reference()

    def _collate(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The policy's batch of the pairs: padded, or packed as share_prompt / padding_free ask."""
        if self.packed:
            cfg = self.config
            return self.policy.collate_pairs_packed(
                examples, share_prompt=cfg.share_prompt, padding_free=cfg.padding_free
            )
        return self.policy.collate_pairs(examples)

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
        ref = None
        if self.needs_reference and self._ref_cache is not None:
            cached = torch.tensor([self._ref_cache[e["index"]] for e in examples])
            ref = (cached[:, 0], cached[:, 1])
        score_diff = [e["score_diff"] for e in examples] if self.entry.needs_score_diff else None
        return self.batch_loss(self._collate(examples), len(examples), ref, score_diff)

    def batch_loss(
        self,
        batch: dict[str, Any],
        n: int,
        reference_scores: tuple[torch.Tensor, torch.Tensor] | None = None,
        score_diff: Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses of `n` collated pairs (chosen first); `reference_scores` (chosen, rejected) when they
        were computed beforehand, else the reference is scored on this batch."""
        cfg = self.config
        lp = self.policy.sequence_logprobs(batch)
        chosen, rejected = lp.split(n)
        sc = sequence_logps(chosen.token_logps, chosen.mask)
        sr = sequence_logps(rejected.token_logps, rejected.mask)
        ref_sc = ref_sr = ref_lp = None
        if self.needs_reference and reference_scores is not None:
            ref_sc, ref_sr = (r.to(device=sc.device, dtype=sc.dtype) for r in reference_scores)
        elif self.needs_reference:
            ref_sc, ref_sr, ref_lp = self._reference_scores(batch, n)
        scores = P.PairScores(
            chosen_logps=sc,
            rejected_logps=sr,
            chosen_lengths=chosen.lengths,
            rejected_lengths=rejected.lengths,
            ref_chosen_logps=ref_sc,
            ref_rejected_logps=ref_sr,
            score_diff=None
            if score_diff is None
            else torch.tensor(score_diff, device=sc.device, dtype=sc.dtype),
            **(self._entropies(ref_lp, n) if self.needs_entropy else {}),
            gather=self._gathered,
        )
        losses, metrics = self.entry.fn(scores, cfg, self.loss_state)
        if cfg.rpo_alpha:
            nll = nll_loss(chosen.token_logps, chosen.mask)
            losses = losses + cfg.rpo_alpha * nll
            metrics["nll/chosen"] = nll.detach().mean()
        beta = metrics["beta"].item() if "beta" in metrics else cfg.beta  # β-DPO's batch β
        lc, lr = scores.logratios(cfg.length_normalize)
        metrics.update(P.preference_metrics(beta * lc.detach(), beta * lr.detach()))
        metrics["logps/chosen"] = sc.detach().mean()
        metrics["logps/rejected"] = sr.detach().mean()
        return losses, metrics

    def _entropies(self, ref_lp, n: int) -> dict[str, Any]:
        """Reference entropies of both responses of each pair side by side, for the Mallows dispersion."""
        rc, rr = ref_lp.split(n)
        return {
            "ref_entropies": torch.cat([rc.entropies, rr.entropies], dim=-1),
            "entropy_mask": torch.cat([rc.mask, rr.mask], dim=-1),
            "vocab_size": self.policy.vocab_size,
        }

    def _gathered(self, values: torch.Tensor) -> torch.Tensor:
        """All processes' values, so batch statistics (β-DPO, BCO) agree across ranks."""
        from accelerate.state import PartialState

        if PartialState().num_processes == 1:
            return values
        from accelerate.utils import gather

        return gather(values)

    # ------------------------------------------------------------------------------------ resumable
    def state_dict(self) -> dict[str, Any]:
        return {"loss_state": self.loss_state.state_dict()} if self.loss_state else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("loss_state", state.get("beta_controller"))  # beta_controller: before the registry
        if self.loss_state and saved is not None:
            self.loss_state.load_state_dict(saved)
