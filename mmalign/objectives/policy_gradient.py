"""Online policy-gradient losses: the clipped surrogate (PPO, GRPO, DAPO, GSPO), REINFORCE, KL penalties, and the
value-model pieces of classical RLHF PPO (GAE, clipped value loss, whitening, KL-shaped rewards).

``logprobs`` are log π_θ of sampled actions: shape [B] for one action per sample (a whole sequence, a diffusion
step), or [B, T] per token with a [B, T] ``mask`` (1 on response tokens). Terms defined per token
(`clipped_surrogate`, `value_loss`) return [B, T], zero outside the mask, and `aggregate_token_losses` turns them
into per-sample values [B] by trl's `loss_type` names. The trainer averages per-sample values over the global
batch, so each aggregation is written so that this average is exactly the named objective. Add per-token terms
(e.g. trl GRPO's β · k3 KL) before aggregating so they are weighted like the surrogate.

Advantage estimators live in `mmalign.objectives.advantages`; the names imported from there below are kept for
callers that reach them through this module.
"""

import torch
from torch import Tensor

from mmalign.objectives.advantages import PerPromptStatTracker as PerPromptStatTracker
from mmalign.objectives.advantages import clip_advantages as clip_advantages
from mmalign.objectives.advantages import group_normalized_advantages as group_normalized_advantages
from mmalign.objectives.advantages import remax_advantages as remax_advantages
from mmalign.objectives.advantages import rloo_advantages as rloo_advantages

_KL_ESTIMATORS = ("k1", "k3")
_LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
_IS_LEVELS = ("token", "sequence")


def _masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim=dim) / mask.sum(dim=dim).clamp(min=1.0)


