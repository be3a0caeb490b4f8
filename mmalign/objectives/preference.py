"""Offline preference-optimisation losses (DPO family) on sequence-level log-probabilities.

Conventions shared by every function of this module:

* ``*_logratios`` are log π_θ(y|x) − log π_ref(y|x) per sequence, shape [B]; h = chosen − rejected.
* ``*_logps`` are log π_θ(y|x) per sequence (summed over tokens), ``*_mean_logps`` the same divided by |y|.
* Every loss returns per-sample losses of shape [B] without reduction; the trainer averages.

``PREFERENCE_LOSSES`` (at the end) looks every pairwise loss up by name, with what the trainer must supply for it.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, TypeGuard, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
_F_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")
_ODPO_TRANSFORMS = ("identity", "log1p")
_LOG_HALF = -math.log(2.0)
_T = TypeVar("_T")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")


def _sigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    offset: Tensor | float | None = None,
) -> Tensor:
    """Learn from pairwise preferences without a reward model or RL, via the policy's implicit reward.

    DPO (Rafailov et al., 2023; seed 004 §5.1 Eq. (40), seed 001 §3.3.3 Eq. (10)), with h the difference of
    log-ratios and Δ the optional offset:

        ℓ = −(1 − ε) log σ(βh − Δ) − ε log σ(−(βh − Δ))

    ε > 0 is conservative DPO (cDPO, Mitchell, 2023; seed 001 Eq. (12)): labels flipped with probability ε.
    Δ is ODPO's offset Δ_r (Amini et al., 2024; seed 004 §5.1.5 Eq. (52), see ``odpo_offset``) or the
    R-DPO/LR-DPO length term α(|y_l| − |y_w|) (Park et al., 2024; see ``length_offset`` for why its sign is
    the opposite of seed 004 Eq. (56)).

    trl 1.16's ``loss_type="sigmoid"`` has no label smoothing (trl reads ``label_smoothing`` only in its
    robust, exo_pair and aot losses); ε here is cDPO's, as in trl before 1.0.
    """
    _check_positive("beta", beta)
    _check_label_smoothing(label_smoothing)
    logits = beta * (chosen_logratios - rejected_logratios)
    if offset is not None:
        logits = logits - offset
    return _sigmoid_loss(logits, label_smoothing)


def ipo_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """Regress the log-ratio margin onto a finite target so deterministic preferences cannot push it to ∞.

    IPO (Azar et al., 2024; seed 001 §3.3.6 Eq. (17)):

        ℓ = (h − 1/(2β))²

    Seed 004 §5.1.1 Eq. (44) writes the same objective as (βh − 1/2)² = β²(h − 1/(2β))²: both have the same
    minimiser; this form keeps the gradient scale of the original paper and of the seed-001 equation.

    h is whatever log-ratios the caller passes. trl 1.16's ``loss_type="ipo"`` always divides each log-ratio by
    its token count (per-token means; trl says the IPO authors confirmed this form); mmalign's trainer passes
    summed log-ratios unless ``length_normalize`` is set, so trl's IPO is ``loss: ipo`` with
    ``length_normalize: true`` (which trl's name ``loss_type: ipo`` selects).
    """
    _check_positive("beta", beta)
    return (chosen_logratios - rejected_logratios - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """Stop pushing pairs whose scaled margin already exceeds 1, the SLiC-style calibration loss.

    SLiC-HF (Zhao et al., 2023) in the normalised form of RSO (Liu et al., 2023); seed 004 §5.1.2 Table 11
    (f(x) = max(0, 1 − x)) and §5.3 Eq. (67):

        ℓ = max(0, 1 − βh)
    """
    _check_positive("beta", beta)
    return F.relu(1.0 - beta * (chosen_logratios - rejected_logratios))


def length_offset(chosen_lengths: Tensor, rejected_lengths: Tensor, alpha: float) -> Tensor:
    """Penalise the implicit reward by response length so DPO cannot win by verbosity; pass as ``offset``.

    R-DPO / LR-DPO (Park et al., 2024) come from the length-penalised objective (seed 004 §5.1.7 Eq. (55),
    seed 001 §3.8.1 Eq. (44)):

        max_π E_{y~π}[r(x, y) − α|y|] − β KL(π ‖ π_ref)

    Its optimum is π*(y|x) ∝ π_ref(y|x) exp((r(x, y) − α|y|)/β), so r = β log π*/π_ref + α|y| + β log Z(x), and
    the Bradley–Terry likelihood of r gives ℓ = −log σ(βh + α(|y_w| − |y_l|)). As ``dpo_loss`` subtracts its
    offset, the offset is

        Δ = α(|y_l| − |y_w|)

    Seed 004 Eq. (56) and seed 001 Eq. (46) print the opposite sign, −log σ(βh − α(|y_w| − |y_l|)) (seed 001's
    Eq. (45) already writes r = β log π/π_ref + β log Z − α|y|): that loss is minimised by π ∝ π_ref
    exp((r + α|y|)/β), which rewards length instead of penalising it. This follows the objective.
    """
    return alpha * (rejected_lengths - chosen_lengths)


def odpo_offset(
    score_chosen: Tensor, score_rejected: Tensor, alpha: float, transform: str = "log1p"
) -> Tensor:
    """Require a larger margin for pairs whose responses differ more in quality; pass as ``offset``.

    ODPO (Amini et al., 2024; seed 004 §5.1.5 Eq. (51)), with f monotonically increasing:

        Δ_r = α · f(score(x, y_w) − score(x, y_l))
        f = identity:  f(d) = d
        f = log1p:     f(d) = log(1 + max(d, 0))
    """
    _check_choice("transform", transform, _ODPO_TRANSFORMS)
    diff = score_chosen - score_rejected
    if transform == "log1p":
        diff = torch.log1p(diff.clamp(min=0))
    return alpha * diff


def _f_prime(logratios: Tensor, divergence: str, alpha: float) -> Tensor:
    if divergence == "reverse_kl":  # f(u) = u log u
        return logratios + 1.0
    if divergence == "forward_kl":  # f(u) = −log u
        return -torch.exp(-logratios)
    if divergence == "js":  # f(u) = u log u − (u + 1) log((u + 1)/2);  log(2u/(1+u)) = log 2 + log σ(log u)
        return math.log(2.0) + F.logsigmoid(logratios)
    # alpha: f(u) = (u^{1−α} − (1 − α)u − α)/(α(α − 1));  (1 − u^{−α})/α = −expm1(−α log u)/α
    return -torch.expm1(-alpha * logratios) / alpha


def fdpo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    beta: float,
    divergence: str = "reverse_kl",
    alpha: float = 0.5,
) -> Tensor:
    """Regularise towards π_ref with an f-divergence other than reverse KL to trade reward for diversity.

    f-DPO (Wang et al., 2024; seed 004 §5.1.3 Eq. (49), seed 001 §3.12 Eqs. (63)-(67)), u = π_θ/π_ref:

        ℓ = −log σ(β f'(u_w) − β f'(u_l))

        reverse_kl  f'(u) = log u + 1          (recovers DPO)
        forward_kl  f'(u) = −1/u
        js          f'(u) = log(2u / (1 + u))
        alpha       f'(u) = (1 − u^{−α}) / α    (α = 1 equals forward_kl; α → 0 tends to reverse_kl)

    Every f'(u) is evaluated from log u without forming u. α follows the f-DPO paper's α-divergence
    f(u) = (u^{1−α} − (1 − α)u − α)/(α(α − 1)), as trl did before 1.0. trl 1.16's ``f_alpha_divergence_coef``
    c enters as f'(u) = (u^{c−1} − 1)/(c − 1), which is this α = 1 − c (the two agree at the default 0.5);
    trl 1.16 also writes forward KL as f'(u) = 1 − 1/u, a constant shift that cancels in the difference.
    """
    _check_positive("beta", beta)
    _check_choice("divergence", divergence, _F_DIVERGENCES)
    if divergence == "alpha":
        _check_positive("alpha", alpha)
    chosen = _f_prime(chosen_logratios, divergence, alpha)
    rejected = _f_prime(rejected_logratios, divergence, alpha)
    return -F.logsigmoid(beta * (chosen - rejected))


def dpop_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, lam: float) -> Tensor:
    """Stop DPO from lowering the chosen likelihood below the reference, which it does on small-edit pairs.

    DPO-Positive (Pal et al., 2024):

        ℓ = −log σ(β(h − λ · max(0, log π_ref(y_w|x) − log π_θ(y_w|x))))

    Seed 001 §3.3.4 Eq. (13) prints the penalty outside the sigmoid; this follows the original paper, where it
    sits inside and is scaled by β.
    """
    _check_positive("beta", beta)
    _check_non_negative("lam", lam)
    penalty = torch.clamp(-chosen_logratios, min=0)
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios - lam * penalty))


def kto_loss(
    logratios: Tensor,
    desirable: Tensor,
    kl_estimate: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """Learn from unpaired good/bad labels with a prospect-theory value around a KL reference point.

    KTO (Ethayarajh et al., 2024; seed 004 §5.1.4 Eq. (50), seed 001 §3.6.1 Eqs. (32)-(34)), r = log-ratio:

        ℓ = λ_D (1 − σ(β(r − z)))   if y is desirable
        ℓ = λ_U (1 − σ(β(z − r)))   if y is undesirable

    z is the reference point of the seed's z_ref = β·KL divided by β, i.e. the estimate returned by
    ``kto_kl_estimate``; it carries no gradient.
    """
    _check_positive("beta", beta)
    _check_non_negative("desirable_weight", desirable_weight)
    _check_non_negative("undesirable_weight", undesirable_weight)
    z = kl_estimate.detach()
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - z)))
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (z - logratios)))
    return torch.where(desirable.to(torch.bool), desirable_losses, undesirable_losses)


def kto_kl_estimate(
    mismatched_logratios: Tensor, mean_over_processes: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Estimate KTO's reference point z from log-ratios of responses paired with unrelated prompts.

    Seed 001 §3.6.1 Eq. (33) (without its β, which ``kto_loss`` applies):

        z = max(0, mean_{i≠j} log π_θ(y_j|x_i) − log π_ref(y_j|x_i)),   detached

    The clamp applies to the mean over the whole batch: with several processes, pass ``mean_over_processes``
    (a scalar's average over processes); it averages this process's mean before the clamp, as trl does.
    Clamping each process's mean first would bias z upwards (means +2 and −5 would give 1 instead of 0).
    """
    mean = mismatched_logratios.detach().mean()
    if mean_over_processes is not None:
        mean = mean_over_processes(mean)
    return mean.clamp(min=0)


def log_odds(logps: Tensor) -> Tensor:
    """Map a log-probability to log-odds without cancellation near p = 1, for ORPO's odds ratio.

        log odds(p) = log p − log(1 − p)

    log(1 − p) uses log(−expm1(log p)) for p > 1/2 and log1p(−exp(log p)) otherwise (Mächler, 2012); log p is
    clamped just below 0 so p = 1 stays finite.
    """
    logps = logps.clamp(max=-torch.finfo(logps.dtype).tiny)
    log_one_minus_p = torch.where(
        logps > _LOG_HALF,
        torch.log(-torch.expm1(logps.clamp(min=_LOG_HALF))),
        torch.log1p(-torch.exp(logps.clamp(max=_LOG_HALF))),
    )
    return logps - log_one_minus_p


def orpo_loss(chosen_mean_logps: Tensor, rejected_mean_logps: Tensor, lam: float) -> Tensor:
    """Merge SFT and preference alignment in one reference-free stage by contrasting odds, not likelihoods.

    ORPO (Hong et al., 2024; seed 004 §5.1.9 Eq. (58), seed 001 §3.7.1 Eqs. (40)-(42)), with
    p_θ(y|x) = exp(mean token log-prob):

        ℓ = −log p_θ(y_w|x) − λ log σ(log odds(p_θ(y_w|x)) − log odds(p_θ(y_l|x)))

    The NLL term here is per pair, the mean token log-prob of the chosen response, so the trainer's batch mean
    weighs every pair equally. trl 1.16's ORPOTrainer pools it instead: one cross-entropy over all tokens of the
    chosen sequences of the batch, prompt tokens included, so long pairs weigh more (its λ is called ``beta``).
    """
    _check_non_negative("lam", lam)
    log_odds_ratio = log_odds(chosen_mean_logps) - log_odds(rejected_mean_logps)
    return -chosen_mean_logps - lam * F.logsigmoid(log_odds_ratio)


def simpo_loss(chosen_mean_logps: Tensor, rejected_mean_logps: Tensor, beta: float, gamma: float) -> Tensor:
    """Drop the reference model and use the length-normalised likelihood as reward, with a target margin γ.

    SimPO (Meng et al., 2024; seed 004 §5.1.10 Eq. (59), seed 001 §3.8.2 Eq. (47)):

        ℓ = −log σ(β/|y_w| · log π_θ(y_w|x) − β/|y_l| · log π_θ(y_l|x) − γ)
    """
    _check_positive("beta", beta)
    return -F.logsigmoid(beta * (chosen_mean_logps - rejected_mean_logps) - gamma)


def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    beta: float,
    lam: float = 1.0,
    chosen_nll: Tensor | None = None,
) -> Tensor:
    """Reference-free DPO (uniform π_ref) plus an NLL term that keeps the policy on the preferred data.

    CPO (Xu et al., 2024; seed 004 §5.1.8 Eq. (57), seed 001 §3.10.3 Eq. (54)):

        ℓ = −log σ(β log π_θ(y_w|x) − β log π_θ(y_l|x)) + λ · NLL(y_w),  NLL(y_w) = −log π_θ(y_w|x) by default

    Pass ``chosen_nll`` to use another NLL normalisation (e.g. the token mean). mmalign's trainer passes summed
    log-probs (token means with ``length_normalize``), so the NLL is per pair. trl 1.16's CPOTrainer pools it:
    one cross-entropy averaged over all chosen response tokens of the batch (weight ``cpo_alpha``, default 1),
    while its sigmoid term uses summed log-probs as here.
    """
    _check_positive("beta", beta)
    _check_non_negative("lam", lam)
    if chosen_nll is None:
        chosen_nll = -chosen_logps
    return -F.logsigmoid(beta * (chosen_logps - rejected_logps)) + lam * chosen_nll


