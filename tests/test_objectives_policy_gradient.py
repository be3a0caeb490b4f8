import math
import statistics

import pytest
import torch
from torch.testing import assert_close

from mmalign.objectives import (
    advantages,
    aggregate_token_losses,
    clipped_surrogate,
    gae_advantages,
    kl_penalty,
    kl_shaped_rewards,
    masked_whiten,
    ppo_clip_loss,
    reinforce_loss,
    value_loss,
)
from mmalign.objectives import policy_gradient as PG


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


def test_kl_penalty_estimators_by_hand() -> None:
    logprobs, ref_logprobs = f64([math.log(0.5)]), f64([math.log(0.25)])
    assert_close(kl_penalty(logprobs, ref_logprobs), f64([math.log(2.0)]))
    r = 0.25 / 0.5
    assert_close(kl_penalty(logprobs, ref_logprobs, estimator="k3"), f64([(r - 1.0) - math.log(r)]))
    assert (kl_penalty(torch.randn(50), torch.randn(50), estimator="k3") >= 0).all()
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(logprobs, ref_logprobs, estimator="k2")


def surrogate(ratio: float, advantage: float, eps_low: float, eps_high: float) -> float:
    clipped = min(max(ratio, 1.0 - eps_low), 1.0 + eps_high)
    return max(-advantage * ratio, -advantage * clipped)


def test_clipped_surrogate_decoupled_ranges_match_token_loop() -> None:
    ratios = [[1.25, 0.7, 1.1], [1.25, 0.75, 3.0]]
    adv, mask = [1.0, -1.0], [[1, 1, 1], [1, 1, 0]]
    logprobs = f64([[math.log(r) for r in row] for row in ratios])
    losses, metrics = clipped_surrogate(
        logprobs,
        torch.zeros(2, 3, dtype=torch.float64),
        f64(adv),
        torch.tensor(mask),
        epsilon=0.2,
        epsilon_high=0.28,
    )
    hand = [
        [surrogate(r, a, 0.2, 0.28) if m else 0.0 for r, m in zip(row, mrow, strict=True)]
        for row, a, mrow in zip(ratios, adv, mask, strict=True)
    ]
    assert_close(losses, f64(hand))
    kept = [(1.25, 1.0), (0.7, 1.0), (1.1, 1.0), (1.25, -1.0), (0.75, -1.0)]
    assert_close(metrics["ratio_mean"], f64(sum(r for r, _ in kept) / 5))
    assert_close(metrics["clip_fraction"], f64(sum(r < 0.8 or r > 1.28 for r, _ in kept) / 5))
    assert_close(metrics["clip_low_fraction"], f64(sum(r < 0.8 and a < 0 for r, a in kept) / 5))
    assert_close(metrics["clip_high_fraction"], f64(0.0))
    assert_close(metrics["approx_kl"], f64(sum(k3(r) for r, _ in kept) / 5))


def test_clip_higher_keeps_the_gradient_of_a_rising_positive_token() -> None:
    def grad(epsilon_high: float | None) -> float:
        logprobs = f64([math.log(1.25)]).requires_grad_()
        losses, _ = clipped_surrogate(
            logprobs, f64([0.0]), f64([1.0]), epsilon=0.2, epsilon_high=epsilon_high
        )
        losses.sum().backward()
        return logprobs.grad.item()

    assert grad(None) == 0.0  # symmetric 0.2: ratio 1.25 is clipped, no gradient
    assert grad(0.28) == pytest.approx(-1.25)  # DAPO's clip-higher: −A·ρ, the token is still pushed up


def test_sequence_level_ratio_is_gspo() -> None:
    log_ratios = [[0.1, 0.3, 5.0], [-0.2, 0.0, 0.0], [0.0, 0.0, 0.0]]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # a single-token response and an empty row
    logprobs = f64(log_ratios).requires_grad_()
    old = torch.zeros(3, 3, dtype=torch.float64)
    adv = [1.0, -1.0, 1.0]
    token_losses, metrics = clipped_surrogate(
        logprobs, old, f64(adv), mask, epsilon=0.2, epsilon_high=0.3, importance_sampling_level="sequence"
    )
    s0, s1 = math.exp((0.1 + 0.3) / 2), math.exp(-0.2)  # exp(mean log ratio over the response)
    per_sample = aggregate_token_losses(token_losses, mask, "grpo")
    assert_close(per_sample, f64([surrogate(s0, 1.0, 0.2, 0.3), surrogate(s1, -1.0, 0.2, 0.3), 0.0]))
    assert_close(metrics["ratio_mean"], f64((2 * s0 + s1) / 3))
    per_sample.sum().backward()
    # d(−A·s)/d log π_t = −A·s/|y| for each token of an unclipped sequence, 0 on padding and on the empty row.
    assert_close(logprobs.grad, f64([[-s0 / 2, -s0 / 2, 0.0], [s1, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_sequence_level_clips_the_whole_sequence() -> None:
    logprobs = f64([[0.2, 0.2]]).requires_grad_()
    losses, metrics = clipped_surrogate(
        logprobs, torch.zeros(1, 2, dtype=torch.float64), f64([1.0]), importance_sampling_level="sequence"
    )
    losses.sum().backward()
    assert_close(losses, f64([[-1.2, -1.2]]))  # s = e^0.2 = 1.22 > 1 + ε
    assert_close(logprobs.grad, torch.zeros(1, 2, dtype=torch.float64))
    assert_close(metrics["clip_high_fraction"], f64(1.0))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon_high": -0.1}, "epsilon_high"),
        ({"importance_sampling_level": "seq"}, "importance_sampling_level"),
    ],
)
def test_clipped_surrogate_rejects_bad_options(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        clipped_surrogate(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), **kwargs)


def test_clipped_surrogate_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="old_logprobs"):
        clipped_surrogate(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2))
    with pytest.raises(ValueError, match="advantages"):
        clipped_surrogate(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))


