"""KTO's reference point z with two processes (gloo on localhost): averaged over processes first, then clamped."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from accelerate.state import PartialState

from mmalign.train.kto import kto_reference_point

# This process's mismatched log-ratios: means +2 and −5, so the batch mean is −1.5 and z = max(0, −1.5) = 0.
# Clamping each process's mean first would give mean(2, 0) = 1.
LOCAL_LOGRATIOS = ([1.0, 3.0, 2.0, 2.0], [-4.0, -6.0, -5.0, -5.0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference_point_on_rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        OMP_NUM_THREADS="1",
    )
    PartialState._reset_state()  # a forked child inherits the parent's single-process state; start afresh
    state = PartialState(cpu=True)
    assert state.num_processes == 2 and torch.distributed.get_backend() == "gloo"
    z = kto_reference_point(torch.tensor(LOCAL_LOGRATIOS[rank]))
    Path(out_dir, f"z{rank}").write_text(repr(z.item()))
    state.destroy_process_group()


def test_kto_reference_point_averages_processes_before_clamping(tmp_path: Path) -> None:
    # fork, not spawn: the children inherit the imported modules instead of importing them again (a minute)
    mp.start_processes(
        _reference_point_on_rank, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="fork"
    )
    assert [float((tmp_path / f"z{rank}").read_text()) for rank in (0, 1)] == [0.0, 0.0]
