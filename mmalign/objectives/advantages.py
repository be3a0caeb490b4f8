"""From the rewards of a rollout to per-sample advantages, the same for sequence and diffusion policies.

Estimators are looked up by name (`make_advantage_estimator`) and called on the rewards of the WHOLE global batch
[N] (the algorithm gathers them across processes first, so N processes compute what 1 process would) with the
batch's `RewardGroups`: samples of one prompt sit in contiguous blocks of `size`, and `keys` names each sample's
prompt (needed by the stateful `per_prompt` tracker). Names follow trl where it has one (GRPOConfig.scale_rewards,
RLOOTrainer):

    reinforce   A_i = R_i − mean_batch R                         (optionally / (std_batch R + eps))
    rloo        A_i = R_i − mean_{j≠i in group} R_j
    grpo        A_i = (R_i − mean_group R) / (std_group R + eps)   trl scale_rewards="group"
    dr_grpo     A_i =  R_i − mean_group R                          trl scale_rewards="none" (Dr. GRPO)
    batch       A_i = (R_i − mean_group R) / (std_batch R + eps)   trl scale_rewards="batch"
    per_prompt  DDPO's per-prompt stat tracker (buffered history per prompt; state_dict/load_state_dict)

std is the unbiased (Bessel-corrected) standard deviation, as in trl, except `per_prompt` (population std, as in
DDPO). Also here: ReMax's greedy baseline (a function: it needs the greedy rewards), advantage clipping, and DAPO's
two reward-side tools, the dynamic-sampling group filter and the soft overlong punishment.
"""

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from mmalign.objectives._options import check_options, lookup

_SCALES = {True: "group", False: "none", "group": "group", "batch": "batch", "none": "none"}


@dataclass(frozen=True)
class RewardGroups:
    """Which samples of the global batch answer the same prompt: contiguous blocks of `size`, and each sample's
    prompt key (`keys`, optional unless the estimator keeps per-prompt statistics)."""

    size: int = 1
    keys: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"groups.size must be an integer >= 1, got {self.size!r}")
        if self.keys is not None:
            object.__setattr__(self, "keys", tuple(self.keys))


class AdvantageEstimator(Protocol):
    """What an algorithm needs from an advantage estimator: a name, the map, and resumable state."""

    name: str

    def __call__(self, rewards: Tensor, groups: RewardGroups) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _check_rewards(rewards: Tensor) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"rewards are not finite at indices {bad[:10]} (values {rewards[bad[:10]].tolist()})"
        )


def _check_groups(rewards: Tensor, group_size: int) -> None:
    _check_rewards(rewards)
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"group_size={group_size} does not divide the number of rewards {rewards.numel()}")


def _check_keys(rewards: Tensor, groups: RewardGroups, contiguous: bool) -> None:
    """The keys match the rewards one to one and, for block estimators, each block holds one prompt."""
    if groups.keys is None:
        return
    if len(groups.keys) != rewards.numel():
        raise ValueError(f"groups.keys has {len(groups.keys)} entries but rewards has {rewards.numel()}")
    if contiguous:
        for start in range(0, len(groups.keys), groups.size):
            block = groups.keys[start : start + groups.size]
            if len(set(block)) > 1:
                raise ValueError(
                    f"groups.keys: the group at samples {start}..{start + groups.size - 1} mixes prompts "
                    f"{sorted(set(block))}; samples of a prompt must be contiguous blocks of groups.size"
                )


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Baseline each sample with the mean reward of the other samples of its prompt: unbiased and critic-free.

    RLOO (Ahmadian et al., 2024; seed 004 §4.1.2 Eq. (11), seed 001 §3.8.3 Eq. (48); trl RLOOTrainer),
    k = group_size:

        A_i = R_i − 1/(k − 1) · Σ_{j≠i} R_j

    ``rewards`` is [N] with the k samples of each prompt in contiguous blocks.
    """
    _check_groups(rewards, group_size)
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(dim=-1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


def group_normalized_advantages(
    rewards: Tensor, group_size: int, scale: bool | str = True, eps: float = 1e-4
) -> Tensor:
    """Replace the value network with statistics of the prompt's group of samples.

    GRPO (Shao et al., 2024; seed 004 Table 2), trl GRPOTrainer's `scale_rewards`, per group g:

        A_i = (R_i − mean_g R) / (std_g R + eps)       scale="group" (or True): GRPO
        A_i = (R_i − mean_g R) / (std_batch R + eps)   scale="batch": trl's batch scaling
        A_i =  R_i − mean_g R                          scale="none" (or False): Dr. GRPO (Liu et al., 2025)

    with unbiased std. ``rewards`` is [N] with the samples of each prompt in contiguous blocks of ``group_size``.
    A group of equal rewards gets zero advantages under every scale.
    """
    if scale not in _SCALES:
        raise ValueError(f"scale must be 'group', 'batch' or 'none' (or a bool), got {scale!r}")
    _check_groups(rewards, group_size)
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=-1, keepdim=True)
    if _SCALES[scale] == "group":
        advantages = advantages / (grouped.std(dim=-1, keepdim=True) + eps)
    elif _SCALES[scale] == "batch":
        advantages = advantages / (rewards.std() + eps)
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


def clip_advantages(advantages: Tensor, max_abs: float) -> Tensor:
    """Bound advantages so a few outlier rewards cannot dominate an update: A ← clip(A, −max_abs, max_abs)."""
    if not max_abs > 0:
        raise ValueError(f"max_abs must be > 0, got {max_abs}")
    return advantages.clamp(min=-max_abs, max=max_abs)


class _Stateless:
    """Estimators whose advantages depend on the current batch only."""

    name: str

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(
                f"advantage estimator {self.name!r} keeps no state but got {sorted(state)}: "
                "was the checkpoint written with another estimator?"
            )


class BatchBaseline(_Stateless):
    """REINFORCE with the mean reward of the global batch as baseline (Williams, 1992; seed 004 §4.1.2).

        A_i = R_i − mean_batch R                          (scale=False)
        A_i = (R_i − mean_batch R) / (std_batch R + eps)  (scale=True: DDPO without per-prompt tracking)

    Called on the gathered global batch, this is the same baseline on every process.
    """

    name = "reinforce"

    def __init__(self, scale: bool = False, eps: float = 1e-4) -> None:
        self.scale, self.eps = scale, eps

    def __call__(self, rewards: Tensor, groups: RewardGroups) -> Tensor:
        _check_rewards(rewards)
        _check_keys(rewards, groups, contiguous=False)
        advantages = rewards - rewards.mean()
        if not self.scale:
            return advantages
        # A single sample has no spread to divide by (trl's convention): its advantage stays 0.
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        return advantages / (std + self.eps)


class LeaveOneOut(_Stateless):
    """RLOO's leave-one-out group baseline (`rloo_advantages`) behind the estimator interface."""

    name = "rloo"

    def __call__(self, rewards: Tensor, groups: RewardGroups) -> Tensor:
        _check_keys(rewards, groups, contiguous=True)
        return rloo_advantages(rewards, groups.size)