TOKEN_LOSSES = [[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0], [1.0, -1.0, 2.0, 5.0]]
MASK = [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]  # 3 tokens, 1 token, empty, 4 tokens


def masked_rows() -> list[list[float]]:
    return [
        [x for x, m in zip(row, mrow, strict=True) if m] for row, mrow in zip(TOKEN_LOSSES, MASK, strict=True)
    ]


def test_aggregations_match_loops() -> None:
    rows, losses, mask = masked_rows(), f64(TOKEN_LOSSES), torch.tensor(MASK)
    total_tokens = sum(len(r) for r in rows)
    assert_close(aggregate_token_losses(losses, mask, "grpo"), f64([sum(r) / max(len(r), 1) for r in rows]))
    assert_close(aggregate_token_losses(losses, mask, "bnpo"), f64([sum(r) * 4 / total_tokens for r in rows]))
    assert_close(
        aggregate_token_losses(losses, mask, "dapo", tokens_per_sample=2.5), f64([sum(r) / 2.5 for r in rows])
    )
    assert_close(
        aggregate_token_losses(losses, mask, "dr_grpo", max_completion_length=6),
        f64([sum(r) / 6 for r in rows]),
    )


def test_dapo_mean_over_split_batches_is_the_global_token_mean() -> None:
    """Micro-batches on several processes, averaged per sample by the trainer, give trl's token-level loss."""
    generator = torch.Generator().manual_seed(0)
    losses = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    lengths = [6, 1, 3, 0, 5, 2, 6, 4]
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    token_mean = sum(losses[i, t].item() for i in range(8) for t in range(lengths[i])) / sum(lengths)
    per_sample = torch.cat(
        [
            aggregate_token_losses(
                losses[i : i + 2], mask[i : i + 2], "dapo", tokens_per_sample=sum(lengths) / 8
            )
            for i in range(0, 8, 2)
        ]
    )
    assert_close(per_sample.mean(), f64(token_mean))
    # bnpo normalises each micro-batch by its own tokens, so the split changes the objective.
    bnpo = torch.cat(
        [aggregate_token_losses(losses[i : i + 2], mask[i : i + 2], "bnpo") for i in range(0, 8, 2)]
    )
    assert abs(bnpo.mean().item() - token_mean) > 1e-3
    assert_close(aggregate_token_losses(losses, mask, "bnpo").mean(), f64(token_mean))  # one batch: equal


@pytest.mark.parametrize(
    ("loss_type", "kwargs", "message"),
    [
        ("dapo", {}, "tokens_per_sample"),
        ("dapo", {"tokens_per_sample": 0.0}, "tokens_per_sample"),
        ("dr_grpo", {}, "max_completion_length"),
        ("dr_grpo", {"max_completion_length": 3}, "a response has 4 tokens > max_completion_length=3"),
        ("token", {}, "loss_type"),
    ],
)
def test_aggregation_rejects_missing_or_bad_normalisers(loss_type: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        aggregate_token_losses(f64(TOKEN_LOSSES), torch.tensor(MASK), loss_type, **kwargs)


def test_policy_gradient_keeps_the_moved_advantage_names() -> None:
    for name in (
        "PerPromptStatTracker",
        "clip_advantages",
        "group_normalized_advantages",
        "remax_advantages",
        "rloo_advantages",
    ):
        assert getattr(PG, name) is getattr(advantages, name)


def gae_loop(
    rewards: list[float], values: list[float], length: int, gamma: float, lam: float
) -> tuple[list, list]:
    """GAE for one response written as the textbook reverse recursion, padding left at 0."""
    adv = [0.0] * len(rewards)
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        next_adv = adv[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        adv[t] = delta + gamma * lam * next_adv
    returns = [adv[t] + values[t] if t < length else 0.0 for t in range(len(rewards))]
    return adv, returns


def test_gae_matches_reverse_loop() -> None:
    generator = torch.Generator().manual_seed(1)
    rewards = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    values = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    lengths = [5, 3, 1, 0]
    mask = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])
    rewards[mask == 0], values[mask == 0] = 100.0, -100.0  # padding must not leak in
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    for i, n in enumerate(lengths):
        hand_adv, hand_ret = gae_loop(rewards[i].tolist(), values[i].tolist(), n, 0.9, 0.8)
        assert_close(adv[i], f64(hand_adv))
        assert_close(ret[i], f64(hand_ret))
    # A single-token response: A = r − V, R = r.
    assert_close(adv[2, 0], rewards[2, 0] - values[2, 0])
    assert_close(ret[2, 0], rewards[2, 0])