def mallows_dispersion(ref_token_entropies: Tensor, mask: Tensor, vocab_size: int) -> Tensor:
    """Estimate the per-prompt preference dispersion φ(x) of Mallows-DPO from the reference model's entropy.

    Mallows-DPO (Chen et al., 2024; seed 004 §5.1.6 Eq. (54)), with n the vocabulary size:

        φ(x) = −log( H̄ / log n ),   H̄ = mean over the counted positions of H_π_ref(Y_{i+1} | x, y_{≤i})

    Expected input: row b holds the reference model's next-token predictive entropies (in nats, of the full
    softmax at each response position) of BOTH responses of pair b, concatenated along the last dimension as
    [H(y_w) ; H(y_l)], with ``mask`` selecting the response positions. The masked mean is the per-token form
    of the seed's ½ Σ_i [H(·|y_i^w) + H(·|y_i^l)]: for |y_w| = |y_l| it is that sum divided by the length.
    Per-token normalisation is what makes H̄/log n ∈ [0, 1], hence φ ≥ 0 and "φ close to 0 when dispersion is
    high" as the seed states; the sum over N − 1 positions would exceed log n and flip the sign of the loss.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    weights = mask.to(ref_token_entropies.dtype)
    mean_entropy = (ref_token_entropies * weights).sum(dim=-1) / weights.sum(dim=-1).clamp(min=1.0)
    tiny = torch.finfo(mean_entropy.dtype).tiny
    normalized = (mean_entropy / math.log(vocab_size)).clamp(min=tiny, max=1.0)
    return -torch.log(normalized)


def mallows_dpo_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, dispersion: Tensor
) -> Tensor:
    """Weight each prompt's DPO margin by its preference dispersion: low dispersion, stronger alignment.

    Mallows-DPO (Chen et al., 2024; seed 004 §5.1.6 Eq. (53)), φ(x) from ``mallows_dispersion``:

        ℓ = −log σ(φ(x) · βh)
    """
    _check_positive("beta", beta)
    return -F.logsigmoid(dispersion * beta * (chosen_logratios - rejected_logratios))


def robust_dpo_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float
) -> Tensor:
    """Correct DPO for labels flipped at a known rate ε, so the expected loss is the clean one (cDPO only damps).

    rDPO (Chowdhury et al., 2024, arXiv:2403.00409, §3), with ℓ(z) = −log σ(z) the DPO loss at z = βh:

        ℓ̂ = ((1 − ε) ℓ(z) − ε ℓ(−z)) / (1 − 2ε)

    If a label is flipped with probability ε, the mean of ℓ̂ over the flip is ℓ(z): (1 − ε)ℓ̂(z) + εℓ̂(−z) = ℓ(z).
    ε ∈ [0, 1/2); ε = 0 is DPO. Same as trl 1.16's ``loss_type="robust"``.
    """
    _check_positive("beta", beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for rDPO, got {label_smoothing}")
    logits = beta * (chosen_logratios - rejected_logratios)
    clean, flipped = -F.logsigmoid(logits), -F.logsigmoid(-logits)
    return ((1.0 - label_smoothing) * clean - label_smoothing * flipped) / (1.0 - 2.0 * label_smoothing)


def bco_pair_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, delta: float | Tensor = 0.0
) -> Tensor:
    """Train the implicit reward as a binary classifier, chosen → 1 and rejected → 0, around a reward shift δ.

    BCO (Jung et al., 2024, arXiv:2404.04656), paired form, with r = β · log-ratio:

        ℓ = −log σ(r_w − δ) − log σ(−(r_l − δ))

    The summed binary cross-entropies bound the DPO loss from above; the paper's reward shift δ, the running mean
    of the rewards (``BCORewardShift``), tightens the bound. trl 1.16's ``loss_type="bco_pair"`` is this loss
    with δ = 0 (trl before 1.0 kept the running mean).
    """
    _check_positive("beta", beta)
    return -F.logsigmoid(beta * chosen_logratios - delta) - F.logsigmoid(-(beta * rejected_logratios - delta))


def sppo_hard_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """Regress each response's log-ratio onto its win probability, so the chosen log-ratio rises (not only h).

    SPPO (Wu et al., 2024; seed 004 §4.4.2 Algorithm 2 step 6, seed 001 §3.11.2 Eq. (61)) minimises
    (log π_θ(y|x)/π_t(y|x) − η(P̂(y ≻ π_t|x) − 1/2))², where η/2 stands for log Z. With π_t = π_ref, η = 1/β and
    the hard win probabilities P̂ = 1 for y_w and 0 for y_l (trl's ``loss_type="sppo_hard"``), r = log-ratio:

        ℓ = (r_w − 1/(2β))² + (r_l + 1/(2β))²
    """
    _check_positive("beta", beta)
    half_eta = 0.5 / beta
    return (chosen_logratios - half_eta) ** 2 + (rejected_logratios + half_eta) ** 2


def nca_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """Optimise each response's own likelihood ratio, not only their margin, so the chosen one cannot fall.

    NCA (Chen et al., 2024, arXiv:2402.05369, §4), noise-contrastive alignment on a pair (K = 2, the winner's
    target 1), with r = β · log-ratio:

        ℓ = −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l)

    Same as trl 1.16's ``loss_type="nca_pair"``.
    """
    _check_positive("beta", beta)
    r_w, r_l = beta * chosen_logratios, beta * rejected_logratios
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


def apo_zero_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """Raise the chosen and lower the rejected likelihood, anchored at π_ref: for winners better than the model.

    APO-zero (D'Oosterlinck et al., 2024, arXiv:2408.06266, Eq. (7)), r = log-ratio:

        ℓ = (1 − σ(βr_w)) + σ(βr_l)
    """
    _check_positive("beta", beta)
    return (1.0 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)


def apo_down_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """Lower both likelihoods, the rejected one more: for winners worse than the model's own outputs.

    APO-down (D'Oosterlinck et al., 2024, arXiv:2408.06266, Eq. (8)), r = log-ratio, h = r_w − r_l:

        ℓ = σ(βr_w) + (1 − σ(βh))
    """
    _check_positive("beta", beta)
    margin = chosen_logratios - rejected_logratios
    return torch.sigmoid(beta * chosen_logratios) + (1.0 - torch.sigmoid(beta * margin))


def exo_pair_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float = 1e-3
) -> Tensor:
    """Fit the policy's pair distribution to the labels by reverse KL, which is mode-seeking (DPO's is forward).

    EXO (Ji et al., 2024, arXiv:2402.00856, Eq. (16)) with K = 2: the policy's distribution over the pair is
    q = softmax(βr_w, βr_l) = (σ(βh), σ(−βh)) and the labels' is p = (1 − ε, ε), so

        ℓ = KL(q ‖ p) = σ(βh)(log σ(βh) − log(1 − ε)) + σ(−βh)(log σ(−βh) − log ε)

    ε ∈ (0, 1/2) (log ε must be finite); the paper recommends 1e-3. Same as trl 1.16's ``loss_type="exo_pair"``.
    """
    _check_positive("beta", beta)
    if not 0.0 < label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in (0, 0.5) for EXO, got {label_smoothing}")
    logits = beta * (chosen_logratios - rejected_logratios)
    log_q_w, log_q_l = F.logsigmoid(logits), F.logsigmoid(-logits)
    return torch.exp(log_q_w) * (log_q_w - math.log1p(-label_smoothing)) + torch.exp(log_q_l) * (
        log_q_l - math.log(label_smoothing)
    )


def aot_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Make the policy's distribution of margins dominate the reference's over the batch, not pair by pair.

    AOT, paired (Melnyk et al., 2024, arXiv:2406.05882): with ρ = log π(y_w|x) − log π(y_l|x) under the policy
    (ρ_θ) and the reference (ρ_ref), each sorted over the batch, and (k) the k-th smallest, the optimal transport
    between the two empirical distributions pairs equal quantiles; with z_k = β(ρ_θ,(k) − ρ_ref,(k)):

        ℓ_k = −(1 − ε) log σ(z_k) − ε log σ(−z_k)

    Returns one loss per quantile k, not per pair, so per-pair weights do not apply. Same as trl 1.16's
    ``loss_type="aot"``.
    """
    _check_positive("beta", beta)
    _check_label_smoothing(label_smoothing)
    policy_margins = torch.sort(chosen_logps - rejected_logps, dim=0).values
    ref_margins = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0).values
    return _sigmoid_loss(beta * (policy_margins - ref_margins), label_smoothing)


