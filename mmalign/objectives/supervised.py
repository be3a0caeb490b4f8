"""Supervised objectives: SFT likelihood, reward-model training and best-of-n selection."""

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.objectives.sequence import sequence_logps


def nll_loss(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Supervised fine-tuning (and RAFT/ReST's filtered SFT) as per-sequence token-averaged likelihood.

    Negative log-likelihood of the factorised policy (seed 004 §2.1.1 Eq. (1)), per sequence:

        ℓ = −Σ_t m_t log π(y_t|x, y_<t) / Σ_t m_t     (0 for a sequence with no masked token)
    """
    return -sequence_logps(token_logps, mask, normalize=True)


def bradley_terry_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | float | None = None
) -> Tensor:
    """Train a scalar reward model from pairwise preferences.

    Bradley-Terry (Bradley & Terry, 1952) negative log-likelihood, seed 004 §3.1.2 (model Eq. (2) and the loss
    that follows it), seed 001 §3.1.1 Eq. (1); the optional margin m is Llama 2's (Touvron et al., 2023):

        ℓ = −log σ(r(x, y_w) − r(x, y_l) − m)
    """
    logits = chosen_scores - rejected_scores
    if margin is not None:
        logits = logits - margin
    return -F.logsigmoid(logits)


def best_of_n_indices(rewards: Tensor, group_size: int) -> Tensor:
    """Select the highest-reward sample of each prompt, for RAFT / rejection-sampling fine-tuning.

    RAFT (Dong et al., 2023; seed 004 §4.3.2), for the contiguous group g of ``group_size`` samples:

        i*_g = g · group_size + argmax_{j < group_size} R_{g · group_size + j}

    Returns flat indices into ``rewards`` (shape [N / group_size]); ties go to the first sample.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"group_size={group_size} does not divide the number of rewards {rewards.numel()}")
    grouped = rewards.view(-1, group_size)
    offsets = torch.arange(grouped.shape[0], device=rewards.device) * group_size
    return offsets + grouped.argmax(dim=-1)
