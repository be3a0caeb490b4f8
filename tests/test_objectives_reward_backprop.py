import pytest
import torch
from torch.distributions import Normal, kl_divergence
from torch.testing import assert_close

from mmalign.objectives import (
    REWARD_BACKPROP_LOSSES,
    gaussian_kl,
    make_reward_backprop_loss,
    negative_reward_loss,
    refl_loss,
    target_reward_loss,
)

REWARDS = [-1.0, 0.5, 2.0, 3.5]


def f64(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_losses_by_hand() -> None:
    rewards = f64(REWARDS)
    assert_close(negative_reward_loss(rewards), f64([-r for r in REWARDS]))
    assert_close(target_reward_loss(rewards, target=1.0), f64([abs(r - 1.0) for r in REWARDS]))
    # ImageReward's ReFL.py defaults: relu(2 − r) · 1e-3.
    assert_close(refl_loss(rewards), f64([max(2.0 - r, 0.0) * 1e-3 for r in REWARDS]))
    assert_close(refl_loss(rewards, threshold=0.0, scale=2.0), f64([max(-r, 0.0) * 2.0 for r in REWARDS]))


def test_gradients_move_rewards_the_right_way() -> None:
    """Descending each loss raises rewards below the goal, and ReFL leaves samples above its threshold alone."""
    rewards = f64(REWARDS).requires_grad_()
    negative_reward_loss(rewards).sum().backward()
    assert_close(rewards.grad, f64([-1.0] * 4))

    rewards.grad = None
    target_reward_loss(rewards, target=1.0).sum().backward()
    assert_close(rewards.grad, f64([-1.0, -1.0, 1.0, 1.0]))  # towards the target from both sides

    rewards.grad = None
    refl_loss(rewards).sum().backward()
    assert_close(rewards.grad, f64([-1e-3, -1e-3, 0.0, 0.0]))  # r = 2 sits on the kink: relu'(0) = 0


def test_factory_binds_options_and_names_errors() -> None:
    assert sorted(REWARD_BACKPROP_LOSSES) == ["negative", "refl", "target"]
    rewards = f64(REWARDS)
    assert_close(make_reward_backprop_loss("target", target=10.0)(rewards), target_reward_loss(rewards, 10.0))
    assert_close(make_reward_backprop_loss("refl", scale=1.0)(rewards), refl_loss(rewards, scale=1.0))
    with pytest.raises(
        ValueError, match=r"unknown reward-backprop loss 'draft'; known: negative, refl, target"
    ):
        make_reward_backprop_loss("draft")
    with pytest.raises(ValueError, match="needs option target"):
        make_reward_backprop_loss("target")
    with pytest.raises(ValueError, match="has no option phi; its options: threshold, scale"):
        make_reward_backprop_loss("refl", phi=2.0)


def test_losses_reject_bad_inputs() -> None:
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        negative_reward_loss(torch.zeros(2, 1))
    with pytest.raises(ValueError, match="scale"):
        refl_loss(torch.zeros(2), scale=0.0)


def test_gaussian_kl_matches_torch_distributions() -> None:
    generator = torch.Generator().manual_seed(0)
    mean_p = torch.randn(3, 2, 4, 4, generator=generator, dtype=torch.float64)
    mean_q = torch.randn(3, 2, 4, 4, generator=generator, dtype=torch.float64)
    for std in (0.3, torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64).view(3, 1, 1, 1)):
        scale = torch.as_tensor(std, dtype=torch.float64).expand_as(mean_p)
        expected = kl_divergence(Normal(mean_p, scale), Normal(mean_q, scale)).flatten(1).mean(1)
        assert_close(gaussian_kl(mean_p, mean_q, std), expected)
    assert_close(gaussian_kl(mean_p, mean_p, 0.3), torch.zeros(3, dtype=torch.float64))


def test_gaussian_kl_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="std"):
        gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="mean_q"):
        gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
