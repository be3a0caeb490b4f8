"""Losses on a differentiable reward of samples the policy generated with gradients: DRaFT, AlignProp, ReFL.

The reward r [B] is computed by a differentiable reward model on the (decoded) output of the sampler, so the loss's
gradient flows back through the reward into the denoising chain; the losses here are per sample, [B], and know
nothing of how r was obtained. Look them up by name with `make_reward_backprop_loss`:

    negative  ℓ_i = −r_i                             DRaFT, AlignProp
    target    ℓ_i = |r_i − target|                   AlignProp's aesthetic form
    refl      ℓ_i = scale · relu(threshold − r_i)    ReFL (ImageReward)

The regularisers users combine them with are elsewhere: ReFL's pretraining denoising loss on real data is
`data_denoising_loss` of mmalign.train.diffusion_pg (DLPO's data term), and DRaFT+'s KL to the base model along the trajectory is the sum over
steps of `mmalign.objectives.diffusion.gaussian_kl`.
"""

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from mmalign.objectives._options import check_options, lookup


def _check_rewards(rewards: Tensor) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")


def negative_reward_loss(rewards: Tensor) -> Tensor:
    """Maximise the reward of the generated sample by gradient ascent through the sampler.

    DRaFT (Clark et al., 2023; seed 004 §4.5.3 Eq. (28): J(θ) = E_{c, x_T}[r(sample(θ, c, x_T), c)]) and
    AlignProp (Prabhudesai et al., 2023; seed 004 §4.5.4: L_align = −1/|D| Σ_c R_φ(π_θ(x_T, c))):

        ℓ_i = −r_i
    """
    _check_rewards(rewards)
    return -rewards


def target_reward_loss(rewards: Tensor, target: float) -> Tensor:
    """Pull the reward towards a target value instead of without bound, which limits over-optimisation.

    AlignProp's aesthetic objective (Prabhudesai et al., 2023, code: |r − target| with target 10 for the LAION
    aesthetic score):

        ℓ_i = |r_i − target|
    """
    _check_rewards(rewards)
    return (rewards - target).abs()


def refl_loss(rewards: Tensor, threshold: float = 2.0, scale: float = 1e-3) -> Tensor:
    """Raise the reward of samples below a threshold and leave the others alone (ReFL's reward term).

    ReFL (Xu et al., 2023, ImageReward §4: L_reward = λ E_y[φ(r(y, g_θ(y)))]; seed 004 §4.5.2 prints
    J = J_pre + λ E[φ(r)] with φ a ReLU, which read literally would reward relu(r)). The objective as ImageReward's
    ReFL.py trains it is a loss on the reward, which is what this follows:

        ℓ_i = scale · relu(threshold − r_i)

    with threshold φ = 2 and scale λ = 1e-3 (`grad_scale`) as its defaults: samples scoring above φ contribute
    no gradient. Combine with the pretraining denoising loss on real data (J_pre) for ReFL's full objective.
    """
    _check_rewards(rewards)
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return scale * torch.relu(threshold - rewards)


REWARD_BACKPROP_LOSSES: dict[str, Callable[..., Tensor]] = {
    "negative": negative_reward_loss,
    "target": target_reward_loss,
    "refl": refl_loss,
}


def make_reward_backprop_loss(name: str, **options: Any) -> Callable[[Tensor], Tensor]:
    """The reward-backprop loss called `name` with its `options` bound: rewards [B] → losses [B]."""
    loss = lookup("reward-backprop loss", REWARD_BACKPROP_LOSSES, name)
    check_options("reward-backprop loss", name, loss, options, skip=1)
    return partial(loss, **options)
