"""Pure loss functions on tensors: no models, modalities or I/O.

Every loss returns per-sample values (shape [B], no reduction); metrics helpers return detached tensors.
"""

from mmalign.objectives.policy_gradient import (
    PerPromptStatTracker,
    clip_advantages,
    group_normalized_advantages,
    kl_penalty,
    ppo_clip_loss,
    reinforce_loss,
    remax_advantages,
    rloo_advantages,
)
from mmalign.objectives.preference import (
    BetaDPOController,
    composed_preference_loss,
    cpo_loss,
    dpo_loss,
    dpop_loss,
    fdpo_loss,
    hinge_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
    length_offset,
    log_odds,
    mallows_dispersion,
    mallows_dpo_loss,
    odpo_offset,
    orpo_loss,
    preference_metrics,
    simpo_loss,
)
from mmalign.objectives.sequence import sequence_logps
from mmalign.objectives.supervised import best_of_n_indices, bradley_terry_loss, nll_loss

__all__ = [
    "BetaDPOController",
    "PerPromptStatTracker",
    "best_of_n_indices",
    "bradley_terry_loss",
    "clip_advantages",
    "composed_preference_loss",
    "cpo_loss",
    "dpo_loss",
    "dpop_loss",
    "fdpo_loss",
    "group_normalized_advantages",
    "hinge_loss",
    "ipo_loss",
    "kl_penalty",
    "kto_kl_estimate",
    "kto_loss",
    "length_offset",
    "log_odds",
    "mallows_dispersion",
    "mallows_dpo_loss",
    "nll_loss",
    "odpo_offset",
    "orpo_loss",
    "ppo_clip_loss",
    "preference_metrics",
    "reinforce_loss",
    "remax_advantages",
    "rloo_advantages",
    "sequence_logps",
    "simpo_loss",
]