class GroupBaseline(_Stateless):
    """Group-mean baseline with a choice of scale (`group_normalized_advantages`) behind the estimator interface."""

    def __init__(self, name: str, scale: str, eps: float = 1e-4) -> None:
        self.name, self.scale, self.eps = name, scale, eps

    def __call__(self, rewards: Tensor, groups: RewardGroups) -> Tensor:
        _check_keys(rewards, groups, contiguous=True)
        return group_normalized_advantages(rewards, groups.size, scale=self.scale, eps=self.eps)


def _grpo(eps: float = 1e-4) -> GroupBaseline:
    return GroupBaseline("grpo", "group", eps)


def _dr_grpo() -> GroupBaseline:
    return GroupBaseline("dr_grpo", "none")


def _batch(eps: float = 1e-4) -> GroupBaseline:
    return GroupBaseline("batch", "batch", eps)


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

    name = "per_prompt"

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

    def __call__(self, rewards: Tensor, groups: RewardGroups) -> Tensor:
        if groups.keys is None:
            raise ValueError("advantage estimator 'per_prompt' needs groups.keys (each sample's prompt)")
        return self.update(list(groups.keys), rewards)

    def update(self, prompts: list[str], rewards: Tensor) -> Tensor:
        if len(prompts) != rewards.numel():
            raise ValueError(f"prompts has {len(prompts)} entries but rewards has {rewards.numel()}")
        _check_rewards(rewards.flatten())
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


ADVANTAGE_ESTIMATORS = {
    "reinforce": BatchBaseline,
    "rloo": LeaveOneOut,
    "grpo": _grpo,
    "dr_grpo": _dr_grpo,
    "batch": _batch,
    "per_prompt": PerPromptStatTracker,
}


def make_advantage_estimator(name: str, **options: Any) -> AdvantageEstimator:
    """The advantage estimator called `name`, built with `options` (unknown names and options are errors)."""
    factory = lookup("advantage estimator", ADVANTAGE_ESTIMATORS, name)
    check_options("advantage estimator", name, factory, options)
    return factory(**options)


def dynamic_sampling_mask(rewards: Tensor, group_size: int, atol: float = 0.0) -> Tensor:
    """Keep only groups whose rewards differ: a group of equal rewards has zero advantages and no gradient.

    DAPO's dynamic sampling (Yu et al., 2025, §3.2: the constraint 0 < |{o_i : is_equivalent(a, o_i)}| < G of
    the DAPO objective), generalised to any reward: a group is kept iff max_g R − min_g R > atol. Returns a boolean keep-mask [N] (all samples of a
    group share its value); DAPO then samples more prompts until the batch is full of kept groups.
    """
    _check_groups(rewards, group_size)
    if atol < 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    grouped = rewards.view(-1, group_size)
    spread = grouped.max(dim=-1).values - grouped.min(dim=-1).values
    return (spread > atol).repeat_interleave(group_size)


def soft_overlong_punishment(lengths: Tensor, max_completion_length: int, soft_punish_cache: int) -> Tensor:
    """A length penalty added to the reward so truncated responses are not rewarded for what they did say.

    DAPO's soft overlong punishment (Yu et al., 2025, Eq. (13); trl `get_soft_overlong_punishment`),
    L_max = max_completion_length, L_cache = soft_punish_cache:

        R_length(y) = 0                                  |y| ≤ L_max − L_cache
                    = ((L_max − L_cache) − |y|) / L_cache L_max − L_cache < |y| ≤ L_max
                    = −1                                 |y| > L_max

    ``lengths`` [N] are response token counts; returns the penalty [N] (floating), to add to the rewards.
    """
    if max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")
    if not 0 <= soft_punish_cache <= max_completion_length:
        raise ValueError(
            f"soft_punish_cache must be in [0, max_completion_length={max_completion_length}], "
            f"got {soft_punish_cache}"
        )
    if (lengths < 0).any():
        raise ValueError(f"lengths must be >= 0, got {lengths.tolist()}")
    lengths = lengths if lengths.is_floating_point() else lengths.to(torch.get_default_dtype())
    start = max_completion_length - soft_punish_cache
    ramp = (start - lengths) / max(soft_punish_cache, 1)
    penalty = torch.where(lengths <= max_completion_length, ramp, torch.full_like(lengths, -1.0))
    return torch.where(lengths <= start, torch.zeros_like(lengths), penalty)