def aot_unpaired_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float = 0.0
) -> Tensor:
    """Make the distribution of chosen log-ratios dominate that of rejected ones, for data without pairing.

    AOT, unpaired (Melnyk et al., 2024, arXiv:2406.05882): r_w and r_l are sorted separately over the batch and
    matched quantile by quantile, z_k = β(r_w,(k) − r_l,(k)):

        ℓ_k = −(1 − ε) log σ(z_k) − ε log σ(−z_k)

    One loss per quantile, not per pair. Same as trl 1.16's ``loss_type="aot_unpaired"``.
    """
    _check_positive("beta", beta)
    _check_label_smoothing(label_smoothing)
    chosen = torch.sort(chosen_logratios, dim=0).values
    rejected = torch.sort(rejected_logratios, dim=0).values
    return _sigmoid_loss(beta * (chosen - rejected), label_smoothing)


def discopop_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, tau: float = 0.05
) -> Tensor:
    """Blend the logistic (DPO) and exponential losses by the margin, the loss found by LLM-driven discovery.

    DiscoPOP / log-ratio modulated loss (Lu et al., 2024, arXiv:2406.08414, Eq. (5)), with ρ = βh:

        ℓ = (1 − σ(ρ/τ)) · (−log σ(ρ)) + σ(ρ/τ) · exp(−ρ)

    The paper's τ is 0.05. The loss is not convex: at ρ = 0 its gradient lowers the margin, towards a local
    minimum near ρ ≈ −0.1 (τ = 0.05), and raises it only past a bump near ρ ≈ 0.07; a policy that starts at
    π_ref first moves there. The second term is evaluated as exp(log σ(ρ/τ) − ρ), which stays finite for very
    negative ρ when τ < 1 (trl 1.16's ``loss_type="discopop"`` forms exp(−ρ) first, which overflows to inf and
    gives inf · 0 = nan there).
    """
    _check_positive("beta", beta)
    _check_positive("tau", tau)
    logits = beta * (chosen_logratios - rejected_logratios)
    modulation = torch.sigmoid(logits / tau)
    logistic = -F.logsigmoid(logits)
    exponential = torch.exp(F.logsigmoid(logits / tau) - logits)
    return (1.0 - modulation) * logistic + exponential


