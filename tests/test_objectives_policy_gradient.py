import math

import pytest
import torch
from torch.testing import assert_close

from mmalign.objectives import advantages, kl_penalty, ppo_clip_loss, reinforce_loss
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


def test_policy_gradient_keeps_the_moved_advantage_names() -> None:
    for name in (
        "PerPromptStatTracker",
        "clip_advantages",
        "group_normalized_advantages",
        "remax_advantages",
        "rloo_advantages",
    ):
        assert getattr(PG, name) is getattr(advantages, name)
