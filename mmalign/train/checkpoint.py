"""Atomic, verified, pickle-free checkpoints: trainable weights, optimizer, scheduler and RNG state in
safetensors + JSON.

A checkpoint is a directory `step-XXXXXXXX/` written under a temporary name and renamed into place, so a run
killed at any moment leaves either a complete checkpoint or none. Its last file, the `COMPLETE` manifest, records
the size and SHA-256 digest of every other file; a checkpoint is loaded only if all of them match, so one whose
bytes were overwritten, truncated or deleted afterwards is skipped (or refused) by name instead of trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save

from mmalign.train.run_dir import RunDirError

PREFIX = "step-"
MANIFEST = "COMPLETE"
ON_CORRUPT = ("fallback", "error")


class CheckpointError(RunDirError):
    """A checkpoint cannot be used: corrupt, incomplete, non-finite, or it could not be written."""

    label = "checkpoint error"


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
        # serialised in memory and written by Python so a full disk raises OSError(ENOSPC) here
        (path / f"{name}.safetensors").write_bytes(save(tensors))
    (path / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(path: Path, name: str) -> Any:
    """Read back a `save_state` part (the caller has chosen a verified checkpoint)."""
    tensor_file = path / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}
    return _join_tensors(json.loads((path / f"{name}.json").read_text()), tensors)


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, so a resumed run continues the same random stream."""
    np_state = np.random.get_state(legacy=False)  # MT19937's key and position, as the legacy tuple holds them
    return {
        "python": random.getstate(),
        "numpy": {
            "key": np_state["state"]["key"],
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
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


def _step_dirs(run_dir: Path) -> list[Path]:
    """Every `step-*` directory of a run, oldest first (temporary `.tmp` directories excluded)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and not p.name.endswith(".tmp"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that has a manifest (not verified: see `latest_valid_checkpoint`)."""
    done = [p for p in _step_dirs(run_dir) if (p / MANIFEST).exists()]
    return done[-1] if done else None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(path: Path, world_size: int) -> None:
    """Seal a checkpoint directory: size and SHA-256 of every file in it, written (and synced) last."""
    files = {
        f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)}
        for f in sorted(path.iterdir())
        if f.is_file() and f.name != MANIFEST
    }
    manifest = path / MANIFEST
    manifest.write_text(json.dumps({"format": 2, "world_size": world_size, "files": files}, indent=1))
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint directory must not be loaded (which file: missing, size, digest), or None if it is valid."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"it has no {MANIFEST} manifest (its write did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
        expected = {name: (int(meta["bytes"]), str(meta["sha256"])) for name, meta in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        expected = {}
    if not expected:
        return (
            f"its {MANIFEST} manifest is unreadable or lists no file digests (written by an older mmalign?)"
        )
    for name, (size, _) in sorted(expected.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return (
                f"{name} has {file.stat().st_size} bytes, its manifest says {size} (truncated or overwritten)"
            )
    for name, (_, digest) in sorted(expected.items()):
        if _sha256(path / name) != digest:
            return f"{name} does not match its SHA-256 digest (its bytes were changed)"
    return None


def latest_valid_checkpoint(run_dir: Path, on_corrupt: str = "fallback") -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files match its manifest, and one note per newer checkpoint skipped (why).

    `on_corrupt="error"` raises at the first unusable checkpoint instead of falling back. A run with checkpoints
    none of which is valid is an error either way: starting from scratch would silently discard the run.
    """
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"train.on_corrupt_checkpoint must be one of {ON_CORRUPT}, got {on_corrupt!r}")
    candidates = _step_dirs(run_dir)
    notes: list[str] = []
    for path in reversed(candidates):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, notes
        note = f"checkpoint {path} is unusable: {problem}"
        if on_corrupt == "error":
            raise CheckpointError(
                f"{note}; not falling back to an older one (train.on_corrupt_checkpoint=error)"
            )
        notes.append(note)
    if candidates:
        raise CheckpointError(
            f"no valid checkpoint in {run_dir / 'checkpoints'}: {'; '.join(notes)}. To start over in this "
            "directory, set train.resume=false (the old run's files are moved aside)"
        )
    return None, notes


def agreed_checkpoint(
    run_dir: Path, on_corrupt: str, *, is_main_process: bool
) -> tuple[Path | None, list[str]]:
    """`latest_valid_checkpoint` as the main process finds it, the same answer (or error) on every process."""
    from accelerate.utils import broadcast_object_list

    answer: list[Any] = [None]
    if is_main_process:
        try:
            answer = [("ok", *latest_valid_checkpoint(run_dir, on_corrupt))]
        except CheckpointError as err:
            answer = [("error", str(err), [])]
    broadcast_object_list(answer)
    kind, found, notes = answer[0]
    if kind == "error":
        raise CheckpointError(found)
    return found, notes


def require_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse weights holding NaN or inf, naming the first such tensor."""
    for name, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(
                f"{where}: tensor {name!r} holds {bad} non-finite value(s) (NaN/inf); refusing to use these weights"
            )


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict (identifies a model's weights)."""
    h = hashlib.sha256()
    for name in sorted(state):
        value = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{value.dtype}|{tuple(value.shape)}\n".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def all_ranks_ok(accelerator: Any) -> Callable[[bool], bool]:
    """A collective that returns whether every process passed True (and waits for all of them)."""

    def agree(ok: bool) -> bool:
        failed = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
        return accelerator.reduce(failed, "sum").item() == 0

    return agree


def write_checkpoint(
    final: Path, parts: dict[str, Any], *, rank: int, world_size: int, all_ok: Callable[[bool], bool]
) -> None:
    """Write `parts` (name → state) atomically; rank 0 writes shared parts, every rank its own RNG state.

    A failed write on any process (a full disk) removes the partial directory on every path and raises the same
    CheckpointError everywhere; earlier checkpoints are left as they were.
    """
    tmp = final.with_name(final.name + ".tmp")

    def make_tmp() -> None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def write_parts() -> None:
        save_state(tmp, f"rng-rank{rank}", rng_state())
        if rank == 0:
            for name, state in parts.items():
                save_state(tmp, name, state)

    def publish() -> None:
        if rank == 0:
            write_manifest(tmp, world_size)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(final.parent)

    for phase in (make_tmp, write_parts, publish):
        failure: OSError | None = None
        try:
            phase()
        except OSError as err:
            failure = err
        if not all_ok(failure is None):
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            cause = failure or "another process could not write its part"
            raise CheckpointError(
                f"could not write checkpoint {final}: {cause}; the partial checkpoint was removed and the "
                "earlier checkpoints are intact"
            ) from failure


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` valid checkpoints (and any unusable newer ones, for the record); delete older ones.

    Only verified checkpoints count, so a corrupt newest checkpoint never costs the last valid one.
    """
    if keep <= 0:
        return
    valid = 0
    for path in reversed(_step_dirs(run_dir)):
        if valid >= keep:
            shutil.rmtree(path, ignore_errors=True)
        elif checkpoint_problem(path) is None:
            valid += 1
