"""Per-step terms of diffusion objectives: Gaussian step log-probs and KLs, and the denoising-error surrogate.

All values are per sample (shape [B]); log-probs and errors are averaged over the non-batch dimensions, as in DDPO's
reference implementation (Black et al. 2023), so PPO ratios and losses do not scale with the resolution.
"""

import math

import torch
from torch import Tensor


def gaussian_logprob(x: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
    """Log-density of a sampled step under the Gaussian it was drawn from, the action log-prob of DDPO/DPOK/DLPO.

    Seed 004 §4.5.1 (DDPO): each denoising step is a Gaussian policy π(x_{t−1} | x_t, c) = N(μ_θ(x_t, t, c), σ_t² I):

        log π = mean_d [ −(x_d − μ_d)² / (2σ²) − log σ − ½ log 2π ]      (mean over the d dimensions)

    `x` is treated as data (detached); gradients flow through `mean`.
    """
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    logp = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return logp.flatten(1).mean(1)


def gaussian_kl(mean_p: Tensor, mean_q: Tensor, std: Tensor | float, reduction: str = "mean") -> Tensor:
    """How far one sampler step of the policy is from the same step of the reference (DPOK, DRaFT+ regulariser).

    DPOK (Fan et al. 2023; seed 004 §4.5.1): for two step Gaussians with a shared σ (a scalar or broadcastable to
    the means), per dimension

        KL(N(μ_p, σ²) ‖ N(μ_q, σ²)) = (μ_p − μ_q)² / (2σ²)

    `reduction="mean"` averages over all but the batch dimension (the scale of `gaussian_logprob`, used in training
    losses); `"sum"` is the full KL per sample in nats (the path KL reported against the base model). The KL between
    two samplers' trajectories from the same start is the sum of their step KLs (chain rule), each step's means taken
    at the policy's own sample. Returns [B].
    """
    if mean_p.shape != mean_q.shape:
        raise ValueError(f"mean_q has shape {tuple(mean_q.shape)}, mean_p {tuple(mean_p.shape)}")
    std = torch.as_tensor(std, dtype=mean_p.dtype, device=mean_p.device)
    if not bool((std > 0).all()):
        raise ValueError("std must be > 0 (a deterministic step has no KL)")
    per_dim = ((mean_p - mean_q) ** 2 / (2 * std**2)).flatten(1)
    if reduction == "mean":
        return per_dim.mean(1)
    if reduction == "sum":
        return per_dim.sum(1)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def denoising_error(prediction: Tensor, target: Tensor) -> Tensor:
    """‖target − prediction‖² averaged over the dimensions: the diffusion training loss per sample.

    Ho et al. 2020's simple loss (ε-prediction), or the v-/velocity-prediction loss with the matching target.
    """
    return ((prediction.float() - target.float()) ** 2).flatten(1).mean(1)


def denoising_logprob_surrogate(error: Tensor) -> Tensor:
    """Diffusion-DPO's stand-in for log p(x₀ | c): −½ · denoising error at a shared (noise, t).

    Diffusion-DPO (Wallace et al. 2023; seed 004 §5.2.1) replaces the intractable log-likelihood ratio with the
    ELBO difference; at one (ε, t) per pair its log-ratio of the preferred sample is
    −½[‖ε − ε_θ(x_t^w)‖² − ‖ε − ε_ref(x_t^w)‖²], and β absorbs the paper's T·ω(λ_t) weighting.
    """
    return -0.5 * error


def nft_optimality(advantages: Tensor, max_abs: float) -> Tensor:
    """DiffusionNFT's optimality probability r ∈ [0, 1] of each sample from its (normalised) advantage.

    Zheng et al. 2025 (DiffusionNFT, arXiv:2509.16117, ICLR 2026), §3, the optimality reward
    r = ½ + ½·clip((R − E_c R) / Z_c, −1, 1).
    The reference code takes the group-normalised advantage A = (R − E_c R)/std and Z_c = `max_abs`·std, i.e.
    r = ½ + ½·clip(A / max_abs, −1, 1) (its `adv_clip_max` = 5); r = ½ leaves a sample out of the loss's pull.
    """
    if not max_abs > 0:
        raise ValueError(f"max_abs must be > 0, got {max_abs}")
    return 0.5 + 0.5 * (advantages / max_abs).clamp(-1.0, 1.0)


def nft_loss(
    output: Tensor,
    old_output: Tensor,
    target: Tensor,
    optimality: Tensor,
    beta: float,
    *,
    adaptive: bool = False,
    eps: float = 1e-5,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Train the velocity on positives and its reflection on negatives: DiffusionNFT's forward-process RL loss.

    Zheng et al. 2025 (DiffusionNFT, arXiv:2509.16117, ICLR 2026), §3, the policy-optimisation objective

        L(θ) = E[ r·‖v⁺_θ(x_t, c, t) − v‖² + (1 − r)·‖v⁻_θ(x_t, c, t) − v‖² ],
        v⁺_θ = (1 − β)·v_old + β·v_θ    (implicit positive policy)
        v⁻_θ = (1 + β)·v_old − β·v_θ    (implicit negative policy)

    with x_t the forward process applied to the old policy's sample x₀, v its training target (ε − x₀ for flows; ε
    or v for DDPM-family models, which are linear in the score just the same) and r the optimality probability
    (`nft_optimality`). Each branch's error is averaged over dimensions and divided by β, as the reference code
    does, so (without `adaptive`) the gradient at v_θ = v_old is ∝ (2r − 1)(v_old − v) whatever β (towards the
    sample's target for r > ½, away from it for r < ½) and the minimiser is v_θ = v_old + (2r − 1)(v − v_old)/β.
    `adaptive` divides each branch's error by its detached mean absolute
    error (the paper's adaptive loss weighting; the reference code applies it to x₀-space errors, which for a flow
    model adds a factor t to each sample). Returns per-sample losses [B] and detached metrics.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not (output.shape == old_output.shape == target.shape):
        raise ValueError(
            f"output {tuple(output.shape)}, old_output {tuple(old_output.shape)} and target "
            f"{tuple(target.shape)} must have one shape"
        )
    output, old, target = output.float(), old_output.detach().float(), target.float()
    positive = (1 - beta) * old + beta * output
    negative = (1 + beta) * old - beta * output

    def error(prediction: Tensor) -> Tensor:
        diff = (prediction - target).flatten(1)
        err = (diff**2).mean(1)
        return err / diff.abs().mean(1).detach().clamp(min=eps) if adaptive else err

    r = optimality.float()
    losses = (r * error(positive) + (1 - r) * error(negative)) / beta
    metrics = {
        "optimality": r.detach().mean(),
        "old_deviation": ((output - old) ** 2).flatten(1).mean(1).detach().mean(),
    }
    return losses, metrics
