"""Online policy-gradient losses and KL penalties.

``logprobs`` are log π_θ of sampled actions: shape [B] for one action per sample (a whole sequence, a diffusion
step), or [B, T] per token with a [B, T] ``mask``. Losses are per-sample, shape [B], without reduction.

Advantage estimators live in `mmalign.objectives.advantages`; the names imported from there are kept for callers
that reach them through this module.
"""

import torch
from torch import Tensor

from mmalign.objectives.advantages import PerPromptStatTracker as PerPromptStatTracker
from mmalign.objectives.advantages import clip_advantages as clip_advantages
from mmalign.objectives.advantages import group_normalized_advantages as group_normalized_advantages
from mmalign.objectives.advantages import remax_advantages as remax_advantages
from mmalign.objectives.advantages import rloo_advantages as rloo_advantages

_KL_ESTIMATORS = ("k1", "k3")


def _masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim=dim) / mask.sum(dim=dim).clamp(min=1.0)


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    clip_range: float,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Take several gradient steps on one batch of samples without moving the policy too far from the sampler.

    PPO-clip (Schulman et al., 2017, Eq. (7); seed 004 §4.1.1), ρ = π_θ/π_old, per action:

        ℓ = max(−A · ρ, −A · clip(ρ, 1 − ε, 1 + ε))

    With per-token inputs the per-sample loss is the mean of ℓ over the sample's masked tokens (0 if none);
    [B] advantages are broadcast over tokens. Metrics are detached masked means over the batch:
    clip_fraction = mean[|ρ − 1| > ε], approx_kl = mean[(ρ − 1) − log ρ] (k3 estimate of KL(π_old‖π_θ)),
    ratio_mean = mean[ρ].
    """
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if logprobs.dim() == 1:
        logprobs, old_logprobs = logprobs.unsqueeze(-1), old_logprobs.unsqueeze(-1)
        mask = None if mask is None else mask.unsqueeze(-1)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    mask = torch.ones_like(logprobs) if mask is None else mask.to(logprobs.dtype)

    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    losses = _masked_mean(torch.maximum(unclipped, clipped), mask, dim=-1)

    with torch.no_grad():
        metrics = {
            "clip_fraction": _masked_mean(((ratio - 1.0).abs() > clip_range).to(ratio.dtype), mask),
            "approx_kl": _masked_mean((ratio - 1.0) - log_ratio, mask),
            "ratio_mean": _masked_mean(ratio, mask),
        }
    return losses, metrics


def reinforce_loss(logprobs: Tensor, advantages: Tensor, mask: Tensor | None = None) -> Tensor:
    """The plain score-function estimator, for on-policy updates with an external baseline (RLOO, ReMax, GRPO).

    REINFORCE (Williams, 1992; seed 004 §4.1.2 Eqs. (9)-(11)):

        ℓ = −A · log π_θ(y|x),   log π_θ(y|x) = Σ_t m_t log π_θ(y_t|x, y_<t) for per-token inputs

    The sequence is one action, so per-token log-probs are summed (not averaged) over the mask.
    """
    if logprobs.dim() == 2:
        weights = torch.ones_like(logprobs) if mask is None else mask.to(logprobs.dtype)
        logprobs = (logprobs * weights).sum(dim=-1)
    return -advantages * logprobs


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-sample estimate of KL(π_θ‖π_ref) for the KL-regularised RLHF objective, from actions sampled by π_θ.

    Seed 004 §4.1 Eq. (8) (β_reg · KL term), estimators of Schulman (2020), r = π_ref/π_θ:

        k1 = −log r = log π_θ − log π_ref          (unbiased, can be negative)
        k3 = (r − 1) − log r                        (unbiased, always ≥ 0)
    """
    if estimator not in _KL_ESTIMATORS:
        raise ValueError(
            f"estimator must be one of {', '.join(map(repr, _KL_ESTIMATORS))}; got {estimator!r}"
        )
    if estimator == "k1":
        return logprobs - ref_logprobs
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r
