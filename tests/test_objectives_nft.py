"""DiffusionNFT's objective against hand-computed values, its minimiser, and the optimality probability."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmalign.objectives.diffusion import nft_loss, nft_optimality


def _case(seed: int, shape=(3, 2, 4)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(3)]


@pytest.mark.parametrize("adaptive", [False, True])
def test_nft_loss_is_the_written_out_two_branch_objective(adaptive):
    output, old, target = _case(0)
    r = torch.tensor([0.9, 0.5, 0.1])
    beta = 0.3
    losses, metrics = nft_loss(output, old, target, r, beta, adaptive=adaptive)

    v, o, y = (a.double().numpy().reshape(3, -1) for a in (output, old, target))
    expected = []
    for b in range(3):
        pos = (1 - beta) * o[b] + beta * v[b] - y[b]
        neg = (1 + beta) * o[b] - beta * v[b] - y[b]
        e_pos, e_neg = (pos**2).mean(), (neg**2).mean()
        if adaptive:
            e_pos, e_neg = e_pos / np.abs(pos).mean(), e_neg / np.abs(neg).mean()
        expected.append((r[b].item() * e_pos + (1 - r[b].item()) * e_neg) / beta)
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-5)
    assert metrics["optimality"].item() == pytest.approx(0.5)
    assert metrics["old_deviation"].item() == pytest.approx(((v - o) ** 2).mean(), rel=1e-5)


@pytest.mark.parametrize("r", [0.9, 0.2])
def test_nft_loss_minimiser_moves_from_the_old_velocity_along_the_sample(r):
    """Gradient descent on the loss from v = v_old ends at v_old + (2r − 1)(target − v_old)/β (a closed form)."""
    _, old, target = _case(1, shape=(1, 6))
    beta = 0.5
    v = old.clone().requires_grad_(True)
    optim = torch.optim.SGD([v], lr=0.5)
    for _ in range(400):
        loss, _ = nft_loss(v, old, target, torch.tensor([r]), beta)
        optim.zero_grad()
        loss.sum().backward()
        optim.step()
    torch.testing.assert_close(v.detach(), old + (2 * r - 1) * (target - old) / beta, rtol=1e-4, atol=1e-4)


def test_positive_samples_pull_the_velocity_towards_their_target_and_negatives_push_it_away():
    output, _, target = _case(2, shape=(2, 5))
    old = output.detach().clone()
    v = output.clone().requires_grad_(True)
    loss, _ = nft_loss(v, old, target, torch.tensor([1.0, 0.0]), beta=1.0)
    loss.sum().backward()
    direction = (target - old).flatten(1)
    assert (v.grad.flatten(1)[0] @ direction[0]) < 0  # descent moves sample 0 towards its target
    assert (v.grad.flatten(1)[1] @ direction[1]) > 0  # and sample 1 away from it
    v.grad = None
    nft_loss(v, old, target, torch.tensor([0.5, 0.5]), beta=1.0)[0].sum().backward()
    assert v.grad.abs().max() < 1e-6  # r = ½ at v = v_old: no pull either way


def test_optimality_probability_clips_the_normalised_advantage():
    advantages = torch.tensor([-10.0, -2.5, 0.0, 2.5, 5.0, 7.0])
    expected = [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert nft_optimality(advantages, 5.0).tolist() == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"beta": 0.0}, "beta"), ({"beta": -1.0}, "beta")],
)
def test_bad_nft_settings_are_named(kwargs, match):
    output, old, target = _case(3)
    with pytest.raises(ValueError, match=match):
        nft_loss(output, old, target, torch.full((3,), 0.5), **kwargs)
    with pytest.raises(ValueError, match="max_abs"):
        nft_optimality(torch.zeros(2), 0.0)
    with pytest.raises(ValueError, match="one shape"):
        nft_loss(output, old[:, :1], target, torch.full((3,), 0.5), 1.0)
