"""Atomic, pickle-free checkpoints: trainable weights, optimizer, scheduler and RNG state in safetensors + JSON.

A checkpoint is a directory `step-XXXXXXXX/` written under a temporary name and renamed into place, so a run
killed at any moment leaves either a complete checkpoint or none.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested structure by a reference into `tensors` (JSON-safe skeleton)."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [_split_tensors(k, f"{prefix}.k{i}", tensors), _split_tensors(v, f"{prefix}.{i}", tensors)]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, (list, tuple)):
        kind = "__tuple__" if isinstance(obj, tuple) else "__list__"
        return {kind: [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(obj.copy())
        return {"__ndarray__": prefix}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix}")


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__dict__" in obj:
            return {_join_tensors(k, tensors): _join_tensors(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_join_tensors(v, tensors) for v in obj["__tuple__"])
        if "__list__" in obj:
            return [_join_tensors(v, tensors) for v in obj["__list__"]]
    return obj


def save_state(path: Path, name: str, state: Any) -> None:
    """Write any nesting of tensors, arrays and plain values as `name.safetensors` + `name.json`."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_tensors(state, name, tensors)
    if tensors:
        save_file(tensors, str(path / f"{name}.safetensors"))
    (path / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(path: Path, name: str) -> Any:
    tensor_file = path / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}
    return _join_tensors(json.loads((path / f"{name}.json").read_text()), tensors)


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, so a resumed run continues the same random stream."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "key": np_state[1],
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"], n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{PREFIX}{step:08d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (temporary directories are ignored)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "COMPLETE").exists())
    return done[-1] if done else None


def write_checkpoint(final: Path, parts: dict[str, Any], *, rank: int, world_size: int, barrier) -> None:
    """Write `parts` (name → state) atomically; rank 0 writes shared parts, every rank its own RNG state."""
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    save_state(tmp, f"rng-rank{rank}", rng_state())
    if rank == 0:
        for name, state in parts.items():
            save_state(tmp, name, state)
    barrier()
    if rank == 0:
        (tmp / "COMPLETE").write_text(json.dumps({"world_size": world_size}))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier()


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep only the newest `keep` checkpoints."""
    root = run_dir / "checkpoints"
    done = sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and not p.name.endswith(".tmp"))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
