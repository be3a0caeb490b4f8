import torch
from torch.testing import assert_close

from mmalign.objectives import sequence_logps


def f64(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


TOKEN_LOGPS = f64([[-1.0, -2.0, -3.0], [-0.5, -0.25, -4.0]])
MASK = torch.tensor([[True, True, False], [True, True, True]])


def test_sum_over_mask() -> None:
    assert_close(sequence_logps(TOKEN_LOGPS, MASK), f64([-1.0 - 2.0, -0.5 - 0.25 - 4.0]))


def test_length_normalised_mean() -> None:
    expected = f64([(-1.0 - 2.0) / 2, (-0.5 - 0.25 - 4.0) / 3])
    assert_close(sequence_logps(TOKEN_LOGPS, MASK.float(), normalize=True), expected)


def test_rlhf_v_dense_weighting() -> None:
    # Row 0: tokens u, c, u with γ = 5 -> (−1 + 5·(−2) − 3) / (2 + 5·1); row 1: third token masked out.
    gamma = 5.0
    changed = f64([[0, 1, 0], [1, 0, 1]])
    weights = 1.0 + (gamma - 1.0) * changed
    mask = f64([[1, 1, 1], [1, 1, 0]])
    expected_sums = [-1.0 + gamma * -2.0 - 3.0, gamma * -0.5 - 0.25]
    expected_norms = [2 + gamma * 1, 1 + gamma * 1]
    assert_close(sequence_logps(TOKEN_LOGPS, mask, weights=weights), f64(expected_sums))
    assert_close(
        sequence_logps(TOKEN_LOGPS, mask, weights=weights, normalize=True),
        f64([s / n for s, n in zip(expected_sums, expected_norms, strict=True)]),
    )


def test_empty_mask_row_scores_zero() -> None:
    mask = f64([[0, 0, 0], [1, 0, 0]])
    assert_close(sequence_logps(TOKEN_LOGPS, mask), f64([0.0, -0.5]))
    assert_close(sequence_logps(TOKEN_LOGPS, mask, normalize=True), f64([0.0, -0.5]))


def test_gradient_is_weight_over_normaliser() -> None:
    token_logps = TOKEN_LOGPS.clone().requires_grad_()
    weights = f64([[1.0, 3.0, 1.0], [1.0, 1.0, 2.0]])
    sequence_logps(token_logps, MASK, weights=weights, normalize=True).sum().backward()
    expected = f64([[1 / 4, 3 / 4, 0.0], [1 / 4, 1 / 4, 2 / 4]])
    assert_close(token_logps.grad, expected)
