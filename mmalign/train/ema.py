"""An exponential moving average of the trained weights, which a run evaluates and saves in their place.

Flow-GRPO and DiffusionNFT evaluate an EMA of the policy (`EMAModuleWrapper(decay=0.9, update_step_interval=8)` in
Flow-GRPO's trainer, interval 1 in DiffusionNFT's), as diffusers' training scripts do with `--use_ema`: single
policy-gradient updates are noisy, and their average is a steadier model than the last iterate. The average is
diffusers' `EMAModel`, updated every `every` optimizer steps; its decay warms up as min(decay, (1 + n)/(10 + n))
with n counting EMA updates (Flow-GRPO's wrapper counts optimizer steps instead), and the first update copies
the weights. Rollouts still sample with the trained weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel

from mmalign.train import checkpoint as ckpt

PART = "ema"  # the checkpoint part that holds a WeightAverage's state_dict


class WeightAverage:
    """The EMA of a module's trainable parameters, with a context that puts it in their place."""

    def __init__(self, module: torch.nn.Module, decay: float, every: int = 1):
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.every = every
        self._ema = EMAModel(self.params, decay=decay, foreach=True)

    def update(self, step: int) -> None:
        """Fold the weights after optimizer step `step` (counted from 1) into the average, every `every` steps."""
        if step % self.every == 0:
            self._ema.step(self.params)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The module holds the averaged weights inside the context and its trained weights again after it."""
        self._ema.store(self.params)
        self._ema.copy_to(self.params)
        try:
            yield
        finally:
            self._ema.restore(self.params)

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights by parameter name (the names of `trainable_state`) and the number of updates."""
        weights = {n: s.detach().clone() for n, s in zip(self.names, self._ema.shadow_params, strict=True)}
        return {"updates": self._ema.optimization_step, "weights": weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state["weights"]
        if set(weights) != set(self.names):
            raise ValueError("the checkpoint's EMA weights do not match the trained parameters")
        with torch.no_grad():
            for shadow, name in zip(self._ema.shadow_params, self.names, strict=True):
                shadow.copy_(weights[name])
        self._ema.optimization_step = int(state["updates"])


def saved_average(path: Path) -> dict[str, Any] | None:
    """A checkpoint's moving average (its `state_dict`), refused if non-finite; None if the run kept none."""
    if not (path / f"{PART}.json").exists():
        return None
    average = ckpt.load_state(path, PART)
    ckpt.require_finite(average["weights"], f"{path}/{PART}.safetensors")
    return average
