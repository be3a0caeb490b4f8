"""Modality-agnostic protocols and types shared by objectives, adapters and the trainer."""

from mmalign.core.policy import DiffusionPolicy, SequencePolicy
from mmalign.core.reward import Reward, check_rewards
from mmalign.core.types import SequenceLogProbs, Trajectory

__all__ = [
    "DiffusionPolicy",
    "Reward",
    "SequenceLogProbs",
    "SequencePolicy",
    "Trajectory",
    "check_rewards",
]