class BetaDPOController:
    """Adapt DPO's β per batch to the quality of its pairs: larger β for pairs with larger reward gaps.

    β-DPO (Wu et al., 2024; seed 001 §3.3.5 Eq. (14)), with M_i the reward margins of the batch:

        β_batch = max(β_min, β0 · (1 + α(mean_i M_i − M0)))
        M0 ← m · M0 + (1 − m) · mean_i M_i

    β_batch uses M0 from before the update. M0 starts at ``m0`` = 0, the margin of π_θ = π_ref. The update is
    deterministic given the margins: pass margins gathered from all processes so every rank gets the same β.
    """

    def __init__(
        self, beta0: float, alpha: float, momentum: float = 0.9, min_beta: float = 1e-3, m0: float = 0.0
    ) -> None:
        _check_positive("beta0", beta0)
        _check_non_negative("alpha", alpha)
        _check_positive("min_beta", min_beta)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.beta0 = beta0
        self.alpha = alpha
        self.momentum = momentum
        self.min_beta = min_beta
        self.m0 = float(m0)

    def beta(self, margins: Tensor) -> float:
        batch_margin = margins.detach().double().mean().item()
        beta = max(self.min_beta, self.beta0 * (1.0 + self.alpha * (batch_margin - self.m0)))
        self.m0 = self.momentum * self.m0 + (1.0 - self.momentum) * batch_margin
        return beta

    def state_dict(self) -> dict[str, float]:
        return {"m0": self.m0}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.m0 = float(state["m0"])