def _check_same_shape(reference_name: str, reference: Tensor, **tensors: Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.shape != reference.shape:
            raise ValueError(
                f"{name} must have the shape of {reference_name} {tuple(reference.shape)}, got {tuple(tensor.shape)}"
            )


def _check_right_padded(mask: Tensor) -> None:
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D [B, T], got shape {tuple(mask.shape)}")
    on = mask.bool()
    rows = (on[:, 1:] & ~on[:, :-1]).any(dim=-1).nonzero().flatten().tolist()
    if rows:
        raise ValueError(
            f"mask must be right-padded (response tokens first, then padding); rows {rows[:10]} are not"
        )


def _as_tokens(logprobs: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """[B] actions as [B, 1]; the mask as floats (all ones if absent)."""
    if logprobs.dim() == 1:
        logprobs = logprobs.unsqueeze(-1)
        mask = None if mask is None else mask.unsqueeze(-1)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B] or [B, T], got shape {tuple(logprobs.shape)}")
    return logprobs, torch.ones_like(logprobs) if mask is None else mask.to(logprobs.dtype)


def _per_token_advantages(advantages: Tensor, logprobs: Tensor) -> Tensor:
    if advantages.shape == logprobs.shape:
        return advantages
    if advantages.shape == logprobs.shape[:1]:
        return advantages.unsqueeze(-1)
    raise ValueError(
        f"advantages must be [B]={tuple(logprobs.shape[:1])} or the shape of logprobs {tuple(logprobs.shape)}, "
        f"got {tuple(advantages.shape)}"
    )


def clipped_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling_level: str = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Take several gradient steps on one rollout without moving the policy too far from the sampler.

    The clipped surrogate of PPO (Schulman et al., 2017, Eq. (7); seed 004 §4.1.1) with DAPO's decoupled clip
    range (Yu et al., 2025, §3.1 "clip-higher"; trl `epsilon`, `epsilon_high`), per token t of sample i:

        ℓ_it = max(−A_it · w_it, −A_it · clip(w_it, 1 − ε_low, 1 + ε_high))

    importance_sampling_level="token":    w_it = π_θ(y_it | ·) / π_old(y_it | ·)
    importance_sampling_level="sequence": w_it = s_i = exp(1/|y_i| Σ_t log(π_θ(y_it | ·) / π_old(y_it | ·)))
        (GSPO, Zheng et al., 2025, §4.1: the length-normalised sequence ratio, clipped per sequence and shared by
        every token of the sequence, as in trl's `importance_sampling_level`; GSPO's objective is this with
        loss_type="grpo", which averages the shared value over the sequence's tokens)

    ε_low = ``epsilon``, ε_high = ``epsilon_high`` (default ε_low). [B] advantages are broadcast over tokens.
    Returns the per-token losses (shape of ``logprobs``, zero outside ``mask``; aggregate [B, T] ones with
    `aggregate_token_losses`) and detached masked token means: ratio_mean (of w), clip_fraction
    (w outside [1 − ε_low, 1 + ε_high]), clip_low_fraction / clip_high_fraction (the clip binds: w < 1 − ε_low
    with A < 0, w > 1 + ε_high with A > 0; trl's clip_ratio/low_mean and high_mean) and approx_kl
    (k3 estimate of KL(π_old‖π_θ) from the token ratios).
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    if not eps_high > 0:
        raise ValueError(f"epsilon_high must be > 0, got {epsilon_high}")
    if importance_sampling_level not in _IS_LEVELS:
        raise ValueError(
            f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}"
        )
    _check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, mask=mask)
    one_action = logprobs.dim() == 1
    lp, m = _as_tokens(logprobs, mask)
    old, _ = _as_tokens(old_logprobs, None)
    adv = _per_token_advantages(advantages, lp)
    on = m > 0

    log_ratio = torch.where(on, lp - old, torch.zeros_like(lp))  # padding may hold any value
    if importance_sampling_level == "sequence":
        log_weight = _masked_mean(log_ratio, m, dim=-1).unsqueeze(-1).expand_as(lp)
    else:
        log_weight = log_ratio
    weight = torch.exp(log_weight)
    clipped = torch.clamp(weight, 1.0 - epsilon, 1.0 + eps_high)
    losses = torch.where(on, torch.maximum(-adv * weight, -adv * clipped), torch.zeros_like(lp))

    with torch.no_grad():
        adv_t = adv.expand_as(lp)
        low, high = weight < 1.0 - epsilon, weight > 1.0 + eps_high
        metrics = {
            "ratio_mean": _masked_mean(weight, m),
            "clip_fraction": _masked_mean((low | high).to(lp.dtype), m),
            "clip_low_fraction": _masked_mean((low & (adv_t < 0)).to(lp.dtype), m),
            "clip_high_fraction": _masked_mean((high & (adv_t > 0)).to(lp.dtype), m),
            "approx_kl": _masked_mean(torch.expm1(log_ratio) - log_ratio, m),
        }
    return (losses.squeeze(-1) if one_action else losses), metrics


def aggregate_token_losses(
    token_losses: Tensor,
    mask: Tensor,
    loss_type: str = "grpo",
    *,
    max_completion_length: int | None = None,
    tokens_per_sample: float | Tensor | None = None,
) -> Tensor:
    """Per-sample values [B] from per-token losses [B, T], so the trainer's mean over the global batch is the
    objective trl names ``loss_type`` (GRPOConfig.loss_type), |y_i| = Σ_t m_it:

        grpo     ℓ_i = Σ_t m_it ℓ_it / |y_i|              mean over each sequence's tokens, then over sequences
                                                          (GRPO, Shao et al., 2024; 0 for an empty row)
        dapo     ℓ_i = Σ_t m_it ℓ_it / tokens_per_sample  token-level (DAPO, Yu et al., 2025, §3.3): with
                                                          tokens_per_sample = T_total / B_total of the batch the
                                                          trainer averages over, mean_i ℓ_i = Σ_it m ℓ / T_total
        bnpo     ℓ_i = Σ_t m_it ℓ_it · B / Σ_jt m_jt      token-level over THIS batch only (trl's bnpo)
        dr_grpo  ℓ_i = Σ_t m_it ℓ_it / L_max              a constant normaliser (Dr. GRPO, Liu et al., 2025)

    Where mmalign differs from trl: trl's dapo divides by the active tokens of the generation batch rescaled to one
    accumulation window (`num_items_in_batch`); here the caller passes the tokens per sample of whichever batch
    it normalises over, so the optimizer step's global batch (B_total samples, T_total tokens gathered across
    processes and micro-batches) gives the exact token mean and N processes equal 1 process. bnpo normalises by
    the tokens of the tensor it is given (a micro-batch on one process here, trl's "local batch"), so it is exact
    only when that is the whole optimizer batch: prefer dapo. dr_grpo needs every response to fit in L_max
    (``max_completion_length``), as trl's constant assumes.
    """
    if loss_type not in _LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(map(repr, _LOSS_TYPES))}; got {loss_type!r}")
    if token_losses.dim() != 2:
        raise ValueError(f"token_losses must be [B, T], got shape {tuple(token_losses.shape)}")
    _check_same_shape("token_losses", token_losses, mask=mask)
    m = mask.to(token_losses.dtype)
    sums = torch.where(m > 0, token_losses, torch.zeros_like(token_losses)).sum(dim=-1)
    lengths = m.sum(dim=-1)
    if loss_type == "grpo":
        return sums / lengths.clamp(min=1.0)
    if loss_type == "bnpo":
        return sums * token_losses.shape[0] / lengths.sum().clamp(min=1.0)
    if loss_type == "dapo":
        if tokens_per_sample is None or not float(tokens_per_sample) > 0:
            raise ValueError(
                "loss_type 'dapo' needs tokens_per_sample > 0 (global token count / global sample count), "
                f"got {tokens_per_sample}"
            )
        return sums / tokens_per_sample
    if max_completion_length is None or max_completion_length < 1:
        raise ValueError(f"loss_type 'dr_grpo' needs max_completion_length >= 1, got {max_completion_length}")
    longest = int(lengths.max().item()) if lengths.numel() else 0
    if longest > max_completion_length:
        raise ValueError(
            f"a response has {longest} tokens > max_completion_length={max_completion_length} (dr_grpo's constant)"
        )
    return sums / max_completion_length


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    clip_range: float,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip with a symmetric range, per sample: `clipped_surrogate` (ε = clip_range) averaged over each
    sample's masked tokens (loss_type="grpo"; 0 for a sample without tokens), with its metrics."""
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    losses, metrics = clipped_surrogate(logprobs, old_logprobs, advantages, mask, epsilon=clip_range)
    if losses.dim() == 2:
        losses = aggregate_token_losses(losses, torch.ones_like(losses) if mask is None else mask, "grpo")
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

    trl's names: PPOTrainer/RLOOTrainer use k1 in the reward, GRPOTrainer k3 in the loss (trl has no k2).
    """
    if estimator not in _KL_ESTIMATORS:
        raise ValueError(
            f"estimator must be one of {', '.join(map(repr, _KL_ESTIMATORS))}; got {estimator!r}"
        )
    if estimator == "k1":
        return logprobs - ref_logprobs
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


def kl_shaped_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> Tensor:
    """Per-token rewards of classical RLHF PPO: a KL penalty on every response token, the score at the end.

    Seed 001 §3.1 Eq. (2), r_φ(x, y) − β log(π_θ(y|x)/π_ref(y|x)) spread over the tokens (Ziegler et al., 2019;
    trl PPOTrainer), for the response tokens t of sample i (right-padded ``mask``):

        r_it = −β · kl_it + [t = last response token of i] · score_i,   kl_it = `kl_penalty` (k1 or k3)

    trl adds the score one position after the last response token (its `sequence_lengths_p1`); here it is on the
    last response token itself, so every reward sits on a token the policy produced. Returns [B, T], zero outside
    the mask; a row without response tokens is an error (its score would have nowhere to go).
    """
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    _check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs, mask=mask)
    _check_right_padded(mask)
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(f"scores must be [B]={tuple(logprobs.shape[:1])}, got {tuple(scores.shape)}")
    lengths = mask.bool().sum(dim=-1)
    empty = (lengths == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"mask rows {empty[:10]} have no response token to carry the score")
    on = mask.bool()
    kl = torch.where(on, kl_penalty(logprobs, ref_logprobs, estimator), torch.zeros_like(logprobs))
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    return rewards.index_put((rows, lengths - 1), scores.to(rewards.dtype), accumulate=True)


def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Per-token advantages and returns for a value model, trading bias for variance with λ.

    Generalized advantage estimation (Schulman et al., 2016, Eq. (16); trl PPOTrainer, defaults γ = 1,
    λ = 0.95), for the response tokens t < |y_i| of a right-padded ``mask``:

        δ_t = r_t + γ V_{t+1} − V_t       (V_{|y_i|} = 0: the episode ends at the last response token)
        A_t = δ_t + γλ A_{t+1}            (A_{|y_i|} = 0),    R_t = A_t + V_t

    Returns (advantages, returns), both [B, T] and zero outside the mask; values and rewards outside it are
    ignored. Whiten the advantages across the GLOBAL batch (`masked_whiten` on gathered rows) to keep N processes
    equal to 1.
    """
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0 <= lam <= 1:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    _check_same_shape("rewards", rewards, values=values, mask=mask)
    _check_right_padded(mask)
    on = mask.bool()
    r = torch.where(on, rewards, torch.zeros_like(rewards))
    v = torch.where(on, values, torch.zeros_like(values))
    next_values = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=-1)
    deltas = r + gamma * next_values - v  # zero on padding, so the recursion restarts at each row's end
    advantages = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[:, 0])
    for t in reversed(range(deltas.shape[1])):
        running = deltas[:, t] + gamma * lam * running
        advantages[:, t] = running
    advantages = torch.where(on, advantages, torch.zeros_like(advantages))
    return advantages, torch.where(on, advantages + v, torch.zeros_like(advantages))


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor | None = None,
    clip_range_value: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Regress the value model on the returns without letting one rollout move it far (PPO's value clipping).

    As in OpenAI's PPO implementations and trl PPOTrainer (`cliprange_value`, default 0.2), per token:

        ℓ_t = ½ · max((V_t − R_t)², (clip(V_t, V_old,t − ε_v, V_old,t + ε_v) − R_t)²)

    Returns per-token losses (shape of ``values``, zero outside ``mask``; aggregate [B, T] ones with
    `aggregate_token_losses`) and value_clip_fraction, the masked share of tokens where the clipped term is the
    larger (trl's vf_clipfrac).
    """
    if not clip_range_value > 0:
        raise ValueError(f"clip_range_value must be > 0, got {clip_range_value}")
    _check_same_shape("values", values, old_values=old_values, returns=returns, mask=mask)
    m = torch.ones_like(values) if mask is None else mask.to(values.dtype)
    clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_sq, clipped_sq = (values - returns) ** 2, (clipped - returns) ** 2
    losses = torch.where(m > 0, 0.5 * torch.maximum(unclipped_sq, clipped_sq), torch.zeros_like(values))
    with torch.no_grad():
        metrics = {"value_clip_fraction": _masked_mean((clipped_sq > unclipped_sq).to(values.dtype), m)}
    return losses, metrics


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise advantages (or rewards) to unit variance over the masked entries, as PPO implementations do.

    trl's `masked_whiten`: with μ and σ² the masked mean and unbiased variance,

        w = (x − μ) / sqrt(σ² + eps)         (shift_mean=True)
        w = (x − μ) / sqrt(σ² + eps) + μ     (shift_mean=False: scale only, as trl's whiten_rewards)

    Entries outside the mask are returned as 0. The statistics are those of the tensor given: pass the gathered
    global batch for N processes to equal 1.
    """
    _check_same_shape("values", values, mask=mask)
    m = mask.to(values.dtype)
    count = m.sum()
    if count < 2:
        raise ValueError(
            f"mask must select at least 2 entries to whiten (unbiased variance), got {int(count)}"
        )
    mean = (values * m).sum() / count
    var = (((values - mean) ** 2) * m).sum() / (count - 1)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m > 0, whitened, torch.zeros_like(whitened))
