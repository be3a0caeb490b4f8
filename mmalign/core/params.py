"""Trainable-parameter state shared by every policy: what checkpoints save and restore."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mmalign.core.errors import RecipeError


@dataclass
class LoraSpec:
    """LoRA settings passed to peft; `target_modules="all-linear"` lets each adapter pick its default targets."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"model.lora.r must be >= 1, got {self.r}")
        if not self.alpha > 0:
            raise ValueError(f"model.lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        targets = [self.target_modules] if isinstance(self.target_modules, str) else self.target_modules
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(
                f"model.lora.target_modules must be 'all-linear', a module-name regex or a list of module names; "
                f"got {self.target_modules!r}"
            )


LORA_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Embedding)


def check_lora_targets(module: torch.nn.Module, targets: str | list[str]) -> None:
    """Refuse LoRA targets that match no layer of `module` (peft's matching: a list entry names a module or the
    end of its dotted name, a string other than 'all-linear' is a regex over full names), listing the layers."""
    if targets == "all-linear":
        return
    names = [n for n, m in module.named_modules() if isinstance(m, LORA_LAYERS)]
    if isinstance(targets, str):
        unmatched = [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    else:
        unmatched = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unmatched:
        layers = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise RecipeError(
            f"model.lora.target_modules: {', '.join(map(repr, unmatched))} matches no layer of the model; "
            f"its layers are named: {', '.join(layers)}"
        )


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
