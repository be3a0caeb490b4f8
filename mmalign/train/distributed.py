"""Where this process stands among the training processes, for rollouts whose statistics span all of them."""

from __future__ import annotations

import torch


def process_info() -> tuple[int, int]:
    """(this process's index, number of processes)."""
    from accelerate.state import PartialState

    state = PartialState()
    return state.process_index, state.num_processes


def gather_all(values: torch.Tensor) -> torch.Tensor:
    """Every process's [N, ...] values concatenated in process order (the tensor itself on one process)."""
    if process_info()[1] == 1:
        return values
    from accelerate.utils import gather

    return gather(values)


def this_process(values: torch.Tensor, n_local: int) -> torch.Tensor:
    """This process's rows of a gathered tensor."""
    rank = process_info()[0]
    return values[rank * n_local : (rank + 1) * n_local]
