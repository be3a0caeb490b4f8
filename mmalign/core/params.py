"""Trainable-parameter state shared by every policy: what checkpoints save and restore."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class LoraSpec:
    """LoRA settings passed to peft; `target_modules="all-linear"` lets each adapter pick its default targets."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters that train (a LoRA adapter, or everything when fully fine-tuning)."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a `trainable_state` back in, refusing a checkpoint whose names do not match exactly."""
    params = dict(module.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"checkpoint does not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


class TrainableModule:
    """The trainable-state part of the policy protocol for adapters whose network is `self.module`."""

    module: torch.nn.Module

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        return (p for p in self.module.parameters() if p.requires_grad)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.module)

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable(self.module, state)
