"""Reduction of per-token log-probabilities to per-sequence scores."""

import torch
from torch import Tensor


def sequence_logps(
    token_logps: Tensor,
    mask: Tensor,
    weights: Tensor | None = None,
    normalize: bool = False,
) -> Tensor:
    """Turn per-token log-probs into the sequence score log π(y|x) that sequence-level objectives consume.

    With m_t the mask and w_t the optional token weights (w_t = 1 when ``weights`` is None):

        score(y) = Σ_t w_t m_t log π(y_t | x, y_<t)                       (normalize=False)
        score(y) = Σ_t w_t m_t log π(y_t | x, y_<t) / Σ_t w_t m_t          (normalize=True)

    The unweighted sum is the autoregressive factorisation log π(y|x) = Σ_t log π(y_t|x, y_<t)
    (seed 004 §2.1.1, Eq. (1)); the unweighted mean is the length normalisation 1/|y| · log π(y|x) of
    SimPO/ORPO (seed 004 §5.1.9-5.1.10, Eqs. (58)-(59)).

    The weighted mean is the dense DPO score of RLHF-V (Yu et al., 2024), which seed 004 §4.1.1 only names
    ("dense direct preference optimization over the human feedback"); the formula is from the original paper:

        score(y) = 1/N · [Σ_{t ∈ y_u} log π(y_t|·) + γ Σ_{t ∈ y_c} log π(y_t|·)],   N = |y_u| + γ|y_c|

    where y_u are the unchanged tokens and y_c the tokens of the human-corrected segments. It is obtained with
    ``weights = 1 + (γ - 1) * changed`` and ``normalize=True``.

    Args:
        token_logps: [B, T] log-probabilities of the realised tokens.
        mask: [B, T] 1/True for response tokens that count, 0/False for prompt and padding.
        weights: optional [B, T] non-negative per-token weights.
        normalize: divide by the (weighted) number of counted tokens.

    Returns:
        [B] sequence scores. A row with no counted token scores 0.
    """
    token_weights = mask.to(token_logps.dtype)
    if weights is not None:
        token_weights = token_weights * weights.to(token_logps.dtype)
    total = (token_logps * token_weights).sum(dim=-1)
    if not normalize:
        return total
    return total / token_weights.sum(dim=-1).clamp(min=torch.finfo(token_logps.dtype).tiny)
