"""Modality-free math of diffusion sampler steps: the KL between two Gaussian step distributions."""

import torch
from torch import Tensor


def gaussian_kl(mean_p: Tensor, mean_q: Tensor, std: Tensor | float) -> Tensor:
    """How far one sampler step of the policy is from the same step of the reference (DPOK, DRaFT+ regulariser).

    For two Gaussians with a shared standard deviation σ, per dimension,

        KL(N(μ_p, σ²) ‖ N(μ_q, σ²)) = (μ_p − μ_q)² / (2σ²)

    averaged over all but the batch dimension, like `mmalign.core.diffusion.gaussian_logprob`, so it is on the
    scale of the per-dimension log-probs. The KL between two samplers' trajectories from the same x_T is the sum
    of their step KLs along the trajectory (chain rule), each step's means taken at the policy's own x_t.
    Returns [B].
    """
    std = torch.as_tensor(std, dtype=mean_p.dtype, device=mean_p.device)
    if not bool((std > 0).all()):
        raise ValueError(f"std must be > 0, got {std}")
    if mean_p.shape != mean_q.shape:
        raise ValueError(
            f"mean_q must have the shape of mean_p {tuple(mean_p.shape)}, got {tuple(mean_q.shape)}"
        )
    return ((mean_p - mean_q) ** 2 / (2 * std**2)).flatten(1).mean(1)
