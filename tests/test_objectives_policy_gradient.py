import json
import math
import statistics

import pytest
import torch
from torch.testing import assert_close

from mmalign.objectives import (
    PerPromptStatTracker,
    clip_advantages,
    group_normalized_advantages,
    kl_penalty,
    ppo_clip_loss,
    reinforce_loss,
    remax_advantages,
    rloo_advantages,
)


def f64(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def k3(ratio: float) -> float:
    return (ratio - 1.0) - math.log(ratio)


def test_ppo_clip_per_sample_by_hand() -> None:
    ratios = [1.5, 0.5, 1.1, 0.7]
    logprobs = f64([math.log(r) for r in ratios])
    losses, metrics = ppo_clip_loss(logprobs, torch.zeros(4, dtype=torch.float64), f64([1, 1, -1, -1]), 0.2)
    # max(−A·ρ, −A·clip(ρ, 0.8, 1.2)) per sample.
    assert_close(losses, f64([max(-1.5, -1.2), max(-0.5, -0.8), max(1.1, 1.1), max(0.7, 0.8)]))
    assert_close(metrics["clip_fraction"], f64(3 / 4))
    assert_close(metrics["ratio_mean"], f64(sum(ratios) / 4))
    assert_close(metrics["approx_kl"], f64(sum(k3(r) for r in ratios) / 4))


def test_ppo_clip_per_token_mask_and_broadcast_advantages() -> None:
    ratios = [[1.5, 1.0, 9.0], [0.5, 1.1, 1.0]]
    logprobs = f64([[math.log(r) for r in row] for row in ratios])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    losses, metrics = ppo_clip_loss(logprobs, torch.zeros(2, 3, dtype=torch.float64), f64([1, -1]), 0.2, mask)
    # Sample 0 (A = 1): tokens −1.2 and −1.0, third token masked. Sample 1 (A = −1): 0.8, 1.1, 1.0.
    assert_close(losses, f64([(-1.2 - 1.0) / 2, (0.8 + 1.1 + 1.0) / 3]))
    kept = [1.5, 1.0, 0.5, 1.1, 1.0]
    assert_close(metrics["clip_fraction"], f64(2 / 5))
    assert_close(metrics["ratio_mean"], f64(sum(kept) / 5))
    assert_close(metrics["approx_kl"], f64(sum(k3(r) for r in kept) / 5))


def test_ppo_clip_gradient_vanishes_only_when_clipped() -> None:
    logprobs = f64([math.log(1.5), math.log(0.5)]).requires_grad_()
    losses, metrics = ppo_clip_loss(logprobs, torch.zeros(2, dtype=torch.float64), f64([1, 1]), 0.2)
    losses.sum().backward()
    # Clipped above 1 + ε with A > 0: no gradient. Unclipped: d(−A·ρ)/d log π = −A·ρ = −0.5.
    assert_close(logprobs.grad, f64([0.0, -0.5]))
    assert not any(value.requires_grad for value in metrics.values())


def test_ppo_clip_rejects_non_positive_clip_range() -> None:
    with pytest.raises(ValueError, match="clip_range"):
        ppo_clip_loss(torch.zeros(2), torch.zeros(2), torch.ones(2), 0.0)


def test_reinforce_sums_masked_token_logprobs() -> None:
    assert_close(reinforce_loss(f64([-2.0, -0.5]), f64([1.5, -2.0])), f64([3.0, -1.0]))
    logprobs = f64([[-1.0, -2.0, -7.0], [-0.5, -0.5, -0.5]]).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    losses = reinforce_loss(logprobs, f64([2.0, -1.0]), mask)
    assert_close(losses, f64([-2.0 * -3.0, 1.0 * -1.5]))
    losses.sum().backward()
    assert_close(logprobs.grad, f64([[-2.0, -2.0, 0.0], [1.0, 1.0, 1.0]]))


def test_rloo_matches_leave_one_out_loop() -> None:
    rewards = [1.0, 2.0, 3.0, 4.0, 10.0, 0.0, 5.0, 5.0]
    expected = []
    for start in range(0, len(rewards), 4):
        group = rewards[start : start + 4]
        for i, reward in enumerate(group):
            others = [r for j, r in enumerate(group) if j != i]
            expected.append(reward - sum(others) / len(others))
    assert_close(rloo_advantages(f64(rewards), group_size=4), f64(expected))


def test_group_normalized_matches_statistics_module() -> None:
    rewards = [1.0, 2.0, 4.0, 0.5, 0.5, 3.5]
    scaled, centred = [], []
    for start in range(0, len(rewards), 3):
        group = rewards[start : start + 3]
        mean, std = statistics.mean(group), statistics.stdev(group)
        scaled += [(r - mean) / (std + 1e-4) for r in group]
        centred += [r - mean for r in group]
    assert_close(group_normalized_advantages(f64(rewards), 3), f64(scaled))
    assert_close(group_normalized_advantages(f64(rewards), 3, scale=False), f64(centred))


@pytest.mark.parametrize("fn", [rloo_advantages, group_normalized_advantages])
@pytest.mark.parametrize(
    ("rewards", "group_size", "name"),
    [(torch.zeros(6), 4, "group_size"), (torch.zeros(6), 1, "group_size"), (torch.zeros(2, 3), 3, "rewards")],
)
def test_group_estimators_reject_bad_arguments(fn, rewards: torch.Tensor, group_size: int, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        fn(rewards, group_size)


def test_remax_subtracts_greedy_baseline() -> None:
    assert_close(remax_advantages(f64([1.0, 0.2]), f64([0.4, 0.7])), f64([0.6, -0.5]))
    with pytest.raises(ValueError, match="greedy_rewards"):
        remax_advantages(torch.zeros(2), torch.zeros(3))


def _normalised(values: list[float], reference: list[float]) -> list[float]:
    mean, std = statistics.mean(reference), statistics.pstdev(reference)
    return [(v - mean) / (std + 1e-6) for v in values]


def test_per_prompt_stat_tracker_hand_walk() -> None:
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2)

    # Step 1: "a" has 2 rewards (per-prompt stats); "b" has 1 < min_count (falls back to the batch).
    advantages = tracker.update(["a", "b", "a"], torch.tensor([1.0, 5.0, 3.0]))
    a1 = _normalised([1.0, 3.0], [1.0, 3.0])
    b1 = _normalised([5.0], [1.0, 5.0, 3.0])
    assert_close(advantages, torch.tensor([a1[0], b1[0], a1[1]]))
    assert advantages.dtype == torch.float32

    state = tracker.state_dict()
    assert json.loads(json.dumps(state)) == {"stats": {"a": [1.0, 3.0], "b": [5.0]}}

    # Step 2: "a" buffer [1, 3] + [7, 9] keeps the last 3 -> [3, 7, 9]; "b" buffer [5, 6].
    advantages = tracker.update(["a", "a", "b"], torch.tensor([7.0, 9.0, 6.0]))
    a2 = _normalised([7.0, 9.0], [3.0, 7.0, 9.0])
    b2 = _normalised([6.0], [5.0, 6.0])
    assert_close(advantages, torch.tensor([a2[0], a2[1], b2[0]]))

    resumed = PerPromptStatTracker(buffer_size=3, min_count=2)
    resumed.load_state_dict(state)
    assert_close(resumed.update(["a", "a", "b"], torch.tensor([7.0, 9.0, 6.0])), advantages)
    assert resumed.state_dict() == tracker.state_dict()


def test_stat_tracker_batch_scale_uses_prompt_mean_and_batch_std() -> None:
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2, scale="batch")
    rewards = [0.999, 0.998, 0.1, 0.9]  # "easy" is saturated: its own std (5e-4) would inflate its noise
    advantages = tracker.update(["easy", "easy", "hard", "hard"], torch.tensor(rewards))
    batch_std = torch.tensor(rewards, dtype=torch.float64).std(correction=0)
    expected = [0.0005, -0.0005, -0.4, 0.4]
    assert_close(advantages, (torch.tensor(expected, dtype=torch.float64) / (batch_std + 1e-6)).float())
    with pytest.raises(ValueError, match="scale"):
        PerPromptStatTracker(4, 2, scale="group")