class BCORewardShift:
    """BCO's reward shift δ: the running mean of the batches' mean rewards, kept across steps and resumes.

    Each update takes the mean rewards of the current batch, one value per process (gathered), and returns

        δ = mean of every batch mean seen so far, the current ones included

    as BCO (Jung et al., 2024) and trl before 1.0 (``RunningMoments`` on the batch mean) define it. δ starts at 0.
    """

    def __init__(self) -> None:
        self.delta = 0.0
        self.count = 0

    def update(self, batch_means: Tensor) -> float:
        values = batch_means.detach().double().flatten()
        self.count += values.numel()
        self.delta += (values.sum().item() - values.numel() * self.delta) / self.count
        return self.delta

    def state_dict(self) -> dict[str, float]:
        return {"delta": self.delta, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.delta = float(state["delta"])
        self.count = int(state["count"])


def _shaped_loss(logits: Tensor, beta: float, loss_type: str, label_smoothing: float) -> Tensor:
    if loss_type == "sigmoid":
        return _sigmoid_loss(logits, label_smoothing)
    if loss_type == "ipo":
        return ((logits - 0.5) / beta) ** 2
    return F.relu(1.0 - logits)


def composed_preference_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    length_normalize: bool = False,
    ref_mix_alpha: float = 1.0,
    gamma: float = 0.0,
    dispersion: Tensor | None = None,
    offset: Tensor | float | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Combine the orthogonal DPO improvements (length normalisation, reference mixing, scaling) in one loss.

    RainbowPO (Zhao et al., 2024; seed 004 §5.1.11 Eqs. (60)-(62)):

        ℓ = f(φ(x) · (β/|y_w|^η · log π_θ(y_w|x)/π_α(y_w|x) − β/|y_l|^η · log π_θ(y_l|x)/π_α(y_l|x) − Δ))

    with η = 1 if ``length_normalize``, φ = ``dispersion`` (1 if None), Δ = ``offset`` (0 if None). The mixed
    reference π_α ∝ π_ref^α · π_γ^{1−α} (Eq. (61)) enters only through its length-normalised log-ratio, and
    π_γ is defined (Eq. (62)) by log π_γ(y_w)/|y_w| − log π_γ(y_l)/|y_l| = γ. The normaliser of π_α depends
    on x only and is dropped (it cancels exactly when η = 0 or |y_w| = |y_l|), so with ℓ(y) = log π(y|x)/|y|^η
    the margin is

        β · [ℓ_θ(y_w) − ℓ_θ(y_l) − α(ℓ_ref(y_w) − ℓ_ref(y_l)) − (1 − α)γ].

    Because Eq. (62) fixes π_γ only after length normalisation, ``ref_mix_alpha`` < 1 requires
    ``length_normalize``. γ is in log-probability units: SimPO's margin is β·γ (``simpo_loss(gamma=β·γ)``).
    Loss shapes f (seed 004 Table 11), z the scaled margin above:
        sigmoid  −(1 − ε) log σ(z) − ε log σ(−z)     (DPO / cDPO; Mallows-DPO with φ; SimPO with α = 0, η = 1)
        ipo      ((z − 1/2)/β)²                     (equals ``ipo_loss``: Eq. (44) divided by β²; Table 11's
                                                     (z − 1)² is the same loss at β/2, times 4)
        hinge    max(0, 1 − z)                      (equals ``hinge_loss``)
    """
    _check_positive("beta", beta)
    _check_choice("loss_type", loss_type, _LOSS_TYPES)
    _check_label_smoothing(label_smoothing)
    if label_smoothing > 0 and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing > 0 requires loss_type='sigmoid', got loss_type={loss_type!r}")
    if not 0.0 <= ref_mix_alpha <= 1.0:
        raise ValueError(f"ref_mix_alpha must be in [0, 1], got {ref_mix_alpha}")
    if ref_mix_alpha < 1.0 and not length_normalize:
        raise ValueError("ref_mix_alpha < 1 requires length_normalize=True (π_γ is defined per token)")

    chosen_norm = chosen_lengths.to(chosen_logps.dtype) if length_normalize else 1.0
    rejected_norm = rejected_lengths.to(rejected_logps.dtype) if length_normalize else 1.0
    policy_margin = chosen_logps / chosen_norm - rejected_logps / rejected_norm
    ref_margin = ref_chosen_logps / chosen_norm - ref_rejected_logps / rejected_norm
    margin = policy_margin - ref_mix_alpha * ref_margin - (1.0 - ref_mix_alpha) * gamma

    logits = beta * margin
    if offset is not None:
        logits = logits - offset
    if dispersion is not None:
        logits = dispersion * logits
    return _shaped_loss(logits, beta, loss_type, label_smoothing)


def preference_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    """Summarise implicit rewards (e.g. β · log-ratio) of a batch for logging; all values are detached means.

    Keys and values, with r_w, r_l the chosen and rejected rewards:

        rewards/accuracy = mean[r_w > r_l]      rewards/margin = mean[r_w − r_l]
        rewards/chosen = mean[r_w]              rewards/rejected = mean[r_l]
    """
    chosen = chosen_rewards.detach()
    rejected = rejected_rewards.detach()
    return {
        "rewards/accuracy": (chosen > rejected).to(chosen.dtype).mean(),
        "rewards/margin": (chosen - rejected).mean(),
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
    }


def povid_loss(
    chosen_logratios: Tensor,
    text_rejected_logratios: Tensor,
    noisy_rejected_logratios: Tensor,
    alpha: float,
    beta1: float,
    beta2: float,
    noisy_mask: Tensor | None = None,
) -> Tensor:
    """Push the preferred response up against two kinds of dispreferred ones at once (text and image side).

    POVID (Zhou et al., 2024; seed 004 §5.2.2), with h = log π_θ/π_ref of the ground-truth response y_w, the
    hallucination-injected response y_l^t and the response y_l^n the model gave for a noised image:

        ℓ = −log σ(α h(y_w) − (β₁ h(y_l^t) + β₂ h(y_l^n)))

    ``noisy_mask`` (0/1 per sample) drops the noisy term for samples that have no noisy-image response.
    """
    _check_non_negative("alpha", alpha)
    _check_non_negative("beta1", beta1)
    _check_non_negative("beta2", beta2)
    if alpha == 0 and beta1 == 0 and beta2 == 0:
        raise ValueError("alpha, beta1 and beta2 are all 0; the POVID loss would be constant")
    noisy = beta2 * noisy_rejected_logratios
    if noisy_mask is not None:
        noisy = noisy * noisy_mask.to(noisy.dtype)
    return -F.logsigmoid(alpha * chosen_logratios - (beta1 * text_rejected_logratios + noisy))


def dense_token_weights(changed: Tensor, gamma: float) -> Tensor:
    """Token weights of RLHF-V's dense DPO: γ on tokens of corrected segments, 1 elsewhere.

    RLHF-V (Yu et al., 2024; seed 004 §4.1.1 names it, the weights are from the original paper): pass the result
    as ``weights`` to ``mmalign.objectives.sequence.sequence_logps`` (``normalize=True`` gives the paper's
    score 1/N · [Σ_{y_u} log π + γ Σ_{y_c} log π], N = |y_u| + γ|y_c|) for policy AND reference, then use
    ``dpo_loss`` on the resulting log-ratios.
    """
    _check_non_negative("gamma", gamma)
    changed = changed if changed.is_floating_point() else changed.float()
    return 1.0 + (gamma - 1.0) * changed


def conditional_image_loss(
    chosen_logratios: Tensor, corrupted_chosen_logratios: Tensor, beta: float
) -> Tensor:
    """Make the preferred response depend on the image: prefer it under the real image over a corrupted one.

    mDPO's conditional preference (Wang et al., 2024, "mDPO: Conditional Preference Optimization for Multimodal
    LLMs", Eq. 2), with h(y_w | m) = log π_θ(y_w | m, q) − log π_ref(y_w | m, q) for the real image m_w and the
    corrupted image m_l (same question q, same response y_w):

        ℓ_CoPO = −log σ(β h(y_w | m_w) − β h(y_w | m_l))
    """
    _check_positive("beta", beta)
    return -F.logsigmoid(beta * (chosen_logratios - corrupted_chosen_logratios))


def reward_anchor_loss(chosen_logratios: Tensor, beta: float, delta: float = 0.0) -> Tensor:
    """Keep the preferred response's implicit reward above δ, so preference training cannot lower its likelihood.

    mDPO's anchored preference (Wang et al., 2024, Eq. 3): ℓ_AnchPO = −log σ(β h(y_w) − δ), δ = 0 in the paper.
    """
    _check_positive("beta", beta)
    return -F.logsigmoid(beta * chosen_logratios - delta)


def mdpo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    corrupted_chosen_logratios: Tensor,
    beta: float,
    delta: float = 0.0,
    conditional_weight: float = 1.0,
    anchor_weight: float = 1.0,
) -> Tensor:
    """mDPO (Wang et al., 2024, Eq. 4): ℓ = ℓ_DPO + ℓ_CoPO + ℓ_AnchPO, all with the same β.

    The weights (1 and 1 in the paper) scale the conditional and anchor terms; 0 drops one (the paper's ablations).
    """
    _check_non_negative("conditional_weight", conditional_weight)
    _check_non_negative("anchor_weight", anchor_weight)
    return (
        dpo_loss(chosen_logratios, rejected_logratios, beta)
        + conditional_weight * conditional_image_loss(chosen_logratios, corrupted_chosen_logratios, beta)
        + anchor_weight * reward_anchor_loss(chosen_logratios, beta, delta)
    )


# ------------------------------------------------------------------------------------------------ registry


class LossParams(Protocol):
    """Hyper-parameters a registered loss may read; ``mmalign.train.preference.PreferenceConfig`` has them all."""

    beta: float
    label_smoothing: float | None
    length_normalize: bool
    alpha: float | None
    gamma: float
    lam: float
    divergence: str
    offset_transform: str
    rainbow_shape: str
    ref_mix_alpha: float
    mallows: bool
    tau: float | None


def _this_process_only(values: Tensor) -> Tensor:
    return values


def _per_token(logps: Tensor, lengths: Tensor, length_normalize: bool) -> Tensor:
    return logps / lengths if length_normalize else logps


@dataclass(frozen=True)
class PairScores:
    """What a registered loss may read about a batch of B preference pairs; the trainer fills what it needs."""

    chosen_logps: Tensor  # log π_θ(y_w|x), summed over the response tokens, [B]
    rejected_logps: Tensor  # log π_θ(y_l|x), [B]
    chosen_lengths: Tensor  # |y_w| in tokens, [B]
    rejected_lengths: Tensor  # |y_l|, [B]
    ref_chosen_logps: Tensor | None = None  # log π_ref(y_w|x), [B]; None when the loss needs no reference
    ref_rejected_logps: Tensor | None = None
    score_diff: Tensor | None = None  # score(x, y_w) − score(x, y_l) given with the pairs (ODPO), [B]
    # reference next-token entropies of y_w and y_l side by side, [B, T_w + T_l] (Mallows)
    ref_entropies: Tensor | None = None
    entropy_mask: Tensor | None = None  # 1 on the response positions of ref_entropies
    vocab_size: int | None = None
    gather: Callable[[Tensor], Tensor] = _this_process_only  # every process's values, for batch statistics

    def logratios(self, length_normalize: bool = False) -> tuple[Tensor, Tensor]:
        """(chosen, rejected) log π_θ/π_ref, or log π_θ without a reference; divided by |y| if asked."""
        chosen, rejected = self.chosen_logps, self.rejected_logps
        if self.ref_chosen_logps is not None and self.ref_rejected_logps is not None:
            chosen, rejected = chosen - self.ref_chosen_logps, rejected - self.ref_rejected_logps
        return (
            _per_token(chosen, self.chosen_lengths, length_normalize),
            _per_token(rejected, self.rejected_lengths, length_normalize),
        )

    def dispersion(self) -> Tensor:
        """Mallows-DPO's φ(x) from the reference entropies (``mallows_dispersion``)."""
        if self.ref_entropies is None or self.entropy_mask is None or self.vocab_size is None:
            raise ValueError("Mallows dispersion needs ref_entropies, entropy_mask and vocab_size")
        return mallows_dispersion(self.ref_entropies, self.entropy_mask, self.vocab_size)


LossOutput = tuple[Tensor, dict[str, Tensor]]


@dataclass(frozen=True)
class PreferenceLoss:
    """A preference loss looked up by name: its function and what the trainer must give it.

    ``fn(scores, params, state)`` returns per-sample losses [B] and extra metrics. ``reads`` names the parameters
    it reads besides ``beta`` and ``length_normalize``; those left unset (None) take ``defaults``, and ``check``
    raises ValueError naming ``where + field`` for a value out of range.
    """

    fn: Callable[[PairScores, LossParams, Any], LossOutput]
    reads: tuple[str, ...] = ()
    defaults: Mapping[str, float] = field(default_factory=dict)
    check: Callable[[LossParams, str], None] | None = None
    needs_reference: bool = True
    needs_entropies: bool = False  # reference token entropies, for the Mallows dispersion
    needs_score_diff: bool = False  # a score per response in every row (ODPO)
    needs_lengths: bool = False  # response lengths in tokens (length offsets and length-normalised scores)
    # builds the loss's running state (β-DPO, BCO) from the params
    state: Callable[[LossParams], Any] | None = None
    per_pair: bool = True  # False: one loss per batch quantile (AOT sorts), so per-pair weights do not apply

    def entropies_needed(self, params: LossParams) -> bool:
        """Whether the trainer must ask the reference for token entropies under these parameters."""
        return self.needs_entropies or ("mallows" in self.reads and bool(params.mallows))


def _need(ok: bool, where: str, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{where}{name} must be {rule}, got {value!r}")


def _finite(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _given(value: _T | None, name: str) -> _T:
    """``value`` of a parameter or score a loss reads, which the trainer fills (check_loss_params, defaults)."""
    if value is None:
        raise ValueError(f"{name} is required by this loss and was not given")
    return value


def _check_smoothing(p: LossParams, where: str) -> None:
    smoothing = p.label_smoothing
    _need(_finite(smoothing) and 0.0 <= smoothing <= 0.5, where, "label_smoothing", "in [0, 0.5]", smoothing)


def _check_robust(p: LossParams, where: str) -> None:
    smoothing = p.label_smoothing
    rule = "in [0, 0.5) for robust (1 − 2ε divides)"
    _need(_finite(smoothing) and 0.0 <= smoothing < 0.5, where, "label_smoothing", rule, smoothing)


def _check_exo(p: LossParams, where: str) -> None:
    smoothing = p.label_smoothing
    rule = "in (0, 0.5) for exo_pair (log ε enters)"
    _need(_finite(smoothing) and 0.0 < smoothing < 0.5, where, "label_smoothing", rule, smoothing)


def _check_alpha_positive(p: LossParams, where: str) -> None:
    _need(_finite(p.alpha) and p.alpha > 0, where, "alpha", "> 0 (0 would be plain DPO)", p.alpha)


def _check_odpo(p: LossParams, where: str) -> None:
    _check_alpha_positive(p, where)
    _need(
        p.offset_transform in _ODPO_TRANSFORMS,
        where,
        "offset_transform",
        f"one of {_ODPO_TRANSFORMS}",
        p.offset_transform,
    )


def _check_fdpo(p: LossParams, where: str) -> None:
    _need(p.divergence in _F_DIVERGENCES, where, "divergence", f"one of {_F_DIVERGENCES}", p.divergence)
    if p.divergence == "alpha":
        _need(_finite(p.alpha) and p.alpha > 0, where, "alpha", "> 0 for divergence 'alpha'", p.alpha)


def _check_lam(p: LossParams, where: str) -> None:
    _need(_finite(p.lam) and p.lam >= 0, where, "lam", ">= 0", p.lam)


def _check_gamma(p: LossParams, where: str) -> None:
    _need(_finite(p.gamma), where, "gamma", "a finite number", p.gamma)


def _check_tau(p: LossParams, where: str) -> None:
    _need(_finite(p.tau) and p.tau > 0, where, "tau", "> 0", p.tau)


def _check_rainbow(p: LossParams, where: str) -> None:
    _need(p.rainbow_shape in _LOSS_TYPES, where, "rainbow_shape", f"one of {_LOSS_TYPES}", p.rainbow_shape)
    _check_smoothing(p, where)
    _need(
        p.label_smoothing == 0 or p.rainbow_shape == "sigmoid",
        where,
        "label_smoothing",
        "0 unless rainbow_shape is 'sigmoid'",
        p.label_smoothing,
    )
    _check_gamma(p, where)
    _need(
        _finite(p.ref_mix_alpha) and 0.0 <= p.ref_mix_alpha <= 1.0,
        where,
        "ref_mix_alpha",
        "in [0, 1]",
        p.ref_mix_alpha,
    )
    _need(
        p.ref_mix_alpha == 1.0 or p.length_normalize,
        where,
        "ref_mix_alpha",
        "1 unless length_normalize is true (π_γ is defined per token)",
        p.ref_mix_alpha,
    )


def check_loss_params(name: str, params: LossParams, where: str = "") -> None:
    """Raise ValueError naming ``where + field`` if loss ``name`` cannot run with ``params`` (unset or out of range)."""
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"{where}loss must be one of {', '.join(PREFERENCE_LOSSES)}; got {name!r}")
    entry = PREFERENCE_LOSSES[name]
    _need(_finite(params.beta) and params.beta > 0, where, "beta", "> 0", params.beta)
    for key in entry.reads:
        if getattr(params, key) is None:
            raise ValueError(f"{where}{key} is required for loss {name!r}")
    if entry.check is not None:
        entry.check(params, where)


def _dpo(s: PairScores, p: LossParams, _: Any) -> LossOutput:
    lc, lr = s.logratios(p.length_normalize)
    return dpo_loss(lc, lr, p.beta, label_smoothing=_given(p.label_smoothing, "label_smoothing")), {}


def _ipo(s: PairScores, p: LossParams, _: Any) -> LossOutput:
    return ipo_loss(*s.logratios(p.length_normalize), p.beta), {}


def _hinge(s: PairScores, p: LossParams, _: Any) -> LossOutput:
    return hinge_loss(*s.logratios(p.length_normalize), p.beta), {}


def _robust(s: PairScores, p: LossParams, _: Any) -> LossOutput:
    smoothing = _given(p.label_smoothing, "label_smoothing")
    return robust_dpo_loss(*s.logratios(p.length_normalize), p.beta, smoothing), {}


def _bco_pair(s: PairScores, p: LossParams, shift: BCORewardShift) -> LossOutput:
    lc, lr = s.logratios(p.length_normalize)
    batch_mean = (p.beta * torch.cat([lc, lr]).detach()).mean().reshape(1)
    delta = shift.update(s.gather(batch_mean))
    return bco_pair_loss(lc, lr, p.beta, delta), {"delta": torch.tensor(delta, dtype=torch.float64)}


def _sppo_hard(s: PairScores, p: LossParams, _: Any) -> LossOutput:
    return sppo_hard_loss(*s.logratios(p.length_normalize), p.beta), {}


def _nca_pair(s: PairScores, p: LossParams, _: Any) -> LossOutput:
    return nca_pair_loss(*s.logratios(p.length_normalize), p.beta), {}


def _apo_zero(s: PairScores, p: LossParams, _: Any) -> LossOutput:
    return apo_zero_loss(*s.logratios(p.length_normalize), p.beta), {}


def _apo_down(s: PairScores, p: LossParams, _: Any) -> LossOutput:
    return apo_down_loss(*s.logratios(p.length_normalize), p.beta), {}


def _exo_pair(s: PairScores, p: LossParams, _: Any) -> LossOutput:
    smoothing = _given(p.label_smoothing, "label_smoothing")
    return exo_pair_loss(*s.logratios(p.length_normalize), p.beta, smoothing), {}


def _aot(s: PairScores, p: LossParams, _: Any) -> LossOutput:
    n = p.length_normalize
    losses = aot_loss(
        _per_token(s.chosen_logps, s.chosen_lengths, n),
        _per_token(s.rejected_logps, s.rejected_lengths, n),
        _per_token(_given(s.ref_chosen_logps, "ref_chosen_logps"), s.chosen_lengths, n),
        _per_token(_given(s.ref_rejected_logps, "ref_rejected_logps"), s.rejected_lengths, n),
        p.beta,
        _given(p.label_smoothing, "label_smoothing"),
    )
    return losses, {}


def _aot_unpaired(s: PairScores, p: LossParams, _: Any) -> LossOutput:
    smoothing = _given(p.label_smoothing, "label_smoothing")
    return aot_unpaired_loss(*s.logratios(p.length_normalize), p.beta, smoothing), {}


def _discopop(s: PairScores, p: LossParams, _: Any) -> LossOutput:
    return discopop_loss(*s.logratios(p.length_normalize), p.beta, _given(p.tau, "tau")), {}


def _rdpo(s: PairScores, p: LossParams, _: Any) -> LossOutput:
    offset = length_offset(s.chosen_lengths, s.rejected_lengths, _given(p.alpha, "alpha"))
    return dpo_loss(*s.logratios(p.length_normalize), p.beta, offset=offset), {}


def _odpo(s: PairScores, p: LossParams, _: Any) -> LossOutput:
    score_diff = _given(s.score_diff, "score_diff")
    alpha = _given(p.alpha, "alpha")
    offset = odpo_offset(score_diff, torch.zeros_like(score_diff), alpha, transform=p.offset_transform)
    return dpo_loss(*s.logratios(p.length_normalize), p.beta, offset=offset), {}


def _fdpo(s: PairScores, p: LossParams, _: Any) -> LossOutput:
    lc, lr = s.logratios(p.length_normalize)
    return fdpo_loss(lc, lr, p.beta, divergence=p.divergence, alpha=_given(p.alpha, "alpha")), {}


def _dpop(s: PairScores, p: LossParams, _: Any) -> LossOutput:
    return dpop_loss(*s.logratios(p.length_normalize), p.beta, p.lam), {}


def _beta_dpo(s: PairScores, p: LossParams, controller: BetaDPOController) -> LossOutput:
    lc, lr = s.logratios(p.length_normalize)
    beta = controller.beta(s.gather((lc - lr).detach() * p.beta))
    return dpo_loss(lc, lr, beta), {"beta": torch.tensor(beta, dtype=torch.float64)}


def _mallows(s: PairScores, p: LossParams, _: Any) -> LossOutput:
    return mallows_dpo_loss(*s.logratios(p.length_normalize), p.beta, s.dispersion()), {}


def _orpo(s: PairScores, p: LossParams, _: Any) -> LossOutput:
    chosen, rejected = s.chosen_logps / s.chosen_lengths, s.rejected_logps / s.rejected_lengths
    return orpo_loss(chosen, rejected, p.lam), {}


def _simpo(s: PairScores, p: LossParams, _: Any) -> LossOutput:
    chosen, rejected = s.chosen_logps / s.chosen_lengths, s.rejected_logps / s.rejected_lengths
    return simpo_loss(chosen, rejected, p.beta, p.gamma), {}


def _cpo(s: PairScores, p: LossParams, _: Any) -> LossOutput:
    chosen = _per_token(s.chosen_logps, s.chosen_lengths, p.length_normalize)
    rejected = _per_token(s.rejected_logps, s.rejected_lengths, p.length_normalize)
    return cpo_loss(chosen, rejected, p.beta, lam=p.lam), {}


def _rainbow(s: PairScores, p: LossParams, _: Any) -> LossOutput:
    losses = composed_preference_loss(
        s.chosen_logps,
        s.rejected_logps,
        _given(s.ref_chosen_logps, "ref_chosen_logps"),
        _given(s.ref_rejected_logps, "ref_rejected_logps"),
        s.chosen_lengths,
        s.rejected_lengths,
        beta=p.beta,
        loss_type=p.rainbow_shape,
        length_normalize=p.length_normalize,
        ref_mix_alpha=p.ref_mix_alpha,
        gamma=p.gamma,
        dispersion=s.dispersion() if p.mallows else None,
        label_smoothing=_given(p.label_smoothing, "label_smoothing"),
    )
    return losses, {}


_SMOOTHING = {"label_smoothing": 0.0}

PREFERENCE_LOSSES: Mapping[str, PreferenceLoss] = MappingProxyType(
    {
        "dpo": PreferenceLoss(_dpo, ("label_smoothing",), _SMOOTHING, _check_smoothing),
        "ipo": PreferenceLoss(_ipo),
        "hinge": PreferenceLoss(_hinge),
        "robust": PreferenceLoss(_robust, ("label_smoothing",), _SMOOTHING, _check_robust),
        "bco_pair": PreferenceLoss(_bco_pair, state=lambda p: BCORewardShift()),
        "sppo_hard": PreferenceLoss(_sppo_hard),
        "nca_pair": PreferenceLoss(_nca_pair),
        "apo_zero": PreferenceLoss(_apo_zero),
        "apo_down": PreferenceLoss(_apo_down),
        "exo_pair": PreferenceLoss(_exo_pair, ("label_smoothing",), {"label_smoothing": 1e-3}, _check_exo),
        "aot": PreferenceLoss(_aot, ("label_smoothing",), _SMOOTHING, _check_smoothing, per_pair=False),
        "aot_unpaired": PreferenceLoss(
            _aot_unpaired, ("label_smoothing",), _SMOOTHING, _check_smoothing, per_pair=False
        ),
        "discopop": PreferenceLoss(_discopop, ("tau",), {"tau": 0.05}, _check_tau),
        "rdpo": PreferenceLoss(_rdpo, ("alpha",), check=_check_alpha_positive, needs_lengths=True),
        "odpo": PreferenceLoss(
            _odpo, ("alpha", "offset_transform"), check=_check_odpo, needs_score_diff=True
        ),
        "fdpo": PreferenceLoss(_fdpo, ("alpha", "divergence"), {"alpha": 0.5}, _check_fdpo),
        "dpop": PreferenceLoss(_dpop, ("lam",), check=_check_lam),
        "beta_dpo": PreferenceLoss(
            _beta_dpo,
            ("alpha",),
            check=_check_alpha_positive,
            state=lambda p: BetaDPOController(p.beta, _given(p.alpha, "alpha")),
        ),
        "mallows": PreferenceLoss(_mallows, needs_entropies=True),
        "orpo": PreferenceLoss(_orpo, ("lam",), check=_check_lam, needs_reference=False, needs_lengths=True),
        "simpo": PreferenceLoss(
            _simpo, ("gamma",), check=_check_gamma, needs_reference=False, needs_lengths=True
        ),
        "cpo": PreferenceLoss(_cpo, ("lam",), check=_check_lam, needs_reference=False),
        "rainbow": PreferenceLoss(
            _rainbow,
            ("rainbow_shape", "ref_mix_alpha", "gamma", "mallows", "label_smoothing"),
            _SMOOTHING,
            _check_rainbow,
        ),
    }
)
"""Every preference loss by name, the one list the config, the trainer and the algorithm registry read."""
