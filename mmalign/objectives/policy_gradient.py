"""Online policy-gradient losses, advantage estimators and KL penalties.

``logprobs`` are log π_θ of sampled actions: shape [B] for one action per sample (a whole sequence, a diffusion
step), or [B, T] per token with a [B, T] ``mask``. Losses are per-sample, shape [B], without reduction.
"""

from collections import deque

import torch
from torch import Tensor

_KL_ESTIMATORS = ("k1", "k3")


def _masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim=dim) / mask.sum(dim=dim).clamp(min=1.0)


def _check_groups(rewards: Tensor, group_size: int) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"group_size={group_size} does not divide the number of rewards {rewards.numel()}")


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


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Baseline each sample with the mean reward of the other samples of its prompt: unbiased and critic-free.

    RLOO (Ahmadian et al., 2024; seed 004 §4.1.2 Eq. (11), seed 001 §3.8.3 Eq. (48)), k = group_size:

        A_i = R_i − 1/(k − 1) · Σ_{j≠i} R_j

    ``rewards`` is [N] with the k samples of each prompt in contiguous blocks.
    """
    _check_groups(rewards, group_size)
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(dim=-1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


def group_normalized_advantages(
    rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-4
) -> Tensor:
    """Replace the value network with statistics of the prompt's group of samples.

    GRPO (Shao et al., 2024; listed with the REINFORCE-style methods in seed 004 Table 2), per group g:

        A_i = (R_i − mean_g R) / (std_g R + eps)   (scale=True, unbiased std)
        A_i =  R_i − mean_g R                       (scale=False)

    ``rewards`` is [N] with the samples of each prompt in contiguous blocks of ``group_size``.
    """
    _check_groups(rewards, group_size)
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=-1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(dim=-1, keepdim=True) + eps)
    return advantages.reshape(-1)


def remax_advantages(rewards: Tensor, greedy_rewards: Tensor) -> Tensor:
    """Baseline a sampled response with the reward of the greedy response to the same prompt.

    ReMax (Li et al., 2023; seed 004 §4.1.2 Eqs. (9)-(10)):

        A_i = r(x_i, a_{1:T}) − r(x_i, ā_{1:T}),   ā_t ∈ argmax π_θ(· | x_i, ā_{1:t−1})
    """
    if rewards.shape != greedy_rewards.shape:
        raise ValueError(
            f"greedy_rewards must have the shape of rewards {tuple(rewards.shape)}, "
            f"got {tuple(greedy_rewards.shape)}"
        )
    return rewards - greedy_rewards


class PerPromptStatTracker:
    """Normalise rewards per prompt so prompts with easy or hard reward scales contribute comparable advantages.

    DDPO per-prompt stat tracking (Black et al., 2023; seed 004 §4.5.1 Eq. (25)). For each prompt p, the last
    ``buffer_size`` rewards are kept (this batch's rewards included) and

        A_i = (R_i − mean_p) / (std_p + 1e-6)

    with the population mean/std of p's buffer, or of the whole batch while p has fewer than ``min_count``
    rewards. ``scale="batch"`` divides by the batch's std instead of p's: with a saturating reward (a classifier
    probability) an easy prompt's buffer has std ≈ 0 and per-prompt scaling would turn its noise into ±1
    advantages (the mean-only baseline of Dr. GRPO, Liu et al. 2025, with the batch scale kept).
    """

    def __init__(self, buffer_size: int, min_count: int, scale: str = "prompt") -> None:
        if scale not in ("prompt", "batch"):
            raise ValueError(f"scale must be 'prompt' or 'batch', got {scale!r}")
        self.scale = scale
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if not 1 <= min_count <= buffer_size:
            raise ValueError(f"min_count must be in [1, buffer_size={buffer_size}], got {min_count}")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.stats: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: Tensor) -> Tensor:
        if len(prompts) != rewards.numel():
            raise ValueError(f"prompts has {len(prompts)} entries but rewards has {rewards.numel()}")
        values = rewards.detach().double().flatten().cpu()
        advantages = torch.empty_like(values)
        for prompt in dict.fromkeys(prompts):
            index = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buffer = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[index].tolist())
            reference = torch.tensor(list(buffer), dtype=torch.float64)
            if len(buffer) < self.min_count:
                reference = values
            mean = reference.mean()
            std = (reference if self.scale == "prompt" else values).std(correction=0)
            advantages[index] = (values[index] - mean) / (std + 1e-6)
        return advantages.to(dtype=rewards.dtype, device=rewards.device).view_as(rewards)

    def state_dict(self) -> dict[str, dict[str, list[float]]]:
        return {"stats": {prompt: list(buffer) for prompt, buffer in self.stats.items()}}

    def load_state_dict(self, state: dict[str, dict[str, list[float]]]) -> None:
        self.stats = {
            prompt: deque(values, maxlen=self.buffer_size) for prompt, values in state["stats"].items()
        }


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


def clip_advantages(advantages: Tensor, max_abs: float) -> Tensor:
    """Bound advantages so a few outlier rewards cannot dominate an update: A ← clip(A, −max_abs, max_abs)."""
    if not max_abs > 0:
        raise ValueError(f"max_abs must be > 0, got {max_abs}")
    return advantages.clamp(min=-max_abs, max=max_abs)