@pytest.mark.parametrize(
    ("buffer_size", "min_count", "name"), [(0, 1, "buffer_size"), (4, 5, "min_count"), (4, 0, "min_count")]
)
def test_stat_tracker_rejects_bad_arguments(buffer_size: int, min_count: int, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        PerPromptStatTracker(buffer_size, min_count)


def test_stat_tracker_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="prompts"):
        PerPromptStatTracker(4, 2).update(["a"], torch.zeros(2))


def test_kl_penalty_estimators_by_hand() -> None:
    logprobs, ref_logprobs = f64([math.log(0.5)]), f64([math.log(0.25)])
    assert_close(kl_penalty(logprobs, ref_logprobs), f64([math.log(2.0)]))
    r = 0.25 / 0.5
    assert_close(kl_penalty(logprobs, ref_logprobs, estimator="k3"), f64([(r - 1.0) - math.log(r)]))
    assert (kl_penalty(torch.randn(50), torch.randn(50), estimator="k3") >= 0).all()
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(logprobs, ref_logprobs, estimator="k2")


def test_clip_advantages() -> None:
    assert_close(clip_advantages(f64([-5.0, 0.5, 3.0]), 2.0), f64([-2.0, 0.5, 2.0]))
    with pytest.raises(ValueError, match="max_abs"):
        clip_advantages(f64([1.0]), 0.0)
