import json
import statistics

import pytest
import torch
from torch.testing import assert_close

from mmalign.objectives import (
    ADVANTAGE_ESTIMATORS,
    PerPromptStatTracker,
    RewardGroups,
    clip_advantages,
    dynamic_sampling_mask,
    group_normalized_advantages,
    make_advantage_estimator,
    remax_advantages,
    rloo_advantages,
    soft_overlong_punishment,
)

REWARDS = [1.0, 2.0, 4.0, 0.5, 0.5, 3.5, -1.0, 2.0, 2.5]  # 3 prompts x 3 samples


def f64(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def groups_of(values: list[float], size: int) -> list[list[float]]:
    return [values[i : i + size] for i in range(0, len(values), size)]


def expected(name: str, rewards: list[float], size: int) -> list[float]:
    """Each estimator written out with the statistics module and loops."""
    out: list[float] = []
    if name == "reinforce":
        mean = statistics.mean(rewards)
        return [r - mean for r in rewards]
    for group in groups_of(rewards, size):
        mean = statistics.mean(group)
        for i, r in enumerate(group):
            if name == "rloo":
                others = [x for j, x in enumerate(group) if j != i]
                out.append(r - sum(others) / len(others))
            elif name == "grpo":
                out.append((r - mean) / (statistics.stdev(group) + 1e-4))
            elif name == "dr_grpo":
                out.append(r - mean)
            elif name == "batch":
                out.append((r - mean) / (statistics.stdev(rewards) + 1e-4))
    return out


@pytest.mark.parametrize("name", ["reinforce", "rloo", "grpo", "dr_grpo", "batch"])
def test_estimators_match_explicit_loops(name: str) -> None:
    estimator = make_advantage_estimator(name)
    assert estimator.name == name
    advantages = estimator(f64(REWARDS), RewardGroups(size=3, keys=["a"] * 3 + ["b"] * 3 + ["c"] * 3))
    assert_close(advantages, f64(expected(name, REWARDS, 3)))


def test_reinforce_scaled_divides_by_batch_std() -> None:
    advantages = make_advantage_estimator("reinforce", scale=True, eps=1e-6)(f64(REWARDS), RewardGroups())
    mean, std = statistics.mean(REWARDS), statistics.stdev(REWARDS)
    assert_close(advantages, f64([(r - mean) / (std + 1e-6) for r in REWARDS]))
    # One sample has no spread: its advantage is 0, not NaN.
    assert_close(make_advantage_estimator("reinforce", scale=True)(f64([3.0]), RewardGroups()), f64([0.0]))


@pytest.mark.parametrize("name", ["reinforce", "rloo", "grpo", "dr_grpo", "batch"])
def test_a_group_of_equal_rewards_has_zero_advantages(name: str) -> None:
    rewards = f64([0.7, 0.7, 0.7, 0.0, 1.0, 0.5])
    advantages = make_advantage_estimator(name)(rewards, RewardGroups(size=3))
    if name == "reinforce":
        assert_close(make_advantage_estimator(name)(f64([0.7] * 3), RewardGroups()), f64([0.0] * 3))
    else:
        assert_close(advantages[:3], f64([0.0] * 3))
    assert torch.isfinite(advantages).all()


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_estimators_rank_samples_of_a_prompt_by_reward(name: str) -> None:
    """A better sample of the same prompt always gets a larger advantage (the update moves towards it)."""
    rewards = torch.randn(24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    keys = [f"p{i // 4}" for i in range(24)]
    options = {"buffer_size": 8, "min_count": 1} if name == "per_prompt" else {}
    advantages = make_advantage_estimator(name, **options)(rewards, RewardGroups(size=4, keys=keys))
    for group_r, group_a in zip(rewards.view(-1, 4), advantages.view(-1, 4), strict=True):
        assert torch.equal(group_r.argsort(), group_a.argsort())


def test_per_prompt_estimator_uses_keys_and_resumes() -> None:
    estimator = make_advantage_estimator("per_prompt", buffer_size=3, min_count=2)
    groups = RewardGroups(size=1, keys=["a", "b", "a"])
    first = estimator(torch.tensor([1.0, 5.0, 3.0]), groups)
    # "a": 2 rewards >= min_count -> its own population stats; "b": 1 < min_count -> the batch's.
    a_mean, a_std = statistics.mean([1.0, 3.0]), statistics.pstdev([1.0, 3.0])
    b_mean, b_std = statistics.mean([1.0, 5.0, 3.0]), statistics.pstdev([1.0, 5.0, 3.0])
    hand = [(1.0 - a_mean) / (a_std + 1e-6), (5.0 - b_mean) / (b_std + 1e-6), (3.0 - a_mean) / (a_std + 1e-6)]
    assert_close(first, torch.tensor(hand))

    resumed = make_advantage_estimator("per_prompt", buffer_size=3, min_count=2)
    resumed.load_state_dict(json.loads(json.dumps(estimator.state_dict())))
    second = RewardGroups(size=1, keys=["a", "a", "b"])
    assert_close(
        resumed(torch.tensor([7.0, 9.0, 6.0]), second), estimator(torch.tensor([7.0, 9.0, 6.0]), second)
    )
    with pytest.raises(ValueError, match=r"groups\.keys"):
        estimator(torch.zeros(3), RewardGroups(size=3))


def test_factory_names_unknown_estimators_and_options() -> None:
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'gae'; known: batch, dr_grpo, grpo"):
        make_advantage_estimator("gae")
    with pytest.raises(ValueError, match="has no option bufer_size"):
        make_advantage_estimator("per_prompt", bufer_size=3, min_count=1)
    with pytest.raises(ValueError, match="needs option buffer_size, min_count"):
        make_advantage_estimator("per_prompt")
    with pytest.raises(ValueError, match="has no option eps"):
        make_advantage_estimator("dr_grpo", eps=1e-3)


def test_stateless_estimators_refuse_foreign_state() -> None:
    grpo = make_advantage_estimator("grpo")
    assert grpo.state_dict() == {}
    grpo.load_state_dict({})
    with pytest.raises(ValueError, match="keeps no state"):
        grpo.load_state_dict({"stats": {"a": [1.0]}})


@pytest.mark.parametrize("name", ["rloo", "grpo", "dr_grpo", "batch"])
def test_group_estimators_reject_group_size_not_dividing_the_batch(name: str) -> None:
    with pytest.raises(ValueError, match="group_size=4 does not divide the number of rewards 6"):
        make_advantage_estimator(name)(torch.zeros(6), RewardGroups(size=4))
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        make_advantage_estimator(name)(torch.zeros(6), RewardGroups(size=1))


def test_group_estimators_reject_keys_that_mix_prompts_in_a_group() -> None:
    with pytest.raises(ValueError, match=r"groups\.keys: the group at samples 2\.\.3 mixes prompts"):
        make_advantage_estimator("grpo")(torch.arange(4.0), RewardGroups(size=2, keys=["a", "a", "b", "c"]))
    with pytest.raises(ValueError, match=r"groups\.keys has 3 entries"):
        make_advantage_estimator("reinforce")(torch.arange(4.0), RewardGroups(size=2, keys=["a", "a", "b"]))


@pytest.mark.parametrize("name", ["reinforce", "rloo", "grpo"])
def test_estimators_name_non_finite_rewards(name: str) -> None:
    with pytest.raises(ValueError, match=r"rewards are not finite at indices \[1\]"):
        make_advantage_estimator(name)(torch.tensor([0.0, float("nan"), 1.0, 2.0]), RewardGroups(size=2))


def test_reward_groups_rejects_bad_size() -> None:
    with pytest.raises(ValueError, match=r"groups\.size"):
        RewardGroups(size=0)


def test_group_normalized_scale_names_follow_trl() -> None:
    rewards = f64(REWARDS)
    assert_close(
        group_normalized_advantages(rewards, 3, scale=True), group_normalized_advantages(rewards, 3, "group")
    )
    assert_close(group_normalized_advantages(rewards, 3, scale=False), f64(expected("dr_grpo", REWARDS, 3)))
    assert_close(group_normalized_advantages(rewards, 3, scale="batch"), f64(expected("batch", REWARDS, 3)))
    with pytest.raises(ValueError, match="scale"):
        group_normalized_advantages(rewards, 3, scale="prompt")


@pytest.mark.parametrize("fn", [rloo_advantages, group_normalized_advantages])
@pytest.mark.parametrize(
    ("rewards", "group_size", "name"),
    [(torch.zeros(6), 4, "group_size"), (torch.zeros(6), 1, "group_size"), (torch.zeros(2, 3), 3, "rewards")],
)
def test_group_functions_reject_bad_arguments(fn, rewards: torch.Tensor, group_size: int, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        fn(rewards, group_size)


def test_remax_subtracts_greedy_baseline() -> None:
    assert_close(remax_advantages(f64([1.0, 0.2]), f64([0.4, 0.7])), f64([0.6, -0.5]))
    with pytest.raises(ValueError, match="greedy_rewards"):
        remax_advantages(torch.zeros(2), torch.zeros(3))


def test_stat_tracker_batch_scale_uses_prompt_mean_and_batch_std() -> None:
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2, scale="batch")
    rewards = [0.999, 0.998, 0.1, 0.9]  # "easy" is saturated: its own std (5e-4) would inflate its noise
    advantages = tracker.update(["easy", "easy", "hard", "hard"], torch.tensor(rewards))
    batch_std = statistics.pstdev(rewards)
    hand = [
        0.0005 / (batch_std + 1e-6),
        -0.0005 / (batch_std + 1e-6),
        -0.4 / (batch_std + 1e-6),
        0.4 / (batch_std + 1e-6),
    ]
    assert_close(advantages, torch.tensor(hand))
    with pytest.raises(ValueError, match="scale"):
        PerPromptStatTracker(4, 2, scale="group")


def test_stat_tracker_keeps_the_last_buffer_size_rewards() -> None:
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2)
    tracker.update(["a", "a"], torch.tensor([1.0, 3.0]))
    advantages = tracker.update(["a", "a"], torch.tensor([7.0, 9.0]))
    kept = [3.0, 7.0, 9.0]  # 1.0 fell out of the buffer
    mean, std = statistics.mean(kept), statistics.pstdev(kept)
    assert_close(advantages, torch.tensor([(7.0 - mean) / (std + 1e-6), (9.0 - mean) / (std + 1e-6)]))
    assert tracker.state_dict() == {"stats": {"a": kept}}


@pytest.mark.parametrize(
    ("buffer_size", "min_count", "name"), [(0, 1, "buffer_size"), (4, 5, "min_count"), (4, 0, "min_count")]
)
def test_stat_tracker_rejects_bad_arguments(buffer_size: int, min_count: int, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        PerPromptStatTracker(buffer_size, min_count)


def test_stat_tracker_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="prompts"):
        PerPromptStatTracker(4, 2).update(["a"], torch.zeros(2))


def test_clip_advantages() -> None:
    assert_close(clip_advantages(f64([-5.0, 0.5, 3.0]), 2.0), f64([-2.0, 0.5, 2.0]))
    with pytest.raises(ValueError, match="max_abs"):
        clip_advantages(f64([1.0]), 0.0)


def test_dynamic_sampling_keeps_groups_whose_rewards_differ() -> None:
    rewards = [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.2000001, 0.2]
    keep = []
    for group in groups_of(rewards, 3):
        keep += [len(set(group)) > 1] * 3
    assert dynamic_sampling_mask(f64(rewards), 3).tolist() == keep
    # With a tolerance the last group's float noise counts as equal.
    assert dynamic_sampling_mask(f64(rewards), 3, atol=1e-3).tolist() == keep[:9] + [False] * 3
    with pytest.raises(ValueError, match="group_size=5 does not divide"):
        dynamic_sampling_mask(f64(rewards), 5)
    with pytest.raises(ValueError, match="atol"):
        dynamic_sampling_mask(f64(rewards), 3, atol=-1.0)


def test_soft_overlong_punishment_is_dapo_piecewise() -> None:
    lengths = [0, 50, 80, 81, 90, 100, 101, 500]
    hand = []
    for n in lengths:  # L_max = 100, L_cache = 20
        hand.append(0.0 if n <= 80 else (80 - n) / 20 if n <= 100 else -1.0)
    assert_close(soft_overlong_punishment(torch.tensor(lengths), 100, 20), torch.tensor(hand))
    assert soft_overlong_punishment(torch.tensor([90]), 100, 20).item() == -0.5  # trl's docstring example
    # No cache: a hard cut at L_max.
    assert_close(soft_overlong_punishment(torch.tensor([100, 101]), 100, 0), torch.tensor([0.0, -1.0]))


@pytest.mark.parametrize(
    ("max_len", "cache", "lengths", "name"),
    [(0, 0, [1], "max_completion_length"), (10, 11, [1], "soft_punish_cache"), (10, 2, [-1], "lengths")],
)
def test_soft_overlong_punishment_rejects_bad_arguments(
    max_len: int, cache: int, lengths: list, name: str
) -> None:
    with pytest.raises(ValueError, match=name):
        soft_overlong_punishment(torch.tensor(lengths), max_len, cache)