def test_gae_with_lambda_one_is_the_discounted_return_minus_value() -> None:
    rewards, values = f64([[0.0, 0.0, 1.0]]), f64([[0.3, 0.5, 0.2]])
    adv, ret = gae_advantages(rewards, values, torch.ones(1, 3), gamma=0.5, lam=1.0)
    assert_close(ret, f64([[0.25, 0.5, 1.0]]))  # Σ_l γ^l r_{t+l}
    assert_close(adv, ret - values)


@pytest.mark.parametrize(("kwargs", "name"), [({"gamma": 1.5}, "gamma"), ({"lam": -0.1}, "lam")])
def test_gae_rejects_bad_coefficients(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        gae_advantages(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), **kwargs)


def test_gae_rejects_left_padded_mask() -> None:
    with pytest.raises(ValueError, match=r"mask must be right-padded .* rows \[1\]"):
        gae_advantages(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([[1, 1, 0], [0, 1, 1]]))


def test_value_loss_matches_hand_formula() -> None:
    values = f64([[1.0, 0.0, 2.0, 7.0]]).requires_grad_()
    old, returns, mask = (
        f64([[0.5, 0.5, 1.0, 0.0]]),
        f64([[1.2, 1.0, 0.0, 0.0]]),
        torch.tensor([[1, 1, 1, 0]]),
    )
    losses, metrics = value_loss(values, old, returns, mask, clip_range_value=0.2)
    hand, clipped_larger = [], []
    for v, o, r in zip([1.0, 0.0, 2.0], [0.5, 0.5, 1.0], [1.2, 1.0, 0.0], strict=True):
        vc = min(max(v, o - 0.2), o + 0.2)
        hand.append(0.5 * max((v - r) ** 2, (vc - r) ** 2))
        clipped_larger.append((vc - r) ** 2 > (v - r) ** 2)
    assert_close(losses, f64([[*hand, 0.0]]))
    assert_close(metrics["value_clip_fraction"], f64(sum(clipped_larger) / 3))
    losses.sum().backward()
    # Token 0: the clipped term is the larger and constant in V, so no gradient; others (V − R).
    assert_close(values.grad, f64([[0.0, 0.0 - 1.0, 2.0 - 0.0, 0.0]]))
    with pytest.raises(ValueError, match="clip_range_value"):
        value_loss(values, old, returns, mask, clip_range_value=0.0)


def test_masked_whiten_matches_statistics() -> None:
    values, mask = f64([[1.0, 2.0, 9.0], [4.0, 8.0, 9.0]]), torch.tensor([[1, 1, 0], [1, 1, 0]])
    kept = [1.0, 2.0, 4.0, 8.0]
    mean, std = statistics.mean(kept), statistics.stdev(kept)
    scale = 1.0 / math.sqrt(std**2 + 1e-8)
    assert_close(
        masked_whiten(values, mask),
        f64([[(1 - mean) * scale, (2 - mean) * scale, 0.0], [(4 - mean) * scale, (8 - mean) * scale, 0.0]]),
    )
    unshifted = masked_whiten(values, mask, shift_mean=False)
    assert_close(unshifted[0, :2], f64([(1 - mean) * scale + mean, (2 - mean) * scale + mean]))
    with pytest.raises(ValueError, match="at least 2"):
        masked_whiten(values, torch.tensor([[1, 0, 0], [0, 0, 0]]))


def test_kl_shaped_rewards_put_the_score_on_the_last_response_token() -> None:
    logprobs = f64([[-1.0, -2.0, -0.5, 0.0], [-0.3, 0.0, 0.0, 0.0]])
    ref = f64([[-1.5, -1.0, -0.5, 4.0], [-0.1, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])  # a single-token response in row 1
    scores = f64([2.0, -1.0])
    for estimator in ("k1", "k3"):
        shaped = kl_shaped_rewards(scores, logprobs, ref, mask, kl_coef=0.1, estimator=estimator)
        hand = [[0.0] * 4 for _ in range(2)]
        for i, n in enumerate([3, 1]):
            for t in range(n):
                lp, rp = logprobs[i, t].item(), ref[i, t].item()
                kl = lp - rp if estimator == "k1" else math.exp(rp - lp) - 1 - (rp - lp)
                hand[i][t] = -0.1 * kl + (scores[i].item() if t == n - 1 else 0.0)
        assert_close(shaped, f64(hand))


def test_kl_shaped_rewards_reject_empty_rows_and_bad_coefficients() -> None:
    with pytest.raises(ValueError, match=r"mask rows \[1\] have no response token"):
        kl_shaped_rewards(
            f64([1.0, 1.0]), torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([[1, 0], [0, 0]]), 0.1
        )
    with pytest.raises(ValueError, match="kl_coef"):
        kl_shaped_rewards(f64([1.0]), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), -0.1)
    with pytest.raises(ValueError, match="scores"):
        kl_shaped_rewards(f64([1.0]), torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 2), 0.1)
