import math

import pytest
import torch
from torch.testing import assert_close

from mmalign.objectives import best_of_n_indices, bradley_terry_loss, nll_loss


def f64(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_nll_is_token_mean_over_mask() -> None:
    token_logps = f64([[-1.0, -2.0, -9.0], [-0.1, -0.2, -0.3]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert_close(nll_loss(token_logps, mask), f64([1.5, 0.6 / 3]))


def test_bradley_terry_matches_pairwise_probability() -> None:
    # Seed 004 Eq. (2): P(i > j) = exp(s_i) / (exp(s_i) + exp(s_j)); the loss is −log P.
    chosen, rejected = [2.0, -1.0], [0.5, 0.5]
    expected = [
        -math.log(math.exp(c) / (math.exp(c) + math.exp(r))) for c, r in zip(chosen, rejected, strict=True)
    ]
    assert_close(bradley_terry_loss(f64(chosen), f64(rejected)), f64(expected))


def test_bradley_terry_margin_and_gradient() -> None:
    chosen = f64([2.0]).requires_grad_()
    rejected = f64([0.5])
    loss = bradley_terry_loss(chosen, rejected, margin=1.0)
    assert_close(loss, f64([math.log1p(math.exp(-0.5))]))
    loss.sum().backward()
    # d/dr_w −log σ(d) = −σ(−d) = −1 / (1 + e^{d}) with d = 0.5: pushes the chosen score up.
    assert_close(chosen.grad, f64([-1.0 / (1.0 + math.exp(0.5))]))
    assert_close(bradley_terry_loss(chosen, rejected, margin=f64([1.0])), loss)


def test_best_of_n_returns_flat_indices_with_first_tie() -> None:
    rewards = f64([0.1, 0.9, 0.3, 5.0, 5.0, 1.0])
    assert best_of_n_indices(rewards, group_size=3).tolist() == [1, 3]
    assert best_of_n_indices(rewards, group_size=2).tolist() == [1, 3, 4]
    assert best_of_n_indices(rewards, group_size=1).tolist() == list(range(6))
    assert best_of_n_indices(rewards, 3).dtype == torch.long


@pytest.mark.parametrize(
    ("rewards", "group_size", "name"),
    [(torch.zeros(6), 4, "group_size"), (torch.zeros(6), 0, "group_size"), (torch.zeros(2, 3), 3, "rewards")],
)
def test_best_of_n_rejects_bad_arguments(rewards: torch.Tensor, group_size: int, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        best_of_n_indices(rewards, group_size)
